//! The LoRA trainer: data → rows → forward/backward on the frozen base with LoRA →
//! AdamW → metrics, events and checkpoints in a run directory; resumable from any
//! checkpoint with the same losses as an uninterrupted run (same device and threads).
//!
//! ```no_run
//! use backpropagate::train::Trainer;
//! let summary = Trainer::new("models/qwen2").lora_r(16).train("data.jsonl", 60)?;
//! println!("adapter in {}", summary.run_dir.join("adapter").display());
//! summary.push_to_ollama("my-model")?; // then: ollama run my-model
//! # Ok::<(), backpropagate::Error>(())
//! ```

pub mod batch;
mod builder;
mod checkpoint;
mod diagnose;
mod dry_run;
pub mod optim;
mod plan;
mod prepare;
pub mod probe;
mod progress;
mod run_loop;
pub mod schedule;
mod step;
mod summary;

pub use crate::cancel::CancelToken;
pub use builder::Trainer;
pub use dry_run::TrainPlan;
pub(crate) use run_loop::write_adapter;
pub use summary::RunSummary;
