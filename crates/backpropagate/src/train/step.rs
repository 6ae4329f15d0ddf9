//! One optimizer step: forward and backward over the step's rows in micro-batches,
//! then gradient clipping and AdamW.

use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::batch::{self, Row};
use super::diagnose;
use super::optim::clip_grad_norm;
use super::plan::{is_out_of_memory, smaller_divisor};
use super::prepare::Session;
use super::progress::Progress;
use super::schedule::lr_at;
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::model::profile::{self, Part};
use crate::model::CausalLm;
use crate::run::{RunDir, RunInfo};

/// What one step did, for its metric line and event.
pub(super) struct Stepped {
    pub(super) loss: f64,
    pub(super) lr: f64,
    pub(super) grad_norm: f64,
    pub(super) tokens: u64,
    pub(super) seconds: f64,
}

impl Session {
    /// Trains on the next `per_step` rows of the data order and updates the adapter.
    pub(super) fn train_step(
        &self,
        model: &CausalLm,
        p: &mut Progress,
        per_step: usize,
        run: &RunDir,
        info: &RunInfo,
        sink: &dyn EventSink,
    ) -> Result<Stepped> {
        let c = &self.config;
        let t0 = Instant::now();
        let lr = lr_at(
            c.schedule.kind,
            c.learning_rate,
            p.state.step,
            c.schedule.warmup_steps,
            c.steps,
        );
        let indices = p.order.next_indices(per_step);
        let rows: Vec<&Row> = indices.iter().map(|&i| &self.train_rows[i]).collect();
        let total_targets: usize = rows.iter().map(|r| r.target_count()).sum();
        let tokens: u64 = rows.iter().map(|r| r.input_ids.len() as u64).sum();
        let (mut grads, loss_sum) =
            self.accumulate_backing_off(model, &rows, per_step, total_targets, p, run, sink)?;
        let loss = loss_sum / total_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(non_finite_loss(
                run.path(),
                loss,
                p.state.step + 1,
                c.learning_rate,
                diagnose::non_finite_weight(&info.model_dir, &p.lora),
            ));
        }
        let grad_norm = profile::timed(Part::Optimizer, || -> Result<f64> {
            let grad_norm = clip_grad_norm(&mut grads, c.optimizer.max_grad_norm);
            p.opt.step(&mut p.params, &grads, lr);
            for (param, var) in p.params.iter().zip(&p.vars) {
                var.set(&Tensor::from_slice(param, var.shape(), &self.device)?)?;
            }
            Ok(grad_norm)
        })?;
        p.state.step += 1;
        if profile::enabled() {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: profile::take_line(p.state.step),
            });
        }
        p.state.tokens_seen += tokens;
        Ok(Stepped {
            loss,
            lr,
            grad_norm,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// [`Session::accumulate`] at `p.micro`, retried on out of memory with a smaller
    /// micro-batch (which `p.micro` keeps from then on) and more accumulation. Each try
    /// starts from the same rows and the same RNG position, so the step means what it
    /// would have meant at the planned size.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_backing_off(
        &self,
        model: &CausalLm,
        rows: &[&Row],
        per_step: usize,
        total_targets: usize,
        p: &mut Progress,
        run: &RunDir,
        sink: &dyn EventSink,
    ) -> Result<(Vec<Vec<f32>>, f64)> {
        let rng_at_step = p.rng.clone();
        loop {
            match self.accumulate(model, rows, p.micro, total_targets, &p.vars, &mut p.rng) {
                Ok(done) => return Ok(done),
                Err(e) if is_out_of_memory(&e) => {
                    let micro = p.micro;
                    let Some(smaller) = smaller_divisor(per_step, micro) else {
                        return Err(Error::Run {
                            path: run.path().to_path_buf(),
                            message: format!(
                                "out of memory at step {} even with micro-batch 1 ({e}); lower max_seq_len (now {}), use base_quant = \"q4_k\" (QLoRA), or a smaller model",
                                p.state.step + 1,
                                self.config.max_seq_len
                            ),
                        });
                    };
                    sink.emit(Event::Log {
                        level: LogLevel::Warn,
                        message: format!(
                            "out of memory at step {} with micro-batch {micro}: continuing with micro-batch {smaller} × accumulation {} (same effective batch)",
                            p.state.step + 1,
                            per_step / smaller
                        ),
                    });
                    p.micro = smaller;
                    p.rng = rng_at_step.clone();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Forward and backward over one step's rows in micro-batches of `micro`; the
    /// gradients are summed (the loss is already divided by the step's target count).
    fn accumulate(
        &self,
        model: &CausalLm,
        rows: &[&Row],
        micro: usize,
        total_targets: usize,
        vars: &[Var],
        rng: &mut ChaCha8Rng,
    ) -> candle_core::Result<(Vec<Vec<f32>>, f64)> {
        let mut grads: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        let mut loss_sum = 0.0f64;
        let dropout = self.config.lora.dropout > 0.0;
        for chunk in rows.chunks(micro) {
            if let Some(limit) = self.memory_limit {
                let need =
                    self.estimate.fixed_bytes + chunk.len() as u64 * self.estimate.per_sample_bytes;
                if need > limit {
                    candle_core::bail!(
                        "out of memory: micro-batch {} needs about {need} bytes (simulated limit {limit})",
                        chunk.len()
                    );
                }
            }
            let batch = batch::build(chunk, self.pad_id, &self.device)?;
            if batch.target_count == 0 {
                continue;
            }
            let loss = profile::timed(Part::Forward, || {
                model.loss_sum(&batch, dropout.then_some(&mut *rng))
            })?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let store = profile::timed(Part::Backward, || {
                model.backward(&(loss / total_targets as f64)?)
            })?;
            for (g, var) in grads.iter_mut().zip(vars) {
                if let Some(t) = store.get(var.as_tensor()) {
                    let values = t.flatten_all()?.to_vec1::<f32>()?;
                    g.iter_mut().zip(values).for_each(|(a, b)| *a += b);
                }
            }
        }
        Ok((grads, loss_sum))
    }
}

/// The error for a NaN or infinite loss, blaming what is to blame: a non-finite weight
/// when there is one; else, at step 1 (before any update), not the learning rate.
fn non_finite_loss(run: &Path, loss: f64, step: u64, lr: f64, bad_weight: Option<String>) -> Error {
    let message = match bad_weight {
        Some(tensor) => format!(
            "loss became {loss} at step {step} because {tensor} is not finite; the model's weights are damaged (re-download or re-convert the model), this is not a learning-rate problem"
        ),
        None if step == 1 => format!(
            "loss became {loss} at step 1, before any update and with every weight finite: the forward pass overflowed; use precision = \"f32\" or check the model"
        ),
        None => format!("loss became {loss} at step {step}; lower the learning rate (now {lr})"),
    };
    Error::Run {
        path: run.to_path_buf(),
        message,
    }
}
