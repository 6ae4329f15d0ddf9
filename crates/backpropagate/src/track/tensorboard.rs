//! TensorBoard event files: what `tensorboard --logdir` (and W&B, Aim, Trackio, which
//! import them) read. A file is a sequence of TFRecords, each
//! `len u64 | masked crc32c(len) | data | masked crc32c(data)`, whose data are
//! `tensorboard.Event` protobufs: first the file version, then scalars as
//! `Summary.Value.simple_value` and the run's configuration as a text-plugin tensor.
//! Each session (a run, then each resume) writes a new file that starts with
//! `SessionLog START` at its first step; a later session's START makes TensorBoard
//! drop the steps the earlier one wrote past the checkpoint it resumed from.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::crc::crc32c;
use super::proto::Message;
use super::{Point, Tracker};
use crate::error::{Error, Result};

/// The masked CRC TFRecord stores (a CRC of data holding CRCs is weak otherwise).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn event(wall_time: f64, step: u64) -> Message {
    Message::new().double(1, wall_time).int(2, step as i64)
}

/// The first event of every file.
pub fn file_version(wall_time: f64) -> Vec<u8> {
    Message::new()
        .double(1, wall_time)
        .bytes(3, b"brain.Event:2")
        .into_bytes()
}

/// `SessionLog { status: START }` at `step`: TensorBoard discards what an earlier
/// session logged at this step and after.
pub fn session_start(wall_time: f64, step: u64) -> Vec<u8> {
    event(wall_time, step)
        .message(7, Message::new().int(1, 1))
        .into_bytes()
}

/// Scalars at one step, as one `Summary`.
pub fn scalars(wall_time: f64, step: u64, values: &[(String, f64)]) -> Vec<u8> {
    let mut summary = Message::new();
    for (tag, v) in values {
        let value = Message::new().bytes(1, tag.as_bytes()).float(2, *v as f32);
        summary = summary.message(1, value);
    }
    event(wall_time, step).message(5, summary).into_bytes()
}

/// A text summary (the text plugin's string tensor), shown in TensorBoard's Text tab.
pub fn text(wall_time: f64, step: u64, tag: &str, body: &str) -> Vec<u8> {
    let plugin = Message::new().message(1, Message::new().bytes(1, b"text"));
    // TensorProto { dtype: DT_STRING (7), tensor_shape: {} (a scalar), string_val }.
    let tensor = Message::new()
        .int(1, 7)
        .message(2, Message::new())
        .bytes(8, body.as_bytes());
    let value = Message::new()
        .bytes(1, tag.as_bytes())
        .message(8, tensor)
        .message(9, plugin);
    event(wall_time, step)
        .message(5, Message::new().message(1, value))
        .into_bytes()
}

/// Writes one event file in `dir` (created if needed), flushed after every event so
/// TensorBoard shows a run while it trains.
pub struct EventFile {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventFile {
    /// A new file named as TensorFlow names them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>-<n>`), starting with the file
    /// version and a session start at the first step it will write (after
    /// `resume_step`, 0 for a new run).
    pub fn create(dir: &Path, wall_time: f64, resume_step: u64) -> Result<EventFile> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = hostname();
        let name = format!(
            "events.out.tfevents.{}.{host}.{}",
            wall_time as u64,
            crate::fsx::unique_suffix()
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut f = EventFile {
            out: BufWriter::new(file),
            path,
        };
        f.write(&file_version(wall_time))?;
        // Every session starts with one (TensorBoard's data server takes the first
        // START of a run as its beginning and only later ones as restarts).
        f.write(&session_start(wall_time, resume_step + 1))?;
        Ok(f)
    }

    pub fn write(&mut self, event: &[u8]) -> Result<()> {
        let path = &self.path;
        self.out
            .write_all(&record(event))
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io(path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// The TensorBoard tracker: one event file per session in the run's `tensorboard/`.
pub struct TensorBoard {
    file: EventFile,
}

impl TensorBoard {
    pub fn create(dir: &Path, wall_time: f64, resume_step: u64) -> Result<TensorBoard> {
        Ok(TensorBoard {
            file: EventFile::create(dir, wall_time, resume_step)?,
        })
    }
}

impl Tracker for TensorBoard {
    fn record(&mut self, point: &Point) -> Result<()> {
        let event = match point {
            Point::Scalars {
                wall_time,
                step,
                values,
            } => scalars(*wall_time, *step, values),
            Point::Text {
                wall_time,
                step,
                tag,
                body,
            } => text(*wall_time, *step, tag, body),
            Point::Outcome { .. } => return Ok(()),
        };
        self.file.write(&event)
    }

    fn finish(&mut self) -> Result<()> {
        let path = self.file.path().to_path_buf();
        self.file
            .out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masked_crc_matches_tensorflows_test_vector() {
        assert_eq!(masked_crc32c(b"\x1a\x11CRC test, one two"), 0x5794_d08a);
    }

    #[test]
    fn a_record_frames_its_data_with_both_crcs() {
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }
}
