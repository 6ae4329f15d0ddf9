//! The one event type that flows from the engine to every face (CLI progress bars, the
//! HTTP+SSE server, the desktop window). Serialized with a `type` tag so the web UI can
//! switch on it; see DESIGN.md "Contracts".

use serde::{Deserialize, Serialize};
use ts_rs::TS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(tag = "type")]
#[ts(export)]
pub enum Event {
    /// A training run began or resumed; names the run folder every face can open.
    Started {
        run_id: String,
        path: String,
        total_steps: u64,
        /// 0 for a new run, else the checkpoint step it resumes from.
        start_step: u64,
    },
    Log {
        level: LogLevel,
        message: String,
    },
    Progress {
        stage: String,
        done: u64,
        total: u64,
    },
    Step {
        run: u32,
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
        eta_s: f64,
    },
    Eval {
        step: u64,
        loss: f64,
    },
    Gpu {
        used_mb: u64,
        total_mb: u64,
        util: f32,
        temp_c: f32,
        power_w: f32,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    Finished {
        steps: u64,
        final_loss: Option<f64>,
        path: String,
    },
    Failed {
        error: String,
        hint: Option<String>,
    },
    /// Stopped on request after writing a checkpoint; the run can be resumed.
    Stopped {
        step: u64,
        path: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// Where engine work sends its events. Closures work, so a face can forward to a channel.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: Event) {
        self(event)
    }
}

/// A sink that drops everything, for callers that do not watch progress.
pub struct Silent;

impl EventSink for Silent {
    fn emit(&self, _event: Event) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_a_type_tag() {
        let e = Event::Progress {
            stage: "tokenize".into(),
            done: 3,
            total: 10,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"Progress","stage":"tokenize","done":3,"total":10}"#
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }
}
