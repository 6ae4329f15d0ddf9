//! The run directory — the unit users see, list, resume and export:
//!
//! ```text
//! runs/<id>/run.toml          resolved TrainConfig (reusable with --config)
//! runs/<id>/run.json          identity: id, created, model, data hash, status
//! runs/<id>/metrics.jsonl     one line per step (and per evaluation)
//! runs/<id>/events.jsonl      every Event, in order
//! runs/<id>/checkpoints/step-N/   adapter + optimizer + RNG + data cursor
//! runs/<id>/adapter/          the final adapter (PEFT layout)
//! runs/<id>/exports/
//! ```
//!
//! Small files are replaced atomically; checkpoints appear by directory rename, so a
//! killed process leaves the last complete checkpoint and nothing half-written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use ts_rs::TS;

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::event::{Event, EventSink};
use crate::fsx::write_atomic;

/// Where runs live unless told otherwise: `$BACKPROP_HOME/runs`, else the platform's
/// data folder (`~/.local/share/backpropagate/runs`, `%APPDATA%\backpropagate\runs`,
/// `~/Library/Application Support/backpropagate/runs`).
pub fn default_runs_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("BACKPROP_HOME") {
        return PathBuf::from(home).join("runs");
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("backpropagate")
        .join("runs")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum RunStatus {
    Running,
    Stopped,
    Finished,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct RunInfo {
    pub id: String,
    pub created: String,
    /// Absolute model folder and data file the run was started with.
    pub model_dir: PathBuf,
    pub data: PathBuf,
    /// sha256 of the data file, to refuse resuming on changed data.
    pub data_sha256: String,
    pub status: RunStatus,
    pub step: u64,
}

/// One metrics line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[ts(export)]
pub struct MetricLine {
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
}

/// The lock file every writer of a run holds (advisory `flock` on Unix, `LockFileEx` on
/// Windows), and the sibling that says who holds it. They are two files because a
/// Windows lock also blocks reading the locked file.
pub const LOCK_FILE: &str = "run.lock";
const HOLDER_FILE: &str = "run.lock.json";

/// Who holds a run's lock, as the refused writer reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    job: String,
    started: String,
}

/// The right to write one run folder, held for a job's whole life (train, resume,
/// multi-run, export, push). Dropping it, or the process dying, releases it: the OS
/// drops the lock with the file handle, so a killed job never blocks the next one.
/// Two jobs in one process conflict as well, since each opens its own handle.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    run_dir: PathBuf,
}

impl RunLock {
    /// Takes the run's lock for `job` or fails at once with [`Error::RunInUse`] naming
    /// the holder. Then removes temporary files that an interrupted writer left, since
    /// no other writer can own them now.
    pub fn acquire(run_dir: &Path, job: &str) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // The holder writes its note just after locking and removes it just before
        // unlocking; a refusal that finds no note is in one of those instants, so it
        // looks again (up to ~200 ms) instead of naming nobody or refusing needlessly.
        // A holder in this process gets up to ~1 s: a job announces its end (the face
        // then resumes or exports) just before it lets go of the run.
        let (mut attempts, mut unnamed) = (0, 0);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    attempts += 1;
                    let refused = match read_holder(run_dir) {
                        Some(h) if h.pid == std::process::id() && attempts < 100 => None,
                        Some(h) => Some(h.to_string()),
                        None => {
                            unnamed += 1;
                            (unnamed >= 20).then(|| "another process".to_string())
                        }
                    };
                    if let Some(holder) = refused {
                        return Err(Error::RunInUse {
                            run: run_dir.to_path_buf(),
                            holder,
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        let holder = Holder {
            pid: std::process::id(),
            job: job.to_string(),
            started: now_utc().0,
        };
        let json = serde_json::to_string(&holder).expect("holder serializes");
        write_atomic(&run_dir.join(HOLDER_FILE), json.as_bytes())?;
        remove_stale_temps(run_dir);
        Ok(RunLock {
            file,
            run_dir: run_dir.to_path_buf(),
        })
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // The holder note goes first, while the lock still keeps others out; the lock
        // file itself stays, because deleting a lock file lets two processes lock two
        // different files of the same name.
        let _ = std::fs::remove_file(self.run_dir.join(HOLDER_FILE));
        let _ = self.file.unlock();
    }
}

/// The holder note, if there is one.
fn read_holder(run_dir: &Path) -> Option<Holder> {
    let text = std::fs::read_to_string(run_dir.join(HOLDER_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// "process N (job, started T)".
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whose = if self.pid == std::process::id() {
            "this process"
        } else {
            "process"
        };
        write!(
            f,
            "{whose} {} ({}, started {})",
            self.pid, self.job, self.started
        )
    }
}

/// Whether a file name is one of our interrupted writes: `.tmp-*` folders (checkpoints,
/// exports, the adapter) and `.<name>.tmp-<pid>` files of [`write_atomic`].
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.starts_with(".tmp-") || (name.starts_with('.') && name.contains(".tmp-"))
}

/// Removes leftovers of interrupted writes in the run folder and the folders that
/// writers fill; called with the run's lock held.
fn remove_stale_temps(run_dir: &Path) {
    for dir in [
        run_dir.to_path_buf(),
        run_dir.join("checkpoints"),
        run_dir.join("exports"),
        run_dir.join("adapter"),
        run_dir.join("init"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_str().is_some_and(is_temp_name) {
                continue;
            }
            let p = entry.path();
            // Not following links: a planted link must not make us delete elsewhere.
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                Ok(_) => std::fs::remove_file(&p),
                Err(_) => Ok(()),
            };
        }
    }
}

/// Creates `runs_dir/<base>` exclusively, or `<base>-2`, `<base>-3`, … when taken, so
/// two runs started in the same second never share a folder. Returns the id used.
pub fn create_unique_dir(runs_dir: &Path, base: &str) -> Result<(String, PathBuf)> {
    std::fs::create_dir_all(runs_dir).map_err(|e| Error::io(runs_dir, e))?;
    for n in 1..=10_000u32 {
        let id = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        let path = runs_dir.join(&id);
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok((id, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Err(Error::Run {
        path: runs_dir.join(base),
        message: "10000 runs with this name already exist; give the run another name or clean up the runs folder".into(),
    })
}

pub struct RunDir {
    path: PathBuf,
    metrics: Mutex<File>,
    events: Mutex<File>,
    /// Held by runs opened for writing; `None` for read-only views.
    lock: Option<RunLock>,
}

impl RunDir {
    /// Creates a new run folder under `runs_dir` named `info.id` (with a suffix when
    /// that name is taken; `info.id` is updated), locked for `job`, with its config and
    /// identity files.
    pub fn create(
        runs_dir: &Path,
        info: &mut RunInfo,
        config: &TrainConfig,
        job: &str,
    ) -> Result<Self> {
        let (id, path) = create_unique_dir(runs_dir, &info.id)?;
        info.id = id;
        let lock = RunLock::acquire(&path, job)?;
        let checkpoints = path.join("checkpoints");
        std::fs::create_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
        write_atomic(&path.join("run.toml"), config.to_toml().as_bytes())?;
        let mut dir = Self::open_files(path)?;
        dir.lock = Some(lock);
        dir.write_info(info)?;
        Ok(dir)
    }

    /// Opens an existing run to read it. Writers use [`RunDir::open_for_write`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::require_run(path)?;
        Self::open_files(path.to_path_buf())
    }

    /// Opens an existing run for `job` (resume), holding its lock while this lives.
    pub fn open_for_write(path: &Path, job: &str) -> Result<Self> {
        Self::require_run(path)?;
        let lock = RunLock::acquire(path, job)?;
        let mut dir = Self::open_files(path.to_path_buf())?;
        dir.lock = Some(lock);
        Ok(dir)
    }

    fn require_run(path: &Path) -> Result<()> {
        if !path.join("run.json").is_file() {
            return Err(Error::Run {
                path: path.to_path_buf(),
                message: "not a run directory (no run.json)".into(),
            });
        }
        Ok(())
    }

    /// The lock this run was opened with, for work done under it (the final export of
    /// a push, say); `None` for a read-only view.
    pub fn lock(&self) -> Option<&RunLock> {
        self.lock.as_ref()
    }

    fn open_files(path: PathBuf) -> Result<Self> {
        let append = |name: &str| {
            let p = path.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))
        };
        Ok(RunDir {
            metrics: Mutex::new(append("metrics.jsonl")?),
            events: Mutex::new(append("events.jsonl")?),
            path,
            lock: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> Result<TrainConfig> {
        TrainConfig::load(&self.path.join("run.toml"))
    }

    pub fn info(&self) -> Result<RunInfo> {
        let p = self.path.join("run.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Run {
            path: p,
            message: format!("unreadable: {e}"),
        })
    }

    pub fn write_info(&self, info: &RunInfo) -> Result<()> {
        let json = serde_json::to_string_pretty(info).expect("RunInfo serializes");
        write_atomic(&self.path.join("run.json"), json.as_bytes())
    }

    pub fn append_metric(&self, line: &MetricLine) -> Result<()> {
        let p = self.path.join("metrics.jsonl");
        let mut f = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = serde_json::to_string(line).expect("metrics serialize");
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(|e| Error::io(&p, e))
    }

    /// Makes metrics written so far durable (at checkpoints).
    pub fn sync_metrics(&self) -> Result<()> {
        let f = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        f.sync_data()
            .map_err(|e| Error::io(self.path.join("metrics.jsonl"), e))
    }

    pub fn metrics(&self) -> Result<Vec<MetricLine>> {
        read_metrics(&self.path.join("metrics.jsonl"))
    }

    /// Drops metric lines past `step` (logged after the checkpoint a resume starts
    /// from), so the resumed run's lines replace them instead of duplicating them.
    pub fn truncate_metrics_after(&self, step: u64) -> Result<()> {
        let p = self.path.join("metrics.jsonl");
        let kept: Vec<MetricLine> = self
            .metrics()?
            .into_iter()
            .filter(|m| m.step <= step)
            .collect();
        let mut text = String::new();
        for m in &kept {
            text.push_str(&serde_json::to_string(m).expect("metrics serialize"));
            text.push('\n');
        }
        let mut f = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        write_atomic(&p, text.as_bytes())?;
        *f = OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        Ok(())
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(list_checkpoints(&self.checkpoints_dir())?.pop())
    }

    pub fn log_event(&self, event: &Event) {
        let mut f = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = serde_json::to_string(event).expect("events serialize");
        text.push('\n');
        // The event log is a convenience copy of what faces already saw; a full disk
        // shows up at the next checkpoint write, which is where it matters.
        let _ = f.write_all(text.as_bytes());
    }
}

/// Checkpoints sorted by step; temporary directories of interrupted writes are skipped.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        if entry.path().join("state.json").is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

pub fn read_metrics(path: &Path) -> Result<Vec<MetricLine>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        // A process killed mid-write can leave a torn last line; it is dropped.
        if let Ok(m) = serde_json::from_str(&line) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Forwards events to a face and keeps a copy in the run's events.jsonl.
pub struct RunSink<'a> {
    pub run: &'a RunDir,
    pub inner: &'a dyn EventSink,
}

impl EventSink for RunSink<'_> {
    fn emit(&self, event: Event) {
        self.run.log_event(&event);
        self.inner.emit(event);
    }
}

/// Runs under `runs_dir`, newest first.
pub fn list_runs(runs_dir: &Path) -> Result<Vec<RunInfo>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(runs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(runs_dir, e)),
    };
    for entry in entries.flatten() {
        if let Ok(run) = RunDir::open(&entry.path()) {
            if let Ok(info) = run.info() {
                out.push(info);
            }
        }
    }
    out.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    Ok(out)
}

/// Finds a run by path or by id under `runs_dir`.
pub fn resolve_run(runs_dir: &Path, run: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(run);
    if as_path.join("run.json").is_file() {
        return Ok(as_path);
    }
    let under = runs_dir.join(run);
    if under.join("run.json").is_file() {
        return Ok(under);
    }
    Err(Error::Run {
        path: as_path,
        message: format!(
            "no such run (looked for a run directory there and under {})",
            runs_dir.display()
        ),
    })
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SSZ` and a compact form for run ids.
pub fn now_utc() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = crate::data::civil_from_days((secs / 86_400) as i64);
    let (hh, mm, ss) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    (
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}"),
    )
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

/// The longest run id a client may name; generated ids stay far below it.
pub const MAX_RUN_ID_LEN: usize = 128;

/// A run id names one folder directly under the runs dir: ASCII letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit, so no id can be `..`, a path, hidden,
/// or a different folder on a case- or Unicode-normalizing filesystem. Faces call this
/// on every id a client sends before joining it to the runs dir.
pub fn validate_run_id(id: &str) -> Result<()> {
    let refuse = |why: &str| {
        let shown: String = id.chars().take(40).flat_map(char::escape_default).collect();
        Err(Error::Run {
            path: PathBuf::from(format!("run id `{shown}`")),
            message: format!(
                "{why}; a run id is the name of a folder directly under the runs dir, made of \
                 ASCII letters, digits, `-`, `_` and `.` (pick one from the runs list)"
            ),
        })
    };
    if id.is_empty() {
        return refuse("the run id is empty");
    }
    if id.len() > MAX_RUN_ID_LEN {
        return refuse(&format!("the run id is longer than {MAX_RUN_ID_LEN} bytes"));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse("the run id must start with a letter or digit");
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return refuse(&format!("the run id contains {:?}", c));
    }
    Ok(())
}
