//! A prepared session run to its end in its run folder: steps, evaluations,
//! checkpoints, the final adapter, and the events and metric lines that report them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::State;
use super::plan::effective_auto;
use super::prepare::Session;
use super::progress::Progress;
use super::step::Stepped;
use super::{CancelToken, RunSummary};
use crate::config::{BaseQuant, BatchSize};
use crate::error::Result;
use crate::event::{Event, EventSink, LogLevel};
use crate::lora::LoraSet;
use crate::model::CausalLm;
use crate::run::{MetricLine, RunDir, RunInfo, RunSink, RunStatus};

/// Writes a PEFT adapter folder whole: into a temporary folder beside `dir`, then
/// renamed onto it, so a kill between its two files never leaves an adapter without
/// its config (exports would then fail on a missing file).
pub(crate) fn write_adapter(lora: &LoraSet, dir: &Path, base_model: &str) -> Result<()> {
    crate::fsx::write_dir(dir, |tmp| lora.save_peft(tmp, base_model))
}

impl Session {
    pub(super) fn run(
        self,
        run: RunDir,
        mut info: RunInfo,
        checkpoint: Option<PathBuf>,
        face: &dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunSummary> {
        let config_text = std::fs::read_to_string(run.path().join("run.toml")).unwrap_or_default();
        let tracking =
            crate::track::Tracking::start(&self.config, run.path(), &config_text, info.step, face);
        let sink = RunSink {
            run: &run,
            inner: &tracking,
        };
        sink.emit(Event::Started {
            run_id: info.id.clone(),
            path: run.path().display().to_string(),
            total_steps: self.config.steps,
            start_step: info.step,
        });
        let result = self.run_inner(&run, &mut info, checkpoint, &sink, cancel);
        match &result {
            Ok(summary) => {
                info.status = summary.status;
                info.step = summary.steps;
            }
            Err(_) => info.status = RunStatus::Failed,
        }
        let written = run.write_info(&info);
        // The terminal event comes last, once run.json says how the run ended, so a face
        // that reacts to it (reload, resume) sees the final state.
        match (&result, &written) {
            (Ok(summary), Ok(())) if summary.status == RunStatus::Stopped => {
                sink.emit(Event::Stopped {
                    step: summary.steps,
                    path: run.path().display().to_string(),
                })
            }
            (Ok(summary), Ok(())) => sink.emit(Event::Finished {
                steps: summary.steps,
                final_loss: summary.final_loss,
                path: run.path().join("adapter").display().to_string(),
            }),
            (Err(e), _) | (Ok(_), Err(e)) => sink.emit(Event::Failed {
                error: e.to_string(),
                hint: e.hint(),
            }),
        }
        tracking.close();
        written?;
        result
    }

    fn run_inner(
        self,
        run: &RunDir,
        info: &mut RunInfo,
        checkpoint: Option<PathBuf>,
        sink: &dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunSummary> {
        let steps = self.config.steps;
        let (lora, opt, state) = self.load_or_init(run, checkpoint.as_deref(), sink)?;
        let model = self.load_model(info, &lora, sink)?;
        let trainable = lora.trainable_parameters();
        let total = self.model_config.parameter_count();
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: format!(
                "trainable parameters: {trainable} of {total} ({:.3}%)",
                100.0 * trainable as f64 / total as f64
            ),
        });
        let mut p = Progress::new(&self, lora, opt, state)?;
        let per_step = self.per_step();
        keep_saved_micro_batch(&mut p, per_step, sink);
        let clock = Clock::start(&p.state);
        let mut last_loss = None;
        let base_model = info.model_dir.display().to_string();
        let id = info.id.clone();
        let summary = |status, steps, final_loss| RunSummary {
            id: id.clone(),
            run_dir: run.path().to_path_buf(),
            status,
            steps,
            final_loss,
            trainable_params: trainable,
            total_params: total,
        };

        while p.state.step < steps {
            hold_while_paused(cancel, p.state.step, sink);
            if cancel.is_cancelled() {
                // A stop is only honoured with a checkpoint of where the run stands.
                save_checkpoint(run, None, &p, &base_model, sink)?;
                return Ok(summary(RunStatus::Stopped, p.state.step, last_loss));
            }
            let stepped = self.train_step(&model, &mut p, per_step, run, info, sink)?;
            last_loss = Some(stepped.loss);
            let elapsed = clock.elapsed_s();
            // Kept current, so a checkpoint written at a stop carries the time to it.
            p.state.elapsed_s = elapsed;
            let eta = clock.eta_s(p.state.step, steps);
            record_step(run, p.state.step, &stepped, elapsed, eta, sink)?;
            let last = p.state.step == steps;
            if self.eval_due(p.state.step, last) {
                self.evaluate(&model, run, p.state.step, sink)?;
            }
            if last || self.checkpoint_due(p.state.step) {
                save_checkpoint(run, Some(info), &p, &base_model, sink)?;
            }
        }
        write_adapter(&p.lora, &run.path().join("adapter"), &base_model)?;
        Ok(summary(RunStatus::Finished, p.state.step, last_loss))
    }

    /// The base model with `lora` applied, its rope tables long enough for the longest row.
    fn load_model(&self, info: &RunInfo, lora: &LoraSet, sink: &dyn EventSink) -> Result<CausalLm> {
        let max_len = self
            .train_rows
            .iter()
            .chain(&self.val_rows)
            .map(|r| r.input_ids.len())
            .max()
            .unwrap_or(1);
        let mut model = CausalLm::load_with(
            &info.model_dir,
            self.model_config.clone(),
            Some(lora),
            max_len,
            &self.device,
            self.base_quant,
            self.dtype,
        )?;
        model.set_recompute_layers(self.recompute_layers);
        model.set_products(self.products)?;
        if self.base_quant != BaseQuant::F32 {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!(
                    "frozen linears held as {}: {:.1} MiB",
                    self.base_storage,
                    model.linear_bytes() as f64 / (1u64 << 20) as f64
                ),
            });
        }
        Ok(model)
    }

    /// Rows per optimizer step: the effective batch.
    fn per_step(&self) -> usize {
        match self.config.batch_size {
            BatchSize::Fixed(n) => n as usize * self.config.gradient_accumulation as usize,
            BatchSize::Auto => effective_auto(&self.train_rows, &self.config),
        }
    }

    fn eval_due(&self, step: u64, last: bool) -> bool {
        let c = &self.config;
        !self.val_rows.is_empty()
            && ((c.eval_every > 0 && step.is_multiple_of(c.eval_every)) || last)
    }

    fn checkpoint_due(&self, step: u64) -> bool {
        let every = self.config.checkpoint_every;
        every > 0 && step.is_multiple_of(every)
    }

    /// The validation loss, as a metric line and an event.
    fn evaluate(
        &self,
        model: &CausalLm,
        run: &RunDir,
        step: u64,
        sink: &dyn EventSink,
    ) -> Result<()> {
        let eval_loss =
            super::batch::mean_loss(model, &self.val_rows, self.micro_batch, self.pad_id)?;
        run.append_metric(&MetricLine {
            step,
            loss: None,
            eval_loss: Some(eval_loss),
            lr: None,
            grad_norm: None,
            tokens: None,
            tokens_per_s: None,
            elapsed_s: None,
        })?;
        sink.emit(Event::Eval {
            step,
            loss: eval_loss,
        });
        Ok(())
    }
}

/// A resumed run keeps the checkpoint's micro-batch where it still divides the step:
/// after an out-of-memory back-off it is the size known to fit.
fn keep_saved_micro_batch(p: &mut Progress, per_step: usize, sink: &dyn EventSink) {
    if let Some(saved) = p.state.micro_batch {
        if saved != p.micro && saved > 0 && per_step.is_multiple_of(saved) {
            p.micro = saved;
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!(
                    "continuing with the checkpoint's micro-batch {saved} × accumulation {}",
                    per_step / saved
                ),
            });
        }
    }
}

/// Holds between steps while the thermal guard has paused the job.
fn hold_while_paused(cancel: &CancelToken, step: u64, sink: &dyn EventSink) {
    if cancel.is_paused() {
        sink.emit(Event::Log {
            level: LogLevel::Warn,
            message: format!(
                "paused before step {} (the GPU is too hot); training continues once it cools",
                step + 1
            ),
        });
        cancel.wait_while_paused();
        if !cancel.is_cancelled() {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: "resumed".into(),
            });
        }
    }
}

/// Saves a checkpoint and makes the metrics durable; with `info`, moves run.json's
/// step up to it too; then announces it.
fn save_checkpoint(
    run: &RunDir,
    info: Option<&mut RunInfo>,
    p: &Progress,
    base_model: &str,
    sink: &dyn EventSink,
) -> Result<()> {
    let path = p.save_checkpoint(run, base_model)?;
    run.sync_metrics()?;
    if let Some(info) = info {
        info.step = p.state.step;
        run.write_info(info)?;
    }
    sink.emit(Event::Checkpoint {
        step: p.state.step,
        path: path.display().to_string(),
    });
    Ok(())
}

fn record_step(
    run: &RunDir,
    step: u64,
    s: &Stepped,
    elapsed_s: f64,
    eta_s: f64,
    sink: &dyn EventSink,
) -> Result<()> {
    let tokens_per_s = s.tokens as f64 / s.seconds.max(1e-9);
    run.append_metric(&MetricLine {
        step,
        loss: Some(s.loss),
        eval_loss: None,
        lr: Some(s.lr),
        grad_norm: Some(s.grad_norm),
        tokens: Some(s.tokens),
        tokens_per_s: Some(tokens_per_s),
        elapsed_s: Some(elapsed_s),
    })?;
    sink.emit(Event::Step {
        run: 0,
        step,
        loss: s.loss,
        lr: s.lr,
        grad_norm: s.grad_norm,
        tokens_per_s,
        elapsed_s,
        eta_s,
    });
    Ok(())
}

/// Run time across sessions: a resumed run adds this session's time to what the
/// checkpoint saved, and estimates the rest from this session's pace alone.
struct Clock {
    started: Instant,
    before_s: f64,
    first_step: u64,
}

impl Clock {
    fn start(state: &State) -> Self {
        Clock {
            started: Instant::now(),
            before_s: state.elapsed_s,
            first_step: state.step,
        }
    }

    fn elapsed_s(&self) -> f64 {
        self.before_s + self.started.elapsed().as_secs_f64()
    }

    fn eta_s(&self, step: u64, steps: u64) -> f64 {
        let done_here = (step - self.first_step) as f64;
        self.started.elapsed().as_secs_f64() / done_here * (steps - step) as f64
    }
}
