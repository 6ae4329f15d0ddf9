//! Experiment tracking: the run's steps, evaluations and GPU samples also sent to the
//! trackers its configuration names (`report_to`), live while it trains, and the same
//! from a finished run's `metrics.jsonl` afterwards ([`export_metrics`]).
//! `metrics.jsonl` stays the record; a tracker is a copy. Names follow the HF Trainer
//! (`train/loss`, `train/learning_rate`, `train/grad_norm`, `eval/loss`).
//!
//! A tracker never fails or slows a run: points go through a bounded queue to a
//! background thread, and a tracker that fails is turned off with one warning.

mod crc;
pub mod proto;
pub mod tensorboard;
pub mod wandb;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::{ReportTo, TrainConfig};
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};

/// One thing a tracker records.
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    Scalars {
        wall_time: f64,
        step: u64,
        values: Vec<(String, f64)>,
    },
    Text {
        wall_time: f64,
        step: u64,
        tag: String,
        body: String,
    },
    /// How the session ended, just before it is finished.
    Outcome { failed: bool },
}

/// A destination for points.
pub trait Tracker: Send {
    fn record(&mut self, point: &Point) -> Result<()>;
    /// Makes what was recorded durable (the end of a session).
    fn finish(&mut self) -> Result<()>;
}

/// Where a run's TensorBoard event files go.
pub fn tensorboard_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tensorboard")
}

/// Where a run's W&B offline runs go: `$WANDB_DIR/wandb` as W&B itself does, else the
/// run's `wandb/`.
pub fn wandb_dir(run_dir: &Path) -> PathBuf {
    match std::env::var_os("WANDB_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("wandb"),
        _ => run_dir.join("wandb"),
    }
}

/// Seconds since the Unix epoch, as trackers stamp points.
pub fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// HF Trainer's scalar names.
const TRAIN_LOSS: &str = "train/loss";
const LEARNING_RATE: &str = "train/learning_rate";
const GRAD_NORM: &str = "train/grad_norm";
const TOKENS_PER_SECOND: &str = "train/tokens_per_second";
const EVAL_LOSS: &str = "eval/loss";

/// The scalars an event carries, under HF Trainer's names; GPU samples carry no step
/// and are put at `last_step`.
pub fn scalars_of(event: &Event, last_step: u64) -> Option<(u64, Vec<(String, f64)>)> {
    let named = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    };
    match event {
        Event::Step {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            ..
        } => Some((
            *step,
            named(&[
                (TRAIN_LOSS, *loss),
                (LEARNING_RATE, *lr),
                (GRAD_NORM, *grad_norm),
                (TOKENS_PER_SECOND, *tokens_per_s),
            ]),
        )),
        Event::Eval { step, loss } => Some((*step, named(&[(EVAL_LOSS, *loss)]))),
        Event::Gpu {
            used_mb,
            util,
            temp_c,
            power_w,
            ..
        } => Some((
            last_step,
            named(&[
                ("gpu/memory_used_mb", *used_mb as f64),
                ("gpu/utilization", *util as f64),
                ("gpu/temperature_c", *temp_c as f64),
                ("gpu/power_w", *power_w as f64),
            ]),
        )),
        _ => None,
    }
}

/// Points waiting for the background thread; past this many a point is dropped (with
/// one warning) rather than holding up a step.
const QUEUE: usize = 4096;

enum Msg {
    Point(Point),
    Finish,
}

/// An event sink that forwards everything to `inner` and feeds the trackers.
pub struct Tracking<'a> {
    inner: &'a dyn EventSink,
    tx: Mutex<Option<SyncSender<Msg>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The first failure of a tracker, reported once through `inner`.
    failure: Arc<Mutex<Option<String>>>,
    warned: AtomicBool,
    dropped: AtomicBool,
    last_step: AtomicU64,
}

impl<'a> Tracking<'a> {
    /// The trackers `config` names for a session of the run in `run_dir` that starts
    /// after `start_step` (0 for a new run), with the run's configuration (`config_text`,
    /// its run.toml) recorded first. A tracker that cannot start is skipped with a
    /// warning; with none, this only forwards.
    pub fn start(
        config: &TrainConfig,
        run_dir: &Path,
        config_text: &str,
        start_step: u64,
        inner: &'a dyn EventSink,
    ) -> Tracking<'a> {
        let now = wall_time();
        let mut trackers: Vec<(ReportTo, Box<dyn Tracker>)> = Vec::new();
        for &to in &config.report_to {
            if trackers.iter().any(|(t, _)| *t == to) {
                continue;
            }
            let dir = match to {
                ReportTo::Tensorboard => tensorboard_dir(run_dir),
                ReportTo::Wandb => wandb_dir(run_dir),
            };
            let name = run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match create(to, &dir, &name, config, now, start_step) {
                Ok(t) => {
                    let hint = match to {
                        ReportTo::Wandb => " (an offline run: `wandb sync` uploads it)",
                        ReportTo::Tensorboard => "",
                    };
                    inner.emit(Event::Log {
                        level: LogLevel::Info,
                        message: format!("reporting to {} in {}{hint}", to.name(), dir.display()),
                    });
                    trackers.push((to, t));
                }
                Err(e) => inner.emit(Event::Log {
                    level: LogLevel::Warn,
                    message: format!("{}: {e}; training goes on without it", to.name()),
                }),
            }
        }
        let tracking = Tracking::with(trackers, start_step, inner);
        tracking.send(config_point(config_text, now, start_step));
        tracking
    }

    /// Feeds `trackers` from a background thread.
    fn with(
        trackers: Vec<(ReportTo, Box<dyn Tracker>)>,
        start_step: u64,
        inner: &'a dyn EventSink,
    ) -> Tracking<'a> {
        let failure = Arc::new(Mutex::new(None));
        let (tx, worker) = if trackers.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = sync_channel::<Msg>(QUEUE);
            let failed = failure.clone();
            let worker = std::thread::Builder::new()
                .name("tracking".into())
                .spawn(move || {
                    let mut live: Vec<Option<(ReportTo, Box<dyn Tracker>)>> =
                        trackers.into_iter().map(Some).collect();
                    let fail = |to: ReportTo, e: Error| {
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert_with(|| format!("{}: {e}", to.name()));
                    };
                    while let Ok(msg) = rx.recv() {
                        for slot in live.iter_mut() {
                            let Some((to, t)) = slot else { continue };
                            let done = match &msg {
                                Msg::Point(p) => t.record(p),
                                Msg::Finish => t.finish(),
                            };
                            if let Err(e) = done {
                                fail(*to, e);
                                *slot = None;
                            }
                        }
                        if matches!(msg, Msg::Finish) {
                            break;
                        }
                    }
                })
                .ok();
            (worker.is_some().then_some(tx), worker)
        };
        Tracking {
            inner,
            tx: Mutex::new(tx),
            worker: Mutex::new(worker),
            failure,
            warned: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
            last_step: AtomicU64::new(start_step),
        }
    }

    fn send(&self, point: Point) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = tx.as_ref() else { return };
        if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Point(point)) {
            if !self.dropped.swap(true, Ordering::Relaxed) {
                self.inner.emit(Event::Log {
                    level: LogLevel::Warn,
                    message: "experiment tracking falls behind: some points were not recorded (metrics.jsonl has them all)".into(),
                });
            }
        }
    }

    fn report_failure(&self) {
        if self.warned.load(Ordering::Relaxed) {
            return;
        }
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = failure {
            self.warned.store(true, Ordering::Relaxed);
            self.inner.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!("{f}; this tracker is off for the rest of the run (metrics.jsonl keeps every step)"),
            });
        }
    }

    /// Ends the session: every tracker writes out what it holds. Also done on drop.
    pub fn close(&self) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Blocks only while the queue is full: the worker is draining it.
            let _ = tx.send(Msg::Finish);
        }
        if let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = worker.join();
        }
        self.report_failure();
    }
}

impl EventSink for Tracking<'_> {
    fn emit(&self, event: Event) {
        self.report_failure();
        match &event {
            Event::Step { step, .. } => self.last_step.store(*step, Ordering::Relaxed),
            Event::Failed { .. } => self.send(Point::Outcome { failed: true }),
            _ => {}
        }
        if let Some((step, values)) = scalars_of(&event, self.last_step.load(Ordering::Relaxed)) {
            self.send(Point::Scalars {
                wall_time: wall_time(),
                step,
                values,
            });
        }
        self.inner.emit(event);
    }
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Writes a run's `metrics.jsonl` (and run.toml as its configuration) to `to` as one
/// clean session, into `<run>/exports/<to>/` (replaced whole), and returns that
/// folder. For a run trained without tracking, or one resumed several times.
pub fn export_metrics(run_dir: &Path, to: ReportTo) -> Result<PathBuf> {
    let run = crate::run::RunDir::open(run_dir)?;
    let _lock = crate::run::RunLock::acquire(run_dir, "export-metrics")?;
    let info = run.info()?;
    let start = epoch_of(&info.created).unwrap_or_else(wall_time);
    let metrics = crate::run::read_metrics(&run_dir.join("metrics.jsonl"))?;
    let config_text = std::fs::read_to_string(run_dir.join("run.toml")).unwrap_or_default();
    let config = run.config()?;
    let dest = run_dir.join("exports").join(to.name());
    crate::fsx::write_dir(&dest, |tmp| {
        let mut t = create(to, tmp, &info.id, &config, start, 0)?;
        t.record(&config_point(&config_text, start, 0))?;
        for m in &metrics {
            if let Some(values) = metric_values(m) {
                t.record(&Point::Scalars {
                    wall_time: start + m.elapsed_s.unwrap_or(0.0),
                    step: m.step,
                    values,
                })?;
            }
        }
        t.finish()
    })?;
    Ok(dest)
}

/// A new session of tracker `to` in `dir`, for our run `run_name` trained with
/// `config`, after `start_step`.
fn create(
    to: ReportTo,
    dir: &Path,
    run_name: &str,
    config: &TrainConfig,
    wall_time: f64,
    start_step: u64,
) -> Result<Box<dyn Tracker>> {
    Ok(match to {
        ReportTo::Tensorboard => Box::new(tensorboard::TensorBoard::create(
            dir, wall_time, start_step,
        )?),
        ReportTo::Wandb => {
            let json = serde_json::to_value(config).unwrap_or_default();
            Box::new(wandb::Wandb::create(
                dir, run_name, &json, wall_time, start_step,
            )?)
        }
    })
}

/// The run's configuration (its run.toml) as a text point.
fn config_point(config_text: &str, wall_time: f64, step: u64) -> Point {
    Point::Text {
        wall_time,
        step,
        tag: "config".into(),
        body: format!("```toml\n{config_text}\n```"),
    }
}

/// A metrics line's values under HF Trainer's names; None when it has none.
fn metric_values(m: &crate::run::MetricLine) -> Option<Vec<(String, f64)>> {
    let mut values = Vec::new();
    for (name, v) in [
        (TRAIN_LOSS, m.loss),
        (LEARNING_RATE, m.lr),
        (GRAD_NORM, m.grad_norm),
        (TOKENS_PER_SECOND, m.tokens_per_s),
        (EVAL_LOSS, m.eval_loss),
    ] {
        if let Some(v) = v {
            values.push((name.to_string(), v));
        }
    }
    (!values.is_empty()).then_some(values)
}

/// Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` time (run.json's `created`).
fn epoch_of(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from 1970-01-01 to y-m-d (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_times_convert_to_epoch_seconds() {
        assert_eq!(epoch_of("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(epoch_of("2026-12-02T00:10:04Z"), Some(1_796_170_204.0));
        assert_eq!(epoch_of("2000-02-29T12:00:00Z"), Some(951_825_600.0));
        assert_eq!(epoch_of("yesterday"), None);
    }

    /// Fails its second point; or, `slow`, takes a while over each.
    struct Flaky {
        seen: Arc<Mutex<Vec<u64>>>,
        slow: bool,
    }

    impl Tracker for Flaky {
        fn record(&mut self, point: &Point) -> Result<()> {
            let Point::Scalars { step, .. } = point else {
                return Ok(());
            };
            if self.slow {
                std::thread::sleep(std::time::Duration::from_micros(500));
            } else if *step == 2 {
                return Err(Error::Io {
                    path: "tracker".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.seen.lock().unwrap().push(*step);
            Ok(())
        }

        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn step(step: u64) -> Event {
        Event::Step {
            run: 0,
            step,
            loss: 1.0,
            lr: 1.0,
            grad_norm: 1.0,
            tokens_per_s: 1.0,
            elapsed_s: 0.0,
            eta_s: 0.0,
        }
    }

    fn warnings(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Log {
                    level: LogLevel::Warn,
                    message,
                } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_failing_tracker_is_turned_off_with_one_warning_and_every_event_still_flows() {
        let out = Mutex::new(Vec::new());
        let face = |e: Event| out.lock().unwrap().push(e);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let flaky = Flaky {
            seen: seen.clone(),
            slow: false,
        };
        let t = Tracking::with(vec![(ReportTo::Tensorboard, Box::new(flaky))], 0, &face);
        for s in 1..=5 {
            t.emit(step(s));
        }
        t.close();
        assert_eq!(*seen.lock().unwrap(), [1], "off after its failure");
        let events = out.lock().unwrap();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Step { .. }))
                .count(),
            5
        );
        let w = warnings(&events);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("disk full") && w[0].contains("off for the rest"),
            "{w:?}"
        );
    }

    #[test]
    fn a_slow_tracker_never_holds_up_training() {
        let out = Mutex::new(Vec::new());
        let face = |e: Event| out.lock().unwrap().push(e);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let slow = Flaky {
            seen: seen.clone(),
            slow: true,
        };
        let t = Tracking::with(vec![(ReportTo::Tensorboard, Box::new(slow))], 0, &face);
        let began = std::time::Instant::now();
        let n = 3 * QUEUE as u64;
        for s in 1..=n {
            t.emit(step(s));
        }
        // At 0.5 ms a point the tracker would need 6 s; the steps went on regardless.
        assert!(began.elapsed() < std::time::Duration::from_secs(3));
        drop(t);
        let w = warnings(&out.lock().unwrap());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("falls behind"), "{w:?}");
        let recorded = seen.lock().unwrap().len();
        assert!(recorded >= QUEUE && recorded < n as usize, "{recorded}");
    }

    #[test]
    fn events_become_hf_trainer_scalars() {
        let step = Event::Step {
            run: 0,
            step: 7,
            loss: 1.5,
            lr: 2e-4,
            grad_norm: 0.3,
            tokens_per_s: 100.0,
            elapsed_s: 1.0,
            eta_s: 2.0,
        };
        let (at, values) = scalars_of(&step, 0).unwrap();
        assert_eq!(at, 7);
        assert_eq!(values[0], ("train/loss".to_string(), 1.5));
        assert_eq!(values[1].0, "train/learning_rate");
        let eval = Event::Eval { step: 8, loss: 2.0 };
        assert_eq!(
            scalars_of(&eval, 0),
            Some((8, vec![("eval/loss".to_string(), 2.0)]))
        );
        assert!(scalars_of(
            &Event::Checkpoint {
                step: 1,
                path: String::new()
            },
            0
        )
        .is_none());
    }
}
