//! How much memory a LoRA training step needs, and the largest micro-batch that fits.
//!
//! ```text
//! bytes(micro) = fixed + micro × seq × per_token
//! fixed        = linear × weight_bits / 8              frozen linears (32 f32, 16 bf16/f16,
//!                                                      8.5 q8_0, 4.5 q4_k: QLoRA)
//!              + dense × a                             embeddings, LM head, norms, in the
//!                                                      compute dtype
//!              + lora_params × 16                      f32 weight, gradient, Adam m and v
//!              + 128 MiB + 256 MiB                     LM-head chunk; kernels, workspace,
//!                                                      allocator slack
//! per_token    = a × layers × saved                    activations kept for backward, in the
//!                                                      compute dtype (a = 2 in bf16/f16
//!                                                      mixed precision, 4 in f32)
//!              + a × h + 4                             the LM head's hidden-state gradient
//!                                                      and loss (its logits live a chunk
//!                                                      of rows at a time: 128 MiB fixed)
//! saved        = 10·h + 2·kv + 3·i + 7·r per layer      norms, q, attention and projection
//!                                                      outputs, residuals (10·h), k and v
//!                                                      (2·kv), gate/up/SiLU (3·i), the 7
//!                                                      LoRA A outputs (7·r)
//! + per sample   a × 8 × heads × min(128, seq) × seq   one block of query rows' attention
//!                                                      scores, recomputed in backward (no
//!                                                      layer keeps its scores)
//! with gradient checkpointing of c layers, each of those keeps only its input (h) and
//! one layer at a time is recomputed: layers × saved becomes (layers − c) × saved +
//! c × h + 3 × saved (the recomputed layer's graph and its gradients in flight; the
//! same on the fused CPU path, with its own `saved`). On a GPU an untied input
//! embedding stays in host memory and is left out of `dense`.
//! ```
//!
//! `h` hidden size, `i` MLP size, `kv` = kv_heads × head_dim, `r` LoRA rank. The batch
//! is then picked against the free memory with 10% headroom, as the largest divisor of
//! the requested effective batch that fits, so micro × accumulation is exactly that
//! batch.

use serde::Serialize;

use super::Picked;
use crate::config::BaseQuant;
use crate::model::ModelConfig;

/// The shapes the estimate depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    /// heads × head_dim (the hidden size in most models, not in Qwen3).
    pub q_dim: u64,
    pub kv_dim: u64,
    pub vocab: u64,
    pub params: u64,
    /// Parameters outside the seven projections (embeddings, LM head, norms): held
    /// in the compute dtype whatever the base storage.
    pub dense_params: u64,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Shape {
        Shape {
            hidden: c.hidden_size as u64,
            intermediate: c.intermediate_size as u64,
            layers: c.num_layers as u64,
            heads: c.num_heads as u64,
            q_dim: (c.num_heads * c.head_dim) as u64,
            kv_dim: (c.num_kv_heads * c.head_dim) as u64,
            vocab: c.vocab_size as u64,
            params: c.parameter_count() as u64,
            dense_params: (c.parameter_count() - c.num_layers * linear_per_layer(c)) as u64,
        }
    }

    /// The shape as a GPU run holds it: the input embedding stays in host memory
    /// (`CausalLm` keeps it there) and takes no device memory, unless it is needed on
    /// the device (a tied LM head multiplies by it, or the run is on the CPU).
    pub fn with_host_embedding(mut self, needed_on_device: bool) -> Shape {
        if !needed_on_device {
            self.dense_params = self.dense_params.saturating_sub(self.vocab * self.hidden);
        }
        self
    }

    /// LoRA parameters for rank `r` on all seven projections.
    pub fn lora_params(&self, r: u64) -> u64 {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_dim);
        let per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h);
        self.layers * r * per_layer
    }
}

/// Weights in one layer's seven projections.
fn linear_per_layer(c: &ModelConfig) -> usize {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    h * q + 2 * h * kv + q * h + 3 * h * i
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub fixed_bytes: u64,
    pub per_sample_bytes: u64,
}

const WORKSPACE: u64 = 256 << 20;

/// Bits per frozen weight for a base storage (QLoRA block formats include their
/// scales: q8_0 is 34 bytes per 32 weights, q4_K 144 per 256).
pub fn weight_bits(quant: BaseQuant) -> f64 {
    match quant {
        BaseQuant::Auto | BaseQuant::F32 => 32.0,
        BaseQuant::Q8_0 => 8.5,
        BaseQuant::Q4K => 4.5,
    }
}

pub fn estimate(
    shape: &Shape,
    seq: u64,
    lora_r: u64,
    weight_bits: f64,
    activation_bytes: u64,
    recomputed: u64,
) -> Estimate {
    let s = shape;
    let saved = 10 * s.hidden + 2 * s.kv_dim + 3 * s.intermediate + 7 * lora_r;
    let kept = kept_per_token(s, saved, recomputed, s.hidden, 0);
    // The LM head runs a chunk of rows at a time (`ChunkedLmLossAny`): per token only
    // its hidden-state gradient and loss are kept.
    let per_token = activation_bytes * (kept + s.hidden) + 4;
    // Attention keeps no scores (`model/attention_any.rs`); while one block of query
    // rows is computed or recomputed, its scores exist in ATTENTION_COPIES forms.
    let block = seq.min(ATTENTION_BLOCK_ROWS);
    let attention_block = activation_bytes * ATTENTION_COPIES * s.heads * block * seq;
    Estimate {
        fixed_bytes: ((s.params - s.dense_params) as f64 * weight_bits / 8.0).ceil() as u64
            + s.dense_params * activation_bytes
            + s.lora_params(lora_r) * 16
            + LM_HEAD_CHUNK_ANY
            + WORKSPACE,
        per_sample_bytes: seq * per_token + attention_block,
    }
}

/// Query rows per block of the basic-op attention (`model/attention_any.rs`).
const ATTENTION_BLOCK_ROWS: u64 = 128;

/// Score-sized tensors alive at once while a block's attention is recomputed and
/// differentiated (scores, scaled, masked, exponentials, probabilities and their
/// gradients).
const ATTENTION_COPIES: u64 = 8;

/// Saved sets alive while a checkpointed layer is recomputed and differentiated: its
/// graph plus the gradients in flight. Measured on SmolLM2-135M with every layer
/// checkpointed, fused ops: peak RSS 0.91× (1024 tokens), 0.98× (2048), 1.02× (4096)
/// of the plan with 3; the basic-op path 0.89× and 1.12× at 1024 and 2048.
const RECOMPUTE_LIVE: u64 = 3;

/// Values kept per token across the layers: `saved` for each layer that is not
/// recomputed, `checkpoint` for each that is (its input, h, and on the fused path its
/// attention output), plus the one layer being recomputed (or `backward_extra` layers
/// of backward work when none is).
fn kept_per_token(
    s: &Shape,
    saved: u64,
    recomputed: u64,
    checkpoint: u64,
    backward_extra: u64,
) -> u64 {
    let c = recomputed.min(s.layers);
    let live = if c > 0 {
        RECOMPUTE_LIVE
    } else {
        backward_extra
    };
    (s.layers - c) * saved + c * checkpoint + live * saved
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchPlan {
    pub micro_batch: u32,
    pub accumulation: u32,
}

/// What may be planned into `free` bytes: 90 %, the headroom every plan keeps.
pub fn usable_bytes(free: u64) -> u64 {
    free / 10 * 9
}

/// The plan for `effective` samples per optimizer step within `free_bytes`, or the
/// bytes a single sample would need when even that does not fit.
pub fn plan_batch(free_bytes: u64, est: &Estimate, effective: u32) -> Result<BatchPlan, u64> {
    let usable = usable_bytes(free_bytes);
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

/// Memory free for training on `device`: the GPU's free VRAM (NVML), or on the CPU
/// the memory the OS says is available; None where it cannot be known.
pub fn available_bytes(device: &Picked) -> Option<u64> {
    if let Some(index) = device.cuda_index() {
        return super::monitor::free_bytes(index);
    }
    if device.device.is_cpu() {
        return system_available();
    }
    None
}

#[cfg(target_os = "linux")]
fn system_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

#[cfg(not(target_os = "linux"))]
fn system_available() -> Option<u64> {
    None
}

/// `MemAvailable` in bytes from /proc/meminfo's text.
fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The estimate for the fused CPU path (f32 compute, `model/lora_op.rs` and friends),
/// from the tensors it really keeps for backward, per token and layer: the layer input,
/// both norm outputs, the mid-layer residual and the three projection outputs into the
/// residual stream (6·h), q before and after rotation plus the attention output (3·q),
/// k before and after rotation and v (3·kv), gate, up and their product (3·i), and one
/// log-sum-exp per head. Padding takes nothing (only real tokens are computed), no
/// attention scores are kept, and the LM head holds one 16 MiB chunk of logits plus two
/// hidden-size rows per token; backward adds about one layer's worth at a time, plus
/// one linear's backward workspace (its input gradient, its dropped-out input and the
/// LoRA term through the mask: 3 rows of the widest input).
/// `linear_bits` is 16 for a bf16/f16 checkpoint, whose linears stay in 16 bits.
/// `recomputed`: layers under gradient checkpointing (their input kept instead, and
/// their attention output and log-sum-exps: `model/attention_op.rs`, `KeptAttention`).
/// `bf16_products`: the LM head is also held packed in bf16, once per orientation.
pub fn estimate_fused(
    shape: &Shape,
    seq: u64,
    lora_r: u64,
    linear_bits: f64,
    recomputed: u64,
    bf16_products: bool,
) -> Estimate {
    let s = shape;
    let saved = 6 * s.hidden + 3 * s.q_dim + 3 * s.kv_dim + 3 * s.intermediate + s.heads;
    let workspace = 3 * s.intermediate.max(s.hidden);
    let checkpoint = s.hidden + s.q_dim + s.heads;
    let per_token =
        4 * (kept_per_token(s, saved, recomputed, checkpoint, 1) + 4 * s.hidden + workspace);
    Estimate {
        fixed_bytes: ((s.params - s.dense_params) as f64 * linear_bits / 8.0).ceil() as u64
            + s.dense_params * 4
            + s.lora_params(lora_r) * 16
            + LM_HEAD_CHUNK
            + CPU_WORKSPACE
            + if bf16_products {
                2 * 2 * s.vocab * s.hidden
            } else {
                0
            },
        per_sample_bytes: seq * per_token,
    }
}

/// The LM-head chunk on other devices: 8 Mi logits in the compute dtype, their f32
/// copy, softmax and gradient (`model/lm_loss.rs`), in bytes.
const LM_HEAD_CHUNK_ANY: u64 = (1 << 23) * 16;

/// The fused LM head's logits chunk and its softmax, in bytes.
const LM_HEAD_CHUNK: u64 = 2 * (16 << 20);

/// The process itself on the CPU path: binary, tokenizer, data, allocator slack
/// (measured 70–100 MiB; no GPU kernels or cuBLAS workspace).
const CPU_WORKSPACE: u64 = 96 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        q_dim: 64,
        kv_dim: 32,
        vocab: 1000,
        params: 200_000,
        dense_params: 0,
    };

    #[test]
    fn the_formula_gives_the_hand_computed_numbers() {
        // LoRA r8: per layer 8 × (128 + 2·96 + 128 + 2·192 + 192) = 8192; two layers.
        assert_eq!(SHAPE.lora_params(8), 16_384);
        // saved = 640 + 64 + 384 + 56 = 1144 values per token and layer; per token
        // 2 × (2·1144 + 64) (bf16, with the LM head's gradient row) + 4 (its loss) =
        // 4 708 bytes; × 32, plus one attention block: 2 × 8 × 4 heads × 32 × 32.
        let e = estimate(&SHAPE, 32, 8, 16.0, 2, 0);
        assert_eq!(e.per_sample_bytes, 150_656 + 65_536);
        // 200k bf16 weights + 16 384 × 16 + the LM-head chunk + 256 MiB.
        assert_eq!(e.fixed_bytes, 400_000 + 262_144 + (128 << 20) + (256 << 20));
        // Checkpointing keeps 2·64 layer inputs + three saved sets of the recomputed
        // layer: (2 × (128 + 3·1144 + 64) + 4) × 32.
        assert_eq!(
            estimate(&SHAPE, 32, 8, 16.0, 2, 2).per_sample_bytes,
            232_064 + 65_536
        );
        // In f32 the activations take 4 bytes: (4 × (2·1144 + 64) + 4) × 32 + 4 × 32 768.
        assert_eq!(
            estimate(&SHAPE, 32, 8, 32.0, 4, 0).per_sample_bytes,
            301_184 + 131_072
        );
        // QLoRA q4_k: 200 000 × 4.5 / 8 = 112 500 bytes of base weights.
        assert_eq!(
            estimate(&SHAPE, 32, 8, weight_bits(BaseQuant::Q4K), 4, 0).fixed_bytes,
            112_500 + 262_144 + (128 << 20) + (256 << 20)
        );
    }

    #[test]
    fn the_fused_estimate_gives_the_hand_computed_numbers() {
        // saved = 6·64 + 3·64 + 3·32 + 3·128 + 4 = 1060; per token 4 × (3 × 1060 + 256
        // + 3 · 128 of one linear's backward workspace).
        let e = estimate_fused(&SHAPE, 32, 8, 16.0, 0, false);
        assert_eq!(e.per_sample_bytes, 32 * 4 * (3 * 1060 + 256 + 384));
        // 200k 16-bit weights + 16 384 × 16 + the logits chunk + 96 MiB.
        assert_eq!(e.fixed_bytes, 400_000 + 262_144 + (32 << 20) + (96 << 20));
        // One of the two layers recomputed: it keeps its input (64) and its attention
        // output and log-sum-exps (64 + 4), the other layer its saved set, and three
        // saved sets are live while it is recomputed.
        let one = estimate_fused(&SHAPE, 32, 8, 16.0, 1, false);
        assert_eq!(
            one.per_sample_bytes,
            32 * 4 * (1060 + 132 + 3 * 1060 + 256 + 384)
        );
        let all = estimate_fused(&SHAPE, 32, 8, 16.0, 2, false);
        assert_eq!(
            all.per_sample_bytes,
            32 * 4 * (2 * 132 + 3 * 1060 + 256 + 384)
        );
        assert_eq!(all.fixed_bytes, e.fixed_bytes);
        // bf16 products add the LM head packed twice in bf16: 2 × 2 × 1000 × 64.
        let bf16 = estimate_fused(&SHAPE, 32, 8, 16.0, 0, true);
        assert_eq!(bf16.fixed_bytes, e.fixed_bytes + 256_000);
        assert_eq!(bf16.per_sample_bytes, e.per_sample_bytes);
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
            q_dim: 896,
            kv_dim: 128,
            vocab: 151_936,
            params: 494_032_768,
            dense_params: 136_178_560,
        };
        let e = estimate(&qwen, 512, 16, 16.0, 2, 0);
        let one = (e.fixed_bytes + e.per_sample_bytes) as f64 / (1u64 << 30) as f64;
        // About 1.2 GiB of weights (bf16 linears, f32 embeddings) and LoRA state, the
        // LM-head chunk and workspace, plus ~0.5 GiB of activations for one 512-token
        // sample (no attention scores or vocabulary-sized logits are kept).
        assert!((1.5..3.0).contains(&one), "{one:.2} GiB");
        let plan = plan_batch(8 << 30, &e, 16).unwrap();
        assert!(
            plan.micro_batch >= 2 && plan.micro_batch * plan.accumulation == 16,
            "{plan:?}"
        );
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(20_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    /// The configs of the three most fine-tuned 7–8B models, as their repos ship them.
    const QWEN25_7B: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2",
        "hidden_size":3584,"intermediate_size":18944,"num_hidden_layers":28,
        "num_attention_heads":28,"num_key_value_heads":4,"vocab_size":152064,
        "max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","hidden_act":"silu"}"#;
    const LLAMA31_8B: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
        "hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
        "max_position_embeddings":131072,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","hidden_act":"silu"}"#;
    const MISTRAL_7B_V03: &str = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral",
        "hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":32768,
        "max_position_embeddings":32768,"rms_norm_eps":1e-5,"rope_theta":1000000.0,
        "sliding_window":null,"tie_word_embeddings":false,"torch_dtype":"bfloat16",
        "hidden_act":"silu"}"#;

    /// QLoRA (q4_k base, bf16 compute) at 2048 tokens, batch 1, r16 on the 7
    /// projections, with every layer checkpointed: the plan fits an 8 GiB card for each
    /// (without checkpointing it would not).
    #[test]
    fn seven_and_eight_b_qlora_at_2048_tokens_plan_within_8_gib_with_checkpointing() {
        for (name, json) in [
            ("Qwen2.5-7B", QWEN25_7B),
            ("Llama-3.1-8B", LLAMA31_8B),
            ("Mistral-7B-v0.3", MISTRAL_7B_V03),
        ] {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let c = ModelConfig::from_json(&v, std::path::Path::new(name)).unwrap();
            let shape = Shape::of(&c).with_host_embedding(c.tie_word_embeddings);
            let peak = |recomputed| {
                let e = estimate(&shape, 2048, 16, weight_bits(BaseQuant::Q4K), 2, recomputed);
                (e.fixed_bytes + e.per_sample_bytes) as f64 / (1u64 << 30) as f64
            };
            let (all, none) = (peak(shape.layers), peak(0));
            eprintln!("{name}: {all:.2} GiB with checkpointing, {none:.2} GiB without");
            assert!(all <= 8.0, "{name}: {all:.2} GiB with checkpointing");
            assert!(none > 8.0, "{name}: {none:.2} GiB without checkpointing");
        }
    }

    /// A 7B model needs QLoRA on a 12 GB card: in f32 the weights alone do not fit; in
    /// q4_k one 512-token sample does.
    #[test]
    fn qlora_makes_a_7b_model_fit_a_12_gb_card() {
        // Qwen2.5-7B: h 3584, i 18944, 28 layers, 28 heads, kv 4×128, vocab 152 064.
        let qwen7 = Shape {
            hidden: 3584,
            intermediate: 18_944,
            layers: 28,
            heads: 28,
            q_dim: 3584,
            kv_dim: 512,
            vocab: 152_064,
            params: 7_615_616_512,
            // Untied embeddings and head, 2 × 152 064 × 3584, plus norms.
            dense_params: 1_090_199_040,
        };
        let free = 11u64 << 30;
        let f32_est = estimate(&qwen7, 512, 16, weight_bits(BaseQuant::F32), 4, 0);
        assert!(plan_batch(free, &f32_est, 8).is_err());
        let q4 = estimate(&qwen7, 512, 16, weight_bits(BaseQuant::Q4K), 2, 28);
        let plan = plan_batch(free, &q4, 8).unwrap();
        assert_eq!(plan.micro_batch * plan.accumulation, 8, "{plan:?}");
    }
}
