//! What a finished or stopped run hands back. The one-call ways to ship it
//! (`summary.export(..)`, `summary.push_to_ollama(..)`) are defined by `export` and
//! `ollama`, which sit above the trainer.

use std::path::PathBuf;

use serde::Serialize;

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
