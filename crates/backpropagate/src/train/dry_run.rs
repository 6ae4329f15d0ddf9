//! The plan of a run before it starts (`backprop train --dry-run`, the app's plan
//! before Start): what the data, the batch settings and the memory planner decided,
//! with nothing written and no weights loaded.

use serde::Serialize;
use ts_rs::TS;

use super::prepare::Session;

/// What a run would do, from the same decisions the run itself makes.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[ts(export)]
pub struct TrainPlan {
    pub train_rows: usize,
    pub val_rows: usize,
    pub steps: u64,
    pub micro_batch: usize,
    pub accumulation: usize,
    /// micro_batch × accumulation rows per optimizer step.
    pub effective_batch: usize,
    /// How many passes over the training rows the steps make.
    pub epochs: f64,
    pub longest_row_tokens: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    pub device: String,
    /// `f32` or `bf16`.
    pub precision: String,
    /// How the frozen base is held: `f32` (or its own bf16/f16), `q8_0`, `q4_k`.
    pub base_storage: String,
    pub layers: usize,
    /// Layers under gradient checkpointing.
    pub recomputed_layers: usize,
    #[ts(type = "number")]
    pub predicted_peak_bytes: u64,
    /// Free memory on the device when planned; null where it cannot be known.
    #[ts(type = "number | null")]
    pub free_bytes: Option<u64>,
    /// Whether the predicted peak fits the free memory with the planner's headroom;
    /// null where free memory is unknown.
    pub fits: Option<bool>,
}

impl Session {
    pub(super) fn plan(&self) -> TrainPlan {
        let effective = self.micro_batch * self.accumulation;
        let peak =
            self.estimate.fixed_bytes + self.micro_batch as u64 * self.estimate.per_sample_bytes;
        let trainable = crate::lora::target_shapes(&self.model_config, &self.config.lora)
            .iter()
            .map(|(_, out_f, in_f)| self.config.lora.r * (out_f + in_f))
            .sum();
        TrainPlan {
            train_rows: self.train_rows.len(),
            val_rows: self.val_rows.len(),
            steps: self.config.steps,
            micro_batch: self.micro_batch,
            accumulation: self.accumulation,
            effective_batch: effective,
            epochs: self.config.steps as f64 * effective as f64
                / self.train_rows.len().max(1) as f64,
            longest_row_tokens: self.longest_row,
            trainable_params: trainable,
            total_params: self.model_config.parameter_count(),
            device: self.device_label.clone(),
            precision: match (self.dtype, self.products) {
                (candle_core::DType::BF16, _) => "bf16".into(),
                (_, crate::model::blas_bf16::Products::Bf16) => "bf16 products (CPU)".into(),
                _ => "f32".into(),
            },
            base_storage: self.base_storage.clone(),
            layers: self.model_config.num_layers,
            recomputed_layers: self.recompute_layers,
            predicted_peak_bytes: peak,
            free_bytes: self.free_bytes,
            fits: self
                .free_bytes
                .map(|free| peak <= crate::gpu::memory::usable_bytes(free)),
        }
    }
}
