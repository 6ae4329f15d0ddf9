//! Decoder-only model families in candle: config, weights, the transformer with LoRA
//! hooks, and the differentiable ops it is built from.

mod attention_any;
/// Public for `benches/attention.rs` only; the decoder is its one user.
#[doc(hidden)]
pub mod attention_op;
pub mod blas;
pub mod blas_bf16;
mod config;
mod cpu_values;
mod decoder;
mod fast_exp;
mod frozen_linear;
mod fused;
mod lm_loss;
mod lora_op;
mod op_tensors;
pub mod ops;
pub mod profile;
pub mod qlinear;
mod recompute;
mod rope;
mod weights;

pub use config::{Arch, ModelConfig, RopeScaling, SUPPORTED};
pub use decoder::{
    embedding_on_host, expected_tensors, fused_ops_enabled, recompute_supported, BatchInputs,
    CausalLm, FlatBatch, CPU_BF16_REFUSAL,
};
pub use rope::inv_freq;
pub use weights::{safetensors_paths, Weights};
