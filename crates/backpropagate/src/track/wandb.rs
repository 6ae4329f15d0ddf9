//! Weights & Biases offline runs: a `offline-run-<time>-<id>/run-<id>.wandb` folder in
//! the run's `wandb/`, which `wandb sync` uploads and `wandb leet` browses. The file
//! is W&B's transaction log: a 7-byte header (`:W&B`, 0xBEE1, version 0), then
//! LevelDB-log blocks of 32 KiB whose chunks carry `wandb_internal.Record` protobufs
//! (CRC-32/IEEE over the chunk type and payload): the run with its configuration
//! first, a history record per step (with `_step`, `_runtime`, `_timestamp`), the
//! summary, and the exit record last (a log without one reads as a crashed run).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::crc::crc32;
use super::proto::Message;
use super::{Point, Tracker};
use crate::error::{Error, Result};

const BLOCK: usize = 32 * 1024;
const CHUNK_HEADER: usize = 7;
const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// The LevelDB-log framing of W&B's transaction log, block offsets counted from the
/// start of the file (its header included).
pub struct LogWriter<W: Write> {
    out: W,
    offset: usize,
}

impl<W: Write> LogWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(&[b':', b'W', b'&', b'B', 0xe1, 0xbe, 0])?;
        Ok(LogWriter { out, offset: 7 })
    }

    /// One record, split into chunks where it crosses blocks.
    pub fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let mut first = true;
        loop {
            let left = BLOCK - self.offset % BLOCK;
            if left < CHUNK_HEADER {
                self.out.write_all(&[0u8; CHUNK_HEADER][..left])?;
                self.offset += left;
                continue;
            }
            let room = left - CHUNK_HEADER;
            let n = room.min(data.len());
            let last = n == data.len();
            let kind = match (first, last) {
                (true, true) => FULL,
                (true, false) => FIRST,
                (false, false) => MIDDLE,
                (false, true) => LAST,
            };
            let mut crc_input = Vec::with_capacity(n + 1);
            crc_input.push(kind);
            crc_input.extend_from_slice(&data[..n]);
            self.out.write_all(&crc32(&crc_input).to_le_bytes())?;
            self.out.write_all(&(n as u16).to_le_bytes())?;
            self.out.write_all(&[kind])?;
            self.out.write_all(&data[..n])?;
            self.offset += CHUNK_HEADER + n;
            data = &data[n..];
            first = false;
            if last {
                return self.out.flush();
            }
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A config, history or summary item: a key and its value as JSON text.
fn item(key: &str, value_json: &str) -> Message {
    Message::new()
        .bytes(1, key.as_bytes())
        .bytes(16, value_json.as_bytes())
}

/// A number as W&B's JSON keeps it: non-finite values as the bare `NaN`/`Infinity`
/// it accepts (serde_json cannot write them).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        Json::from(v).to_string()
    }
}

/// A W&B run id: 8 lower-case letters and digits, derived from our run id so every
/// session of one run is the same W&B run.
pub fn run_id(ours: &str) -> String {
    use sha2::{Digest, Sha256};
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Sha256::digest(ours.as_bytes())
        .iter()
        .take(8)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The W&B tracker: one offline run folder per session.
pub struct Wandb {
    /// None once finished.
    log: Option<LogWriter<BufWriter<File>>>,
    path: PathBuf,
    num: i64,
    start: f64,
    summary: serde_json::Map<String, Json>,
    failed: bool,
}

impl Wandb {
    /// A new offline run in `dir` for our run `run_name`, with `config` (run.toml as
    /// JSON) as its configuration; `project` from WANDB_PROJECT or "backpropagate".
    pub fn create(
        dir: &Path,
        run_name: &str,
        config: &Json,
        wall_time: f64,
        resume_step: u64,
    ) -> Result<Wandb> {
        let id = run_id(run_name);
        let (_, stamp) = crate::run::now_utc();
        // W&B's folder stamp is YYYYMMDD_HHMMSS.
        let stamp = stamp.replace('-', "_");
        let folder = dir.join(format!("offline-run-{stamp}-{id}"));
        std::fs::create_dir_all(folder.join("files")).map_err(|e| Error::io(&folder, e))?;
        let path = folder.join(format!("run-{id}.wandb"));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let log = LogWriter::new(BufWriter::new(file)).map_err(|e| Error::io(&path, e))?;
        let mut w = Wandb {
            log: Some(log),
            path,
            num: 0,
            start: wall_time,
            summary: serde_json::Map::new(),
            failed: false,
        };
        let project = std::env::var("WANDB_PROJECT").unwrap_or_else(|_| "backpropagate".into());
        let mut cfg = Message::new();
        if let Some(obj) = config.as_object() {
            for (k, v) in obj {
                cfg = cfg.message(1, item(k, &v.to_string()));
            }
        }
        let start = Message::new()
            .int(1, wall_time as i64)
            .int(2, ((wall_time.fract()) * 1e9) as i64);
        let mut run = Message::new().bytes(1, id.as_bytes());
        if let Ok(entity) = std::env::var("WANDB_ENTITY") {
            run = run.bytes(2, entity.as_bytes());
        }
        run = run
            .bytes(3, project.as_bytes())
            .message(4, cfg)
            .bytes(8, run_name.as_bytes())
            .int(14, resume_step as i64)
            .message(17, start);
        if resume_step > 0 {
            run = run.int(18, 1);
        }
        w.write(17, run)?;
        Ok(w)
    }

    fn write(&mut self, field: u32, body: Message) -> Result<()> {
        self.num += 1;
        let record = Message::new().int(1, self.num).message(field, body);
        let path = &self.path;
        let Some(log) = self.log.as_mut() else {
            return Err(Error::io(
                path,
                std::io::Error::other("the run was finished"),
            ));
        };
        log.append(&record.into_bytes())
            .map_err(|e| Error::io(path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Tracker for Wandb {
    fn record(&mut self, point: &Point) -> Result<()> {
        match point {
            Point::Scalars {
                wall_time,
                step,
                values,
            } => {
                let mut history = Message::new()
                    .message(1, item("_step", &step.to_string()))
                    .message(1, item("_runtime", &number(wall_time - self.start)))
                    .message(1, item("_timestamp", &number(*wall_time)));
                for (k, v) in values {
                    history = history.message(1, item(k, &number(*v)));
                    self.summary.insert(
                        k.clone(),
                        serde_json::Number::from_f64(*v).map_or(Json::Null, Json::Number),
                    );
                }
                self.summary.insert("_step".into(), Json::from(*step));
                let history = history.message(2, Message::new().int(1, *step as i64));
                self.write(2, history)
            }
            Point::Text { .. } => Ok(()),
            Point::Outcome { failed } => {
                self.failed = *failed;
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        let mut summary = Message::new();
        for (k, v) in &self.summary {
            summary = summary.message(1, item(k, &v.to_string()));
        }
        self.write(3, summary)?;
        let runtime = (super::wall_time() - self.start).max(0.0) as i64;
        let exit = Message::new()
            .int(1, i64::from(self.failed))
            .int(2, runtime);
        self.write(18, exit)?;
        let path = self.path.clone();
        let Some(log) = self.log.take() else {
            return Ok(());
        };
        let file = log
            .into_inner()
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_chunked_at_block_boundaries() {
        let mut w = LogWriter::new(Vec::new()).unwrap();
        let big = vec![7u8; BLOCK + 100];
        w.append(b"small").unwrap();
        w.append(&big).unwrap();
        let bytes = w.into_inner();
        assert_eq!(&bytes[..7], &[0x3a, 0x57, 0x26, 0x42, 0xe1, 0xbe, 0]);
        // The small record: one FULL chunk right after the file header.
        assert_eq!(bytes[7 + 6], FULL);
        assert_eq!(u16::from_le_bytes([bytes[11], bytes[12]]), 5);
        // The big one starts as FIRST, fills the block, and goes on in the next.
        let second = 7 + 7 + 5;
        assert_eq!(bytes[second + 6], FIRST);
        let first_len = u16::from_le_bytes([bytes[second + 4], bytes[second + 5]]) as usize;
        assert_eq!(second + 7 + first_len, BLOCK);
        assert_eq!(bytes[BLOCK + 6], LAST);
        let rest = u16::from_le_bytes([bytes[BLOCK + 4], bytes[BLOCK + 5]]) as usize;
        assert_eq!(first_len + rest, big.len());
        assert_eq!(bytes.len(), BLOCK + 7 + rest);
    }
}
