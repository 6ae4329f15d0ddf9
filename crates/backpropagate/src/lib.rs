//! Backpropagate engine: fine-tune local LLMs with LoRA and hand them to Ollama.
//!
//! Data flows one way: dataset → tokens → model + LoRA → trainer → run directory →
//! exports → Ollama. This crate holds every step and no UI code; the `backprop` CLI,
//! the headless server and the desktop app are thin faces over it that render the
//! same [`Event`] stream.
//!
//! ```no_run
//! use backpropagate::data::{prepare, PrepareOptions};
//! let prepared = prepare("assets/samples/alpaca.jsonl".as_ref(), "my-model".as_ref(),
//!                        &PrepareOptions::default())?;
//! println!("{}", prepared.stats);
//! # Ok::<(), backpropagate::Error>(())
//! ```

pub mod cancel;
pub mod config;
pub mod data;
pub mod error;
pub mod event;
pub mod export;
pub mod fixture;
pub mod fsx;
pub mod gguf_base;
pub mod gpu;
pub mod hub;
pub mod lora;
pub mod model;
pub mod model_dir;
pub mod ollama;
pub mod quant;
pub mod run;
mod safe_path;
pub mod slao;
pub mod threads;
pub mod track;
pub mod train;

pub use config::{BaseQuant, Precision, TrainConfig};
pub use error::{Error, Result};
pub use event::Event;
