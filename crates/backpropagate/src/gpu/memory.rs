//! How much memory a LoRA training step needs, and the largest micro-batch that fits.
//!
//! ```text
//! bytes(micro) = fixed + micro × seq × per_token
//! fixed        = params × weight_bytes                 frozen base (2 for bf16/f16, 4 for f32)
//!              + lora_params × 16                      f32 weight, gradient, Adam m and v
//!              + 256 MiB                               kernels, workspace, allocator slack
//! per_token    = a × layers × saved                    activations kept for backward, in the
//!                                                      compute dtype (a = weight_bytes: 2 in
//!                                                      bf16/f16 mixed precision, 4 in f32)
//!              + 4 × 2 × vocab                         f32 logits and their gradient
//! saved        = 10·h + 2·kv + 3·i + 7·r + 2·heads·seq per layer: norms, q, attention and
//!                                                      projection outputs, residuals (10·h),
//!                                                      k and v (2·kv), gate/up/SiLU (3·i),
//!                                                      the 7 LoRA A outputs (7·r), attention
//!                                                      scores and probabilities
//! with activation checkpointing, each layer keeps only its input (h) and one layer at a
//! time is recomputed: layers × saved becomes layers × h + saved.
//! ```
//!
//! `h` hidden size, `i` MLP size, `kv` = kv_heads × head_dim, `r` LoRA rank. The batch
//! is then picked against the free memory with 10% headroom, as the largest divisor of
//! the requested effective batch that fits, so micro × accumulation is exactly that
//! batch.

use serde::Serialize;

use crate::model::ModelConfig;

/// The shapes the estimate depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_dim: u64,
    pub vocab: u64,
    pub params: u64,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Shape {
        Shape {
            hidden: c.hidden_size as u64,
            intermediate: c.intermediate_size as u64,
            layers: c.num_layers as u64,
            heads: c.num_heads as u64,
            kv_dim: (c.num_kv_heads * c.head_dim) as u64,
            vocab: c.vocab_size as u64,
            params: c.parameter_count() as u64,
        }
    }

    /// LoRA parameters for rank `r` on all seven projections.
    pub fn lora_params(&self, r: u64) -> u64 {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_dim);
        let per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h);
        self.layers * r * per_layer
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub fixed_bytes: u64,
    pub per_sample_bytes: u64,
}

const WORKSPACE: u64 = 256 << 20;

pub fn estimate(
    shape: &Shape,
    seq: u64,
    lora_r: u64,
    weight_bytes: u64,
    checkpointing: bool,
) -> Estimate {
    let s = shape;
    let saved = 10 * s.hidden + 2 * s.kv_dim + 3 * s.intermediate + 7 * lora_r + 2 * s.heads * seq;
    let kept = if checkpointing {
        s.layers * s.hidden + saved
    } else {
        s.layers * saved
    };
    let per_token = weight_bytes * kept + 4 * 2 * s.vocab;
    Estimate {
        fixed_bytes: s.params * weight_bytes + s.lora_params(lora_r) * 16 + WORKSPACE,
        per_sample_bytes: seq * per_token,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchPlan {
    pub micro_batch: u32,
    pub accumulation: u32,
}

/// The plan for `effective` samples per optimizer step within `free_bytes`, or the
/// bytes a single sample would need when even that does not fit.
pub fn plan_batch(free_bytes: u64, est: &Estimate, effective: u32) -> Result<BatchPlan, u64> {
    let usable = free_bytes / 10 * 9;
    let need_one = est.fixed_bytes + est.per_sample_bytes;
    if usable < need_one {
        return Err(need_one);
    }
    let fits = ((usable - est.fixed_bytes) / est.per_sample_bytes.max(1))
        .min(effective.max(1) as u64) as u32;
    let micro = (1..=fits.max(1))
        .rev()
        .find(|m| effective.max(1).is_multiple_of(*m))
        .unwrap_or(1);
    Ok(BatchPlan {
        micro_batch: micro,
        accumulation: effective.max(1) / micro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_dim: 32,
        vocab: 1000,
        params: 200_000,
    };

    #[test]
    fn the_formula_gives_the_hand_computed_numbers() {
        // LoRA r8: per layer 8 × (128 + 2·96 + 128 + 2·192 + 192) = 8192; two layers.
        assert_eq!(SHAPE.lora_params(8), 16_384);
        // saved = 640 + 64 + 384 + 56 + 2·4·32 = 1400 values per token and layer;
        // per token 2 × 2·1400 (bf16) + 4 × 2·1000 (f32 logits) = 13 600 bytes; × 32.
        let e = estimate(&SHAPE, 32, 8, 2, false);
        assert_eq!(e.per_sample_bytes, 435_200);
        // 200k bf16 weights + 16 384 × 16 + 256 MiB.
        assert_eq!(e.fixed_bytes, 400_000 + 262_144 + (256 << 20));
        // Checkpointing keeps 2·64 layer inputs + one layer: (2 × (128 + 1400) + 8000) × 32.
        assert_eq!(estimate(&SHAPE, 32, 8, 2, true).per_sample_bytes, 353_792);
        // In f32 the activations take 4 bytes: (4 × 2·1400 + 8000) × 32.
        assert_eq!(estimate(&SHAPE, 32, 8, 4, false).per_sample_bytes, 614_400);
    }

    #[test]
    fn the_batch_is_the_largest_divisor_that_fits() {
        let est = Estimate {
            fixed_bytes: 1_000,
            per_sample_bytes: 100,
        };
        // 9 000 usable of 10 000: (9000 - 1000) / 100 = 80 fit; 16 is asked for.
        assert_eq!(
            plan_batch(10_000, &est, 16),
            Ok(BatchPlan {
                micro_batch: 16,
                accumulation: 1
            })
        );
        // 1 500 usable: 5 fit; the largest divisor of 16 below that is 4 → 4 × 4.
        assert_eq!(
            plan_batch(1_667, &est, 16),
            Ok(BatchPlan {
                micro_batch: 4,
                accumulation: 4
            })
        );
        // 12 is asked for and 5 fit: 4 × 3.
        assert_eq!(
            plan_batch(1_667, &est, 12),
            Ok(BatchPlan {
                micro_batch: 4,
                accumulation: 3
            })
        );
        // Not even one sample: say how much one needs.
        assert_eq!(plan_batch(1_000, &est, 16), Err(1_100));
    }

    #[test]
    fn a_real_shape_needs_a_plausible_amount() {
        // Qwen2.5-0.5B: h 896, i 4864, 24 layers, 14 heads, kv 2×64, vocab 151 936.
        let qwen = Shape {
            hidden: 896,
            intermediate: 4864,
            layers: 24,
            heads: 14,
            kv_dim: 128,
            vocab: 151_936,
            params: 494_032_768,
        };
        let e = estimate(&qwen, 512, 16, 2, false);
        let one = (e.fixed_bytes + e.per_sample_bytes) as f64 / (1u64 << 30) as f64;
        // About 1.2 GiB of bf16 weights and LoRA state plus ~1.5 GiB of activations and
        // logits for one 512-token sample: what PyTorch + PEFT needs without checkpointing.
        assert!((2.0..3.5).contains(&one), "{one:.2} GiB");
        let plan = plan_batch(8 << 30, &e, 16).unwrap();
        assert!(
            plan.micro_batch >= 4 && plan.micro_batch * plan.accumulation == 16,
            "{plan:?}"
        );
    }
}
