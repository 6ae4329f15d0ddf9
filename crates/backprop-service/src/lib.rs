//! The app layer shared by `backprop serve` (HTTP + SSE) and the desktop shell (Tauri
//! IPC): long jobs on worker threads with cancel tokens, one broadcast of engine events
//! tagged with their job, and the calls of docs/http-api.md. No HTTP or Tauri here:
//! each face only maps its transport onto [`Service`].

pub mod dto;
mod error;
mod limits;
mod service;

pub use error::{ErrorKind, Result, ServiceError};
pub use limits::{CancelOnDrop, DatasetUpload, RequestBudget};
pub use service::{Service, ServiceConfig, MAX_SAMPLE_CHARS, MAX_SHOWN_SAMPLES};
