//! What a finished or stopped run hands back, and the one-call ways to ship it.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::Result;
use crate::event::Silent;
use crate::run::RunStatus;

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub run_dir: PathBuf,
    pub status: RunStatus,
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
}

impl RunSummary {
    /// Exports this run, e.g. `summary.export("gguf", "q4_k_m")`; see [`crate::export`].
    pub fn export(&self, format: &str, quantization: &str) -> Result<PathBuf> {
        crate::export::export_as(&self.run_dir, format, quantization)
    }

    /// Sends this run to Ollama (`OLLAMA_HOST`) as `name`, as a q4_k_m GGUF with the
    /// model's chat template and stop tokens, e.g. `summary.push_to_ollama("my-model")`.
    /// Blocking; see [`crate::ollama::push_run`] for the options.
    pub fn push_to_ollama(&self, name: &str) -> Result<crate::ollama::PushReport> {
        crate::ollama::push_run(
            &self.run_dir,
            &crate::ollama::PushOptions::new(name),
            &Silent,
        )
    }
}
