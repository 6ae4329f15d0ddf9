//! Memory planning: which layers to checkpoint, and how many rows go through the model
//! at once so that micro-batch × accumulation stays the effective batch the user asked
//! for.

use super::batch::Row;
use crate::config::{BatchSize, GradientCheckpointing, TrainConfig};
use crate::event::{Event, EventSink, LogLevel};
use crate::gpu::memory::{self, Estimate};

/// Whether a candle error is the device (or the simulated limit) running out of memory.
/// Backtraces are left out of the search: with `RUST_BACKTRACE` set candle appends
/// one to the message, and a frame's function name could read as out of memory.
pub(super) fn is_out_of_memory(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    let text = match e {
        E::WithBacktrace { inner, .. } => return is_out_of_memory(inner),
        E::Context { inner, context } => {
            return is_out_of_memory(inner) || mentions_oom(&context.to_string())
        }
        E::WithPath { inner, .. } => return is_out_of_memory(inner),
        other => other.to_string(),
    };
    mentions_oom(&text)
}

fn mentions_oom(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["out of memory", "out_of_memory", "failed to allocate"]
        .iter()
        .any(|m| text.contains(m))
}

/// The largest divisor of `per_step` at most half of `micro`, so that micro-batch ×
/// accumulation stays the same effective batch.
pub(super) fn smaller_divisor(per_step: usize, micro: usize) -> Option<usize> {
    (1..=micro / 2).rev().find(|d| per_step.is_multiple_of(*d))
}

/// The effective batch under `batch_size = auto`: the token heuristic's micro-batch
/// times the accumulation the user asked for.
pub(super) fn effective_auto(rows: &[Row], config: &TrainConfig) -> usize {
    auto_batch(rows) * config.gradient_accumulation as usize
}

/// The micro-batch and accumulation for this run: the user's effective batch
/// (batch_size × gradient_accumulation) kept exactly, the micro-batch lowered to what
/// the memory estimate says fits. A fixed batch_size is never raised.
pub(super) fn plan_micro_batch(
    config: &TrainConfig,
    rows: &[Row],
    est: &Estimate,
    free: Option<u64>,
    sink: &dyn EventSink,
) -> (usize, usize) {
    let (cap, effective) = batch_request(config, rows);
    let Some(free) = free else {
        let micro = cap.min(effective);
        return (micro, effective / micro);
    };
    match memory::plan_batch(free, est, effective as u32) {
        Ok(plan) => {
            let micro = (plan.micro_batch as usize).min(cap);
            if micro < cap && matches!(config.batch_size, BatchSize::Fixed(_)) {
                sink.emit(Event::Log {
                    level: LogLevel::Warn,
                    message: format!(
                        "batch_size {cap} would need about {:.1} GiB of the {:.1} GiB free; using micro-batch {micro} × accumulation {} for the same effective batch",
                        gib(est.fixed_bytes + cap as u64 * est.per_sample_bytes),
                        gib(free),
                        effective / micro
                    ),
                });
            }
            (micro, effective / micro)
        }
        Err(need) => {
            sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!(
                    "one sample needs about {:.1} GiB and {:.1} GiB is free: this may run out of memory; lower max_seq_len or use base_quant = \"q4_k\" (QLoRA)",
                    gib(need),
                    gib(free)
                ),
            });
            (1, effective)
        }
    }
}

/// The largest micro-batch the batch settings allow, and the effective batch.
fn batch_request(config: &TrainConfig, rows: &[Row]) -> (usize, usize) {
    let acc = config.gradient_accumulation as usize;
    match config.batch_size {
        BatchSize::Fixed(n) => (n as usize, n as usize * acc),
        BatchSize::Auto => (effective_auto(rows, config), effective_auto(rows, config)),
    }
}

/// The micro-batch the run would use with unlimited memory.
pub(super) fn wanted_micro_batch(config: &TrainConfig, rows: &[Row]) -> usize {
    let (cap, effective) = batch_request(config, rows);
    cap.min(effective).max(1)
}

/// Decoder layers to checkpoint: none (`off`), all (`on`), or under `auto` the fewest
/// with which `micro` rows fit `free` by the estimate (the same 90 % rule as the batch
/// plan), all of them when even that is not enough (then the micro-batch is lowered
/// too), and none when the free memory is unknown. Recomputing costs time where
/// lowering the micro-batch of a GPU costs throughput too, so layers go first.
pub(super) fn plan_recompute(
    mode: GradientCheckpointing,
    layers: u64,
    micro: usize,
    free: Option<u64>,
    estimate_for: impl Fn(u64) -> Estimate,
) -> u64 {
    match (mode, free) {
        (GradientCheckpointing::Off, _) => 0,
        (GradientCheckpointing::On, _) => layers,
        (GradientCheckpointing::Auto, None) => 0,
        (GradientCheckpointing::Auto, Some(free)) => {
            let usable = memory::usable_bytes(free);
            (0..=layers)
                .find(|&c| {
                    let e = estimate_for(c);
                    e.fixed_bytes + micro as u64 * e.per_sample_bytes <= usable
                })
                .unwrap_or(layers)
        }
    }
}

pub(super) fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The micro-batch `auto` starts from: about 4096 tokens per micro-batch at the
/// 95th-percentile row length (`plan_micro_batch` then lowers it to what fits).
pub(super) fn auto_batch(rows: &[Row]) -> usize {
    let mut lens: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    lens.sort_unstable();
    let p95 = lens.get(lens.len() * 95 / 100).copied().unwrap_or(1).max(1);
    (4096 / p95).clamp(1, 16)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn rows(lens: &[usize]) -> Vec<Row> {
        lens.iter()
            .map(|&n| Row::single(vec![1; n], vec![1; n]))
            .collect()
    }

    fn config(batch_size: BatchSize, gradient_accumulation: u32) -> TrainConfig {
        TrainConfig {
            batch_size,
            gradient_accumulation,
            ..TrainConfig::default()
        }
    }

    /// The plan and the warnings it logged.
    fn plan(
        config: &TrainConfig,
        rows: &[Row],
        est: Estimate,
        free: Option<u64>,
    ) -> ((usize, usize), Vec<String>) {
        let seen = Mutex::new(Vec::new());
        let sink = |e: Event| seen.lock().unwrap().push(e);
        let planned = plan_micro_batch(config, rows, &est, free, &sink);
        let warnings = seen
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::Log {
                    level: LogLevel::Warn,
                    message,
                } => message,
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        (planned, warnings)
    }

    /// Built without `Error::msg`: under RUST_BACKTRACE its text carries a backtrace,
    /// and this test's own name would then read as out of memory.
    fn error(text: &str) -> candle_core::Error {
        candle_core::Error::Msg(text.into())
    }

    #[test]
    fn out_of_memory_is_recognised_in_any_case_and_spelling() {
        for text in [
            "out of memory: micro-batch 4 needs about 10 bytes (simulated limit 5)",
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "Metal: Failed to allocate buffer",
        ] {
            assert!(is_out_of_memory(&error(text)), "{text}");
        }
        for text in ["shape mismatch in matmul", "memory map failed"] {
            assert!(!is_out_of_memory(&error(text)), "{text}");
        }
    }

    #[test]
    fn a_backtrace_naming_out_of_memory_does_not_make_an_error_one() {
        // What RUST_BACKTRACE=1 gives: the backtrace is part of the error's text.
        std::env::set_var("RUST_BACKTRACE", "1");
        let e = error("shape mismatch").bt();
        // This test's own frame is in the backtrace, and its name says out_of_memory.
        assert!(e.to_string().contains("out_of_memory"), "{e}");
        assert!(!is_out_of_memory(&e));
        let wrapped = error("CUDA_ERROR_OUT_OF_MEMORY").bt().context("step 3");
        assert!(is_out_of_memory(&wrapped));
    }

    #[test]
    fn checkpointing_takes_the_fewest_layers_that_make_the_micro_batch_fit() {
        // 10 layers; each one recomputed saves 100 bytes per row.
        let est = |c: u64| Estimate {
            fixed_bytes: 1_000,
            per_sample_bytes: 100 * (10 - c) + 50,
        };
        use GradientCheckpointing::{Auto, Off, On};
        assert_eq!(plan_recompute(Off, 10, 4, Some(100), est), 0);
        assert_eq!(plan_recompute(On, 10, 4, Some(1 << 40), est), 10);
        assert_eq!(plan_recompute(Auto, 10, 4, None, est), 0);
        // Plenty of memory: nothing is recomputed.
        assert_eq!(plan_recompute(Auto, 10, 4, Some(1 << 30), est), 0);
        // 2 000 free, 1 800 usable: 1 000 + 4 × (100 × (10 − c) + 50) ≤ 1 800 → c ≥ 8.5.
        assert_eq!(plan_recompute(Auto, 10, 4, Some(2_000), est), 9);
        // Not enough even with every layer: all of them (the batch plan lowers the rest).
        assert_eq!(plan_recompute(Auto, 10, 4, Some(1_000), est), 10);
    }

    #[test]
    fn smaller_divisor_is_the_largest_divisor_up_to_half() {
        assert_eq!(smaller_divisor(8, 4), Some(2));
        assert_eq!(smaller_divisor(8, 8), Some(4));
        assert_eq!(smaller_divisor(6, 6), Some(3));
        assert_eq!(smaller_divisor(6, 4), Some(2));
        // Half of 5 rounds down to 2, which divides 12.
        assert_eq!(smaller_divisor(12, 5), Some(2));
        // A prime effective batch can only fall to 1.
        assert_eq!(smaller_divisor(7, 7), Some(1));
        assert_eq!(smaller_divisor(8, 1), None);
        assert_eq!(smaller_divisor(8, 0), None);
    }

    #[test]
    fn auto_batch_aims_at_4096_tokens_at_the_95th_percentile() {
        assert_eq!(auto_batch(&rows(&[256; 10])), 16);
        assert_eq!(auto_batch(&rows(&[512; 10])), 8);
        assert_eq!(auto_batch(&rows(&[1000; 10])), 4);
        assert_eq!(auto_batch(&rows(&[5000; 10])), 1);
        // Clamped to 16 however short the rows, and 16 with no rows at all.
        assert_eq!(auto_batch(&rows(&[10; 10])), 16);
        assert_eq!(auto_batch(&rows(&[0; 3])), 16);
        assert_eq!(auto_batch(&[]), 16);
        // Of 100 rows, index 95 of the sorted lengths decides: 5 long rows count...
        let mut lens = vec![100; 95];
        lens.extend([2048; 5]);
        assert_eq!(auto_batch(&rows(&lens)), 2);
        // ...4 do not.
        let mut lens = vec![100; 96];
        lens.extend([2048; 4]);
        assert_eq!(auto_batch(&rows(&lens)), 16);
        // With few rows the index lands on the longest.
        let mut lens = vec![100; 19];
        lens.push(2048);
        assert_eq!(auto_batch(&rows(&lens)), 2);
    }

    #[test]
    fn effective_auto_multiplies_by_the_accumulation() {
        let r = rows(&[512; 4]);
        assert_eq!(effective_auto(&r, &config(BatchSize::Auto, 1)), 8);
        assert_eq!(effective_auto(&r, &config(BatchSize::Auto, 3)), 24);
        // The fixed batch size plays no part.
        assert_eq!(effective_auto(&r, &config(BatchSize::Fixed(2), 3)), 24);
    }

    #[test]
    fn gib_is_binary() {
        assert_eq!(gib(0), 0.0);
        assert_eq!(gib(GIB), 1.0);
        assert_eq!(gib(3 * GIB / 2), 1.5);
    }

    #[test]
    fn without_a_free_figure_the_requested_batch_is_used() {
        let est = Estimate {
            fixed_bytes: 100 * GIB,
            per_sample_bytes: 100 * GIB,
        };
        let r = rows(&[512; 4]);
        assert_eq!(
            plan(&config(BatchSize::Fixed(4), 2), &r, est, None),
            ((4, 2), vec![])
        );
        // Under auto the whole effective batch is one micro-batch.
        assert_eq!(
            plan(&config(BatchSize::Auto, 2), &r, est, None),
            ((16, 1), vec![])
        );
    }

    #[test]
    fn a_fixed_batch_that_fits_is_kept_and_never_raised() {
        let est = Estimate {
            fixed_bytes: GIB,
            per_sample_bytes: GIB / 16,
        };
        let r = rows(&[512; 4]);
        assert_eq!(
            plan(&config(BatchSize::Fixed(4), 2), &r, est, Some(64 * GIB)),
            ((4, 2), vec![])
        );
    }

    #[test]
    fn a_fixed_batch_that_does_not_fit_is_split_with_a_warning() {
        let est = Estimate {
            fixed_bytes: GIB,
            per_sample_bytes: GIB,
        };
        // 90% of 5 GiB leaves room for 3 rows; the largest divisor of 8 up to 3 is 2.
        let (planned, warnings) = plan(
            &config(BatchSize::Fixed(8), 1),
            &rows(&[512; 4]),
            est,
            Some(5 * GIB),
        );
        assert_eq!(planned, (2, 4));
        assert_eq!(
            warnings,
            ["batch_size 8 would need about 9.0 GiB of the 5.0 GiB free; using micro-batch 2 × accumulation 4 for the same effective batch"]
        );
    }

    #[test]
    fn an_auto_batch_that_does_not_fit_is_split_quietly() {
        let est = Estimate {
            fixed_bytes: GIB,
            per_sample_bytes: GIB,
        };
        // auto_batch is 8 for 512-token rows; 3 rows fit, so 2 × 4.
        assert_eq!(
            plan(
                &config(BatchSize::Auto, 1),
                &rows(&[512; 4]),
                est,
                Some(5 * GIB)
            ),
            ((2, 4), vec![])
        );
    }

    #[test]
    fn when_one_row_does_not_fit_micro_batch_1_is_tried_with_a_warning() {
        let est = Estimate {
            fixed_bytes: GIB,
            per_sample_bytes: GIB,
        };
        let (planned, warnings) = plan(
            &config(BatchSize::Fixed(4), 2),
            &rows(&[512; 4]),
            est,
            Some(GIB),
        );
        assert_eq!(planned, (1, 8));
        assert_eq!(
            warnings,
            ["one sample needs about 2.0 GiB and 1.0 GiB is free: this may run out of memory; lower max_seq_len or use base_quant = \"q4_k\" (QLoRA)"]
        );
    }
}
