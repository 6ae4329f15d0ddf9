//! Everything decided before a run writes anything: the model's architecture, the
//! device and precision, the tokenized rows and the memory plan. A bad model, data
//! set or option fails here, so no run folder is left behind for it.

use candle_core::{DType, Device};

use super::batch::Row;
use super::plan::{plan_micro_batch, plan_recompute, wanted_micro_batch};
use crate::config::{BaseQuant, GradientCheckpointing, Precision, TrainConfig};
use crate::data::{pack, prepare, split, EncodeOptions, Encoded, PrepareOptions};
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::gpu::memory::{self, Estimate};
use crate::model::blas_bf16::{self, Products};
use crate::model::{CausalLm, ModelConfig};
use crate::run::RunInfo;

/// Everything prepared for training, before any file is written.
pub(super) struct Session {
    pub(super) config: TrainConfig,
    pub(super) model_config: ModelConfig,
    pub(super) train_rows: Vec<Row>,
    pub(super) val_rows: Vec<Row>,
    pub(super) micro_batch: usize,
    pub(super) pad_id: u32,
    pub(super) device: Device,
    pub(super) base_quant: BaseQuant,
    /// How the frozen linears are held, in words (`f32`, `q4_k`, `the GGUF's own q4_k,
    /// q6_k blocks`), for the plan and the log.
    pub(super) base_storage: String,
    pub(super) dtype: DType,
    /// The CPU's frozen-weight products (bf16 for `precision = "bf16"` on the CPU).
    pub(super) products: Products,
    pub(super) estimate: Estimate,
    pub(super) memory_limit: Option<u64>,
    /// Decoder layers under gradient checkpointing (from the first).
    pub(super) recompute_layers: usize,
    /// What the plan was made with and for, for `Trainer::plan`.
    pub(super) accumulation: usize,
    pub(super) free_bytes: Option<u64>,
    pub(super) device_label: String,
    pub(super) longest_row: usize,
}

impl Session {
    pub(super) fn prepare(
        config: &TrainConfig,
        info: &RunInfo,
        sink: &dyn EventSink,
        memory_limit: Option<u64>,
    ) -> Result<Self> {
        crate::gguf_base::ensure_base(&info.model_dir, &config.model, sink)?;
        let model_config = ModelConfig::load(
            &crate::model_dir::ModelDir::open(&info.model_dir)?
                .require("config.json", "the model architecture")?,
        )?;
        CausalLm::validate(&info.model_dir, &model_config)?;
        let picked = crate::gpu::pick(&config.device)?;
        match &picked.notice {
            Some(notice) => sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: notice.clone(),
            }),
            None => sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!("training on {}", picked.label),
            }),
        }
        let (base_quant, blocks) = base_quant(config, info, sink)?;
        let base_storage = match (&blocks, base_quant) {
            (Some(b), BaseQuant::Auto) => format!("the GGUF's own {} blocks", b.types),
            (_, BaseQuant::Q8_0) => "q8_0".into(),
            (_, BaseQuant::Q4K) => "q4_k".into(),
            _ => "f32".into(),
        };
        let block_bits = blocks.as_ref().map(|b| b.bits);
        let (dtype, products) = compute(config, &picked.device, blas_bf16::supported(), sink)?;
        let (train_rows, val_rows) = rows(config, info, sink)?;
        let seq = train_rows
            .iter()
            .chain(&val_rows)
            .map(|r| r.input_ids.len())
            .max()
            .unwrap_or(1);
        let estimate_for = |recomputed: u64| {
            estimate(
                config,
                &model_config,
                &picked.device,
                (base_quant, block_bits),
                (dtype, products),
                seq,
                recomputed,
            )
        };
        let free = memory::available_bytes(&picked);
        let layers = model_config.num_layers as u64;
        let mut recompute_layers = plan_recompute(
            config.gradient_checkpointing,
            layers,
            wanted_micro_batch(config, &train_rows),
            free,
            estimate_for,
        );
        if recompute_layers > 0 && !crate::model::recompute_supported(&picked.device) {
            sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!(
                    "gradient checkpointing runs on the CPU and CUDA only; training on {} without it",
                    picked.label
                ),
            });
            recompute_layers = 0;
        }
        if recompute_layers > 0 {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!(
                    "gradient checkpointing: {recompute_layers} of {layers} layers recomputed in backward ({})",
                    match config.gradient_checkpointing {
                        GradientCheckpointing::On => "gradient_checkpointing = on",
                        _ => "auto: what the memory plan needs",
                    }
                ),
            });
        }
        let estimate = estimate_for(recompute_layers);
        let (micro_batch, accumulation) =
            plan_micro_batch(config, &train_rows, &estimate, free, sink);
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: format!(
                "{} training rows, {} validation rows, micro-batch {} × accumulation {}",
                train_rows.len(),
                val_rows.len(),
                micro_batch,
                accumulation
            ),
        });
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: format!(
                "memory plan: about {:.0} MiB at micro-batch {micro_batch} ({:.0} MiB fixed + {:.1} MiB per row of up to {seq} tokens)",
                mib(estimate.fixed_bytes + micro_batch as u64 * estimate.per_sample_bytes),
                mib(estimate.fixed_bytes),
                mib(estimate.per_sample_bytes),
            ),
        });
        Ok(Session {
            config: config.clone(),
            model_config,
            train_rows,
            val_rows,
            micro_batch,
            pad_id: 0,
            device: picked.device,
            base_quant,
            base_storage,
            dtype,
            products,
            estimate,
            memory_limit,
            recompute_layers: recompute_layers as usize,
            accumulation,
            free_bytes: free,
            device_label: picked.label.clone(),
            longest_row: seq,
        })
    }
}

/// The ggml blocks a GGUF base's linears are kept in.
struct StoredBlocks {
    /// Bits per weight over the quantized linears, scales included.
    bits: f64,
    /// Their types, most weights first (`q4_k, q6_k`).
    types: String,
}

/// `auto` holds a bitsandbytes 4-bit checkpoint as q4_k, since its linears exist
/// only quantized; a GGUF base's quantized linears as the file stores them (QLoRA on
/// the file's own blocks: `auto` stays `auto`, read by `Weights::frozen`); anything
/// else as f32.
fn base_quant(
    config: &TrainConfig,
    info: &RunInfo,
    sink: &dyn EventSink,
) -> Result<(BaseQuant, Option<StoredBlocks>)> {
    let weights = crate::model::Weights::open(&info.model_dir, DType::F32, &Device::Cpu)?;
    let blocks = stored_blocks(&weights);
    Ok(match (config.base_quant, blocks) {
        (BaseQuant::Auto, _) if weights.has_nf4() => {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: "bitsandbytes 4-bit checkpoint: its linears are dequantized and held as q4_k (QLoRA)".into(),
            });
            (BaseQuant::Q4K, None)
        }
        (BaseQuant::Auto, Some(b)) => {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!(
                    "GGUF base: its quantized linears are trained on as the file stores them ({}, {:.2} bits per weight; QLoRA without requantizing); base_quant = \"f32\" dequantizes them instead",
                    b.types, b.bits
                ),
            });
            (BaseQuant::Auto, Some(b))
        }
        (BaseQuant::Auto, None) => (BaseQuant::F32, None),
        (q, _) => (q, None),
    })
}

/// The block types and average width of the linears a GGUF base keeps in blocks
/// (the embedding is decoded at load, so it is not counted).
fn stored_blocks(weights: &crate::model::Weights) -> Option<StoredBlocks> {
    let per_type = weights.linear_block_types();
    let total: u64 = per_type.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let bits: f64 = per_type.iter().map(|(t, n)| t.bits() * *n as f64).sum();
    Some(StoredBlocks {
        bits: bits / total as f64,
        types: per_type
            .iter()
            .map(|(t, _)| t.name())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The activations' dtype and the CPU's frozen-weight products for `precision`.
/// bf16 on a GPU is mixed precision (bf16 activations); on the CPU the activations
/// stay f32 and the products with frozen weights round both operands to bf16, which
/// needs AVX512-BF16 (`cpu_bf16`): without it the run is refused, never slowed down
/// by an emulation.
pub(super) fn compute(
    config: &TrainConfig,
    device: &Device,
    cpu_bf16: bool,
    sink: &dyn EventSink,
) -> Result<(DType, Products)> {
    let bf16 = match config.precision {
        Precision::F32 => false,
        Precision::Bf16 => true,
        Precision::Auto => !device.is_cpu(),
    };
    if !bf16 {
        return Ok((DType::F32, Products::F32));
    }
    if device.is_cpu() {
        if !cpu_bf16 {
            return Err(Error::InvalidOption(crate::model::CPU_BF16_REFUSAL.into()));
        }
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: "bf16 on the CPU (AVX512-BF16): products with the frozen weights and the LM head round both operands to bf16 and sum in f32; LoRA weights, their products and gradients, attention and the optimizer stay f32".into(),
        });
        return Ok((DType::F32, Products::Bf16));
    }
    sink.emit(Event::Log {
        level: LogLevel::Info,
        message:
            "mixed precision: bf16 activations and frozen weights, f32 LoRA weights and optimizer"
                .into(),
    });
    Ok((DType::BF16, Products::F32))
}

/// The training and validation rows, from the samples that have a token to train on.
fn rows(
    config: &TrainConfig,
    info: &RunInfo,
    sink: &dyn EventSink,
) -> Result<(Vec<Row>, Vec<Row>)> {
    let options = PrepareOptions {
        encode: EncodeOptions {
            max_seq_len: config.max_seq_len,
            train_on: config.train_on,
        },
        ..PrepareOptions::default()
    };
    sink.emit(Event::Progress {
        stage: "tokenize".into(),
        done: 0,
        total: 1,
    });
    let prepared = prepare(&info.data, &info.model_dir, &options)?;
    sink.emit(Event::Progress {
        stage: "tokenize".into(),
        done: 1,
        total: 1,
    });
    for w in &prepared.warnings {
        sink.emit(Event::Log {
            level: LogLevel::Warn,
            message: w.to_string(),
        });
    }
    let usable: Vec<_> = prepared
        .encoded
        .iter()
        .filter(|e| {
            e.labels
                .iter()
                .skip(1)
                .any(|&l| l != crate::data::IGNORE_INDEX)
        })
        .cloned()
        .collect();
    if usable.is_empty() {
        return Err(Error::Run {
            path: info.data.clone(),
            message: "no sample has a token to train on (raise max_seq_len, or check the data)"
                .into(),
        });
    }
    let parts = split(usable.len(), config.val_ratio, config.seed).map_err(Error::InvalidOption)?;
    let pick = |idx: &[usize]| idx.iter().map(|&i| usable[i].clone()).collect::<Vec<_>>();
    let (train, val) = (pick(&parts.train), pick(&parts.val));
    let to_rows = |samples: Vec<Encoded>| -> Vec<Row> {
        if config.packing {
            pack(&samples, config.max_seq_len)
                .into_iter()
                .map(Row::from)
                .filter(|r| r.target_count() > 0)
                .collect()
        } else {
            samples.iter().map(Row::from).collect()
        }
    };
    Ok((to_rows(train), to_rows(val)))
}

/// The memory a run needs for rows of up to `seq` tokens. The fused CPU path keeps
/// other tensors for backward than candle's autograd does, so it has its own estimate.
fn estimate(
    config: &TrainConfig,
    model_config: &ModelConfig,
    device: &Device,
    (base_quant, block_bits): (BaseQuant, Option<f64>),
    (dtype, products): (DType, Products),
    seq: usize,
    recomputed: u64,
) -> Estimate {
    let (weight_bits, activation_bytes) = match (base_quant, dtype) {
        (BaseQuant::Auto, DType::BF16) => (block_bits.unwrap_or(16.0), 2),
        (BaseQuant::Auto, _) => (block_bits.unwrap_or(32.0), 4),
        (BaseQuant::F32, DType::BF16) => (16.0, 2),
        (q, DType::BF16) => (memory::weight_bits(q), 2),
        (q, _) => (memory::weight_bits(q), 4),
    };
    let fused = device.is_cpu() && dtype == DType::F32 && crate::model::fused_ops_enabled();
    if fused {
        // A bf16/f16 checkpoint's dense linears stay in 16 bits on this path.
        let half = base_quant == BaseQuant::F32
            && block_bits.is_none()
            && matches!(
                model_config.torch_dtype.as_deref(),
                Some("bfloat16" | "float16")
            );
        let bf16 = products == Products::Bf16;
        memory::estimate_fused(
            &memory::Shape::of(model_config),
            seq as u64,
            config.lora.r as u64,
            if half || bf16 { 16.0 } else { weight_bits },
            recomputed,
            bf16,
        )
    } else {
        memory::estimate(
            &memory::Shape::of(model_config)
                .with_host_embedding(!crate::model::embedding_on_host(device, model_config)),
            seq as u64,
            config.lora.r as u64,
            weight_bits,
            activation_bytes,
            recomputed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Silent;

    /// bf16 on the CPU: f32 activations with bf16 products where the CPU has
    /// AVX512-BF16, refused (saying what to use instead) where it has not; auto is
    /// f32 on the CPU and bf16 mixed precision on a GPU-like device.
    #[test]
    fn precision_picks_activations_and_products() {
        let mut config = TrainConfig::default();
        let cpu = Device::Cpu;
        config.precision = Precision::Bf16;
        let got = compute(&config, &cpu, true, &Silent).unwrap();
        assert_eq!(got, (DType::F32, Products::Bf16));
        let err = compute(&config, &cpu, false, &Silent)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AVX512-BF16") && err.contains("precision = \"f32\""),
            "{err}"
        );
        for p in [Precision::Auto, Precision::F32] {
            config.precision = p;
            assert_eq!(
                compute(&config, &cpu, false, &Silent).unwrap(),
                (DType::F32, Products::F32)
            );
        }
    }
}
