//! The LoRA trainer: data → rows → forward/backward on the frozen base with LoRA →
//! AdamW → metrics, events and checkpoints in a run directory; resumable from any
//! checkpoint with the same losses as an uninterrupted run (same device and threads).
//!
//! ```no_run
//! use backpropagate::train::Trainer;
//! let summary = Trainer::new("models/qwen2").lora_r(16).train("data.jsonl", 60)?;
//! println!("adapter in {}", summary.run_dir.join("adapter").display());
//! summary.push_to_ollama("my-model")?; // then: ollama run my-model
//! # Ok::<(), backpropagate::Error>(())
//! ```

pub mod batch;
mod checkpoint;
mod diagnose;
pub mod optim;
pub mod probe;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::{BaseQuant, Precision};
use crate::gpu::memory::{self, Estimate};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use self::batch::{Cursor, DataOrder, Row};
use self::checkpoint::State;
use self::optim::{clip_grad_norm, AdamW};
use self::schedule::lr_at;
use crate::config::{BatchSize, TrainConfig};
use crate::data::{pack, prepare, split, EncodeOptions, PrepareOptions};
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel, Silent};
use crate::lora::LoraSet;
use crate::model::profile::{self, Part};
use crate::model::{CausalLm, ModelConfig};
use crate::run::{self, MetricLine, RunDir, RunInfo, RunSink, RunStatus};

/// Asks a running job to stop at the next step boundary (after a checkpoint), or to
/// hold between steps while paused (the thermal guard pauses hot GPUs this way).
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    cancelled: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl CancelToken {
    /// A token whose pause flag is shared with others (one guard pauses every job).
    pub fn with_pause(paused: Arc<AtomicBool>) -> Self {
        CancelToken {
            cancelled: Arc::default(),
            paused,
        }
    }
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst)
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    /// Blocks while paused; a cancel ends the wait.
    pub fn wait_while_paused(&self) {
        while self.is_paused() && !self.is_cancelled() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

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

/// Builder over `TrainConfig`, in the spirit of the Python package:
/// `Trainer::new(model).lora_r(16).train(data, steps)`.
pub struct Trainer {
    config: TrainConfig,
    runs_dir: PathBuf,
    name: Option<String>,
    sink: Arc<dyn EventSink>,
    cancel: CancelToken,
    memory_limit: Option<u64>,
}

impl Trainer {
    pub fn new(model: impl Into<String>) -> Self {
        Trainer::from_config(TrainConfig {
            model: model.into(),
            ..TrainConfig::default()
        })
    }

    pub fn from_config(config: TrainConfig) -> Self {
        Trainer {
            config,
            runs_dir: run::default_runs_dir(),
            name: None,
            sink: Arc::new(Silent),
            cancel: CancelToken::default(),
            memory_limit: None,
        }
    }

    pub fn lora_r(mut self, r: usize) -> Self {
        self.config.lora.r = r;
        self
    }
    pub fn lora_alpha(mut self, alpha: f64) -> Self {
        self.config.lora.alpha = alpha;
        self
    }
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.config.learning_rate = lr;
        self
    }
    pub fn batch_size(mut self, b: BatchSize) -> Self {
        self.config.batch_size = b;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }
    pub fn runs_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runs_dir = dir.into();
        self
    }
    /// A readable suffix for the run id (e.g. the dataset name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    pub fn on_event(mut self, sink: impl EventSink + 'static) -> Self {
        self.sink = Arc::new(sink);
        self
    }
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }
    pub fn config_mut(&mut self) -> &mut TrainConfig {
        &mut self.config
    }
    /// Makes every micro-batch whose estimated memory exceeds `bytes` fail as a GPU
    /// out-of-memory error would, without telling the batch planner: how the
    /// out-of-memory back-off is tested on machines without a GPU.
    #[doc(hidden)]
    pub fn simulate_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Trains on `data` for `steps` optimizer steps in a new run directory.
    pub fn train(mut self, data: impl AsRef<Path>, steps: u64) -> Result<RunSummary> {
        self.config.data = data.as_ref().to_path_buf();
        self.config.steps = steps;
        self.start()
    }

    /// Starts a new run with the configuration as it stands.
    pub fn start(self) -> Result<RunSummary> {
        let sink = self.sink.clone();
        let cancel = self.cancel.clone();
        self.start_with(sink.as_ref(), &cancel)
    }

    /// Starts a new run reporting to a borrowed sink and cancel token (for callers that
    /// drive several runs, like multi-run).
    pub fn start_with(self, sink: &dyn EventSink, cancel: &CancelToken) -> Result<RunSummary> {
        self.config.validate().map_err(Error::InvalidOption)?;
        // A repo id downloads into the shared HF cache (or is found there) first.
        let model_dir = absolute(&crate::hub::resolve_model(
            &self.config.model,
            &crate::hub::HubOptions::from_env(),
            sink,
        )?)?;
        let data = absolute(&self.config.data)?;
        let (created, stamp) = run::now_utc();
        let base = self
            .name
            .clone()
            .or_else(|| data.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "run".into());
        let mut info = RunInfo {
            // The preferred id; creating the folder adds a suffix if it is taken.
            id: format!("{stamp}-{}", sanitize(&base)),
            created,
            model_dir,
            data: data.clone(),
            data_sha256: run::sha256_file(&data)?,
            status: RunStatus::Running,
            step: 0,
        };
        // Validate data and model before creating anything on disk.
        let session = Session::prepare(&self.config, &info, sink, self.memory_limit)?;
        let run = RunDir::create(&self.runs_dir, &mut info, &self.config, "train")?;
        session.run(run, info, None, sink, cancel)
    }

    /// Continues a run from its newest checkpoint (or from the start if it has none).
    pub fn resume(
        run_dir: &Path,
        sink: &dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunSummary> {
        // Locked first: a second resume of the same run must not even read its state.
        let run = RunDir::open_for_write(run_dir, "resume")?;
        let config = run.config()?;
        let mut info = run.info()?;
        let hash = run::sha256_file(&info.data)?;
        if hash != info.data_sha256 {
            return Err(Error::Run {
                path: info.data.clone(),
                message: "the data file changed since this run started; resuming would train on different data. Start a new run instead".into(),
            });
        }
        let session = Session::prepare(&config, &info, sink, None)?;
        let checkpoint = run.latest_checkpoint()?;
        info.status = RunStatus::Running;
        session.run(run, info, checkpoint.map(|(_, p)| p), sink, cancel)
    }
}

/// Writes a PEFT adapter folder whole: into a temporary folder beside `dir`, then
/// renamed onto it, so a kill between its two files never leaves an adapter without
/// its config (exports would then fail on a missing file).
pub(crate) fn write_adapter(lora: &LoraSet, dir: &Path, base_model: &str) -> Result<()> {
    crate::fsx::write_dir(dir, |tmp| lora.save_peft(tmp, base_model))
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

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::io(p, e))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect()
}

/// Everything prepared for training, before any file is written.
struct Session {
    config: TrainConfig,
    model_config: ModelConfig,
    train_rows: Vec<Row>,
    val_rows: Vec<Row>,
    micro_batch: usize,
    pad_id: u32,
    device: Device,
    base_quant: BaseQuant,
    dtype: DType,
    estimate: Estimate,
    memory_limit: Option<u64>,
}

impl Session {
    fn prepare(
        config: &TrainConfig,
        info: &RunInfo,
        sink: &dyn EventSink,
        memory_limit: Option<u64>,
    ) -> Result<Self> {
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
        let base_quant = match config.base_quant {
            BaseQuant::Auto
                if crate::model::Weights::open(&info.model_dir, DType::F32, &Device::Cpu)?
                    .has_nf4() =>
            {
                sink.emit(Event::Log {
                    level: LogLevel::Info,
                    message: "bitsandbytes 4-bit checkpoint: its linears are dequantized and held as q4_k (QLoRA)".into(),
                });
                BaseQuant::Q4K
            }
            BaseQuant::Auto => BaseQuant::F32,
            q => q,
        };
        let dtype = match config.precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Auto if picked.device.is_cpu() => DType::F32,
            Precision::Auto => DType::BF16,
        };
        if dtype == DType::BF16 && picked.device.is_cpu() {
            return Err(Error::InvalidOption(
                "precision = \"bf16\" needs a GPU: candle's CPU matmul has no bf16 kernel; use precision = \"f32\" (or \"auto\") on the CPU".into(),
            ));
        }
        if dtype == DType::BF16 {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: "mixed precision: bf16 activations and frozen weights, f32 LoRA weights and optimizer".into(),
            });
        }
        let (weight_bits, activation_bytes) = match (base_quant, dtype) {
            (BaseQuant::F32, DType::BF16) => (16.0, 2),
            (q, DType::BF16) => (memory::weight_bits(q), 2),
            (q, _) => (memory::weight_bits(q), 4),
        };
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
        let parts =
            split(usable.len(), config.val_ratio, config.seed).map_err(Error::InvalidOption)?;
        let pick = |idx: &[usize]| idx.iter().map(|&i| usable[i].clone()).collect::<Vec<_>>();
        let (train, val) = (pick(&parts.train), pick(&parts.val));
        let to_rows = |samples: Vec<crate::data::Encoded>| -> Vec<Row> {
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
        let train_rows = to_rows(train);
        let val_rows = to_rows(val);
        let seq = train_rows
            .iter()
            .chain(&val_rows)
            .map(|r| r.input_ids.len())
            .max()
            .unwrap_or(1);
        let fused = picked.device.is_cpu()
            && dtype == DType::F32
            && base_quant == BaseQuant::F32
            && crate::model::fused_ops_enabled();
        let estimate = if fused {
            // A bf16/f16 checkpoint's linears stay in 16 bits on this path.
            let half = matches!(
                model_config.torch_dtype.as_deref(),
                Some("bfloat16" | "float16")
            );
            memory::estimate_fused(
                &memory::Shape::of(&model_config),
                seq as u64,
                config.lora.r as u64,
                if half { 16.0 } else { weight_bits },
            )
        } else {
            memory::estimate(
                &memory::Shape::of(&model_config),
                seq as u64,
                config.lora.r as u64,
                weight_bits,
                activation_bytes,
                false,
            )
        };
        let (micro_batch, accumulation) = plan_micro_batch(
            config,
            &train_rows,
            &estimate,
            memory::available_bytes(&picked),
            sink,
        );
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
            dtype,
            estimate,
            memory_limit,
        })
    }

    fn run(
        self,
        run: RunDir,
        mut info: RunInfo,
        checkpoint: Option<PathBuf>,
        face: &dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunSummary> {
        let sink = RunSink {
            run: &run,
            inner: face,
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
        let c = &self.config;
        let template_opt = AdamW::new(
            &[],
            c.optimizer.beta1,
            c.optimizer.beta2,
            c.optimizer.eps,
            c.optimizer.weight_decay,
        );
        let dropout_seed = c.seed.wrapping_add(1);
        let (lora, mut opt, mut state) = match &checkpoint {
            Some(dir) => {
                let loaded =
                    checkpoint::load(dir, &self.model_config, &template_opt, &self.device)?;
                run.truncate_metrics_after(loaded.state.step)?;
                sink.emit(Event::Log {
                    level: LogLevel::Info,
                    message: format!("resuming from step {}", loaded.state.step),
                });
                (loaded.lora, loaded.opt, loaded.state)
            }
            None => {
                run.truncate_metrics_after(0)?;
                let mut init_rng = ChaCha8Rng::seed_from_u64(c.seed);
                let lora = match &c.init_adapter {
                    Some(dir) => {
                        let lora = LoraSet::load_peft(dir, &self.model_config, &self.device)?;
                        if lora.config.r != c.lora.r
                            || lora.config.target_modules != c.lora.target_modules
                        {
                            return Err(Error::Run {
                                path: dir.clone(),
                                message: "the initial adapter's rank or target modules differ from this run's LoRA settings".into(),
                            });
                        }
                        lora
                    }
                    None => {
                        LoraSet::init(&self.model_config, &c.lora, &mut init_rng, &self.device)?
                    }
                };
                let sizes: Vec<usize> = lora
                    .named_vars()
                    .iter()
                    .map(|(_, v)| v.elem_count())
                    .collect();
                let opt = AdamW::new(
                    &sizes,
                    c.optimizer.beta1,
                    c.optimizer.beta2,
                    c.optimizer.eps,
                    c.optimizer.weight_decay,
                );
                let state = State {
                    step: 0,
                    cursor: Cursor { epoch: 0, pos: 0 },
                    rng_seed: dropout_seed,
                    rng_word_pos: "0".into(),
                    optimizer_t: 0,
                    tokens_seen: 0,
                    elapsed_s: 0.0,
                    micro_batch: None,
                };
                (lora, opt, state)
            }
        };
        let max_len = self
            .train_rows
            .iter()
            .chain(&self.val_rows)
            .map(|r| r.input_ids.len())
            .max()
            .unwrap_or(1);
        let model = CausalLm::load_with(
            &info.model_dir,
            self.model_config.clone(),
            Some(&lora),
            max_len,
            &self.device,
            self.base_quant,
            self.dtype,
        )?;
        if self.base_quant != BaseQuant::F32 {
            sink.emit(Event::Log {
                level: LogLevel::Info,
                message: format!(
                    "frozen linears held as {:?}: {:.1} MiB",
                    self.base_quant,
                    model.linear_bytes() as f64 / (1u64 << 20) as f64
                ),
            });
        }
        let trainable = lora.trainable_parameters();
        let total = self.model_config.parameter_count();
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: format!(
                "trainable parameters: {trainable} of {total} ({:.3}%)",
                100.0 * trainable as f64 / total as f64
            ),
        });

        let mut rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
        rng.set_word_pos(state.rng_word_pos.parse::<u128>().unwrap_or(0));
        let mut order = DataOrder::new(self.train_rows.len(), c.seed, state.cursor);
        let vars: Vec<_> = lora
            .named_vars()
            .into_iter()
            .map(|(_, v)| v.clone())
            .collect();
        let mut params: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .collect::<candle_core::Result<_>>()?;
        let per_step = self.per_step();
        let mut micro = self.micro_batch;
        if let Some(saved) = state.micro_batch {
            if saved != micro && saved > 0 && per_step.is_multiple_of(saved) {
                micro = saved;
                sink.emit(Event::Log {
                    level: LogLevel::Info,
                    message: format!(
                        "continuing with the checkpoint's micro-batch {micro} × accumulation {}",
                        per_step / micro
                    ),
                });
            }
        }
        let started = Instant::now();
        let elapsed_before = state.elapsed_s;
        let first_step = state.step;
        let mut last_loss = None;
        let base_model = info.model_dir.display().to_string();

        while state.step < c.steps {
            if cancel.is_paused() {
                sink.emit(Event::Log {
                    level: LogLevel::Warn,
                    message: format!("paused before step {} (the GPU is too hot); training continues once it cools", state.step + 1),
                });
                cancel.wait_while_paused();
                if !cancel.is_cancelled() {
                    sink.emit(Event::Log {
                        level: LogLevel::Info,
                        message: "resumed".into(),
                    });
                }
            }
            if cancel.is_cancelled() {
                let path = checkpoint::save(
                    &run.checkpoints_dir(),
                    &state_with(&state, &order, &rng, &opt, micro),
                    &lora,
                    &opt,
                    &base_model,
                )?;
                run.sync_metrics()?;
                sink.emit(Event::Checkpoint {
                    step: state.step,
                    path: path.display().to_string(),
                });
                return Ok(self.summary(
                    info,
                    RunStatus::Stopped,
                    state.step,
                    last_loss,
                    trainable,
                    total,
                    run,
                ));
            }
            let t0 = Instant::now();
            let lr = lr_at(
                c.schedule.kind,
                c.learning_rate,
                state.step,
                c.schedule.warmup_steps,
                c.steps,
            );
            let indices = order.next_indices(per_step);
            let rows: Vec<&Row> = indices.iter().map(|&i| &self.train_rows[i]).collect();
            let total_targets: usize = rows.iter().map(|r| r.target_count()).sum();
            let tokens: u64 = rows.iter().map(|r| r.input_ids.len() as u64).sum();
            // An out-of-memory step is retried from its start with half the
            // micro-batch and twice the accumulation: the same rows, the same RNG
            // position, so the step means what it would have meant.
            let rng_at_step = rng.clone();
            let (mut grads, loss_sum) = loop {
                match self.accumulate(&model, &rows, micro, total_targets, &vars, &mut rng) {
                    Ok(done) => break done,
                    Err(e) if is_out_of_memory(&e) => {
                        let Some(smaller) = smaller_divisor(per_step, micro) else {
                            return Err(Error::Run {
                                path: run.path().to_path_buf(),
                                message: format!(
                                    "out of memory at step {} even with micro-batch 1 ({e}); lower max_seq_len (now {}), use base_quant = \"q4_k\" (QLoRA), or a smaller model",
                                    state.step + 1,
                                    c.max_seq_len
                                ),
                            });
                        };
                        sink.emit(Event::Log {
                            level: LogLevel::Warn,
                            message: format!(
                                "out of memory at step {} with micro-batch {micro}: continuing with micro-batch {smaller} × accumulation {} (same effective batch)",
                                state.step + 1,
                                per_step / smaller
                            ),
                        });
                        micro = smaller;
                        rng = rng_at_step.clone();
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let loss = loss_sum / total_targets.max(1) as f64;
            if !loss.is_finite() {
                return Err(non_finite_loss(
                    run.path(),
                    loss,
                    state.step + 1,
                    c.learning_rate,
                    diagnose::non_finite_weight(&info.model_dir, &lora),
                ));
            }
            let grad_norm = profile::timed(Part::Optimizer, || -> Result<f64> {
                let grad_norm = clip_grad_norm(&mut grads, c.optimizer.max_grad_norm);
                opt.step(&mut params, &grads, lr);
                for (p, var) in params.iter().zip(&vars) {
                    var.set(&Tensor::from_slice(p, var.shape(), &self.device)?)?;
                }
                Ok(grad_norm)
            })?;
            state.step += 1;
            if profile::enabled() {
                sink.emit(Event::Log {
                    level: LogLevel::Info,
                    message: profile::take_line(state.step),
                });
            }
            state.tokens_seen += tokens;
            last_loss = Some(loss);
            let step_s = t0.elapsed().as_secs_f64();
            let elapsed = elapsed_before + started.elapsed().as_secs_f64();
            let done_here = (state.step - first_step) as f64;
            let eta = started.elapsed().as_secs_f64() / done_here * (c.steps - state.step) as f64;
            let tokens_per_s = tokens as f64 / step_s.max(1e-9);
            run.append_metric(&MetricLine {
                step: state.step,
                loss: Some(loss),
                eval_loss: None,
                lr: Some(lr),
                grad_norm: Some(grad_norm),
                tokens: Some(tokens),
                tokens_per_s: Some(tokens_per_s),
                elapsed_s: Some(elapsed),
            })?;
            sink.emit(Event::Step {
                run: 0,
                step: state.step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                elapsed_s: elapsed,
                eta_s: eta,
            });
            let last = state.step == c.steps;
            if !self.val_rows.is_empty()
                && ((c.eval_every > 0 && state.step % c.eval_every == 0) || last)
            {
                let eval_loss = self.evaluate(&model)?;
                run.append_metric(&MetricLine {
                    step: state.step,
                    loss: None,
                    eval_loss: Some(eval_loss),
                    lr: None,
                    grad_norm: None,
                    tokens: None,
                    tokens_per_s: None,
                    elapsed_s: None,
                })?;
                sink.emit(Event::Eval {
                    step: state.step,
                    loss: eval_loss,
                });
            }
            if last || (c.checkpoint_every > 0 && state.step % c.checkpoint_every == 0) {
                state.elapsed_s = elapsed;
                let snapshot = state_with(&state, &order, &rng, &opt, micro);
                let path =
                    checkpoint::save(&run.checkpoints_dir(), &snapshot, &lora, &opt, &base_model)?;
                run.sync_metrics()?;
                info.step = state.step;
                run.write_info(info)?;
                sink.emit(Event::Checkpoint {
                    step: state.step,
                    path: path.display().to_string(),
                });
            }
        }
        write_adapter(&lora, &run.path().join("adapter"), &base_model)?;
        Ok(self.summary(
            info,
            RunStatus::Finished,
            state.step,
            last_loss,
            trainable,
            total,
            run,
        ))
    }

    fn per_step(&self) -> usize {
        match self.config.batch_size {
            BatchSize::Fixed(n) => n as usize * self.config.gradient_accumulation as usize,
            BatchSize::Auto => effective_auto(&self.train_rows, &self.config),
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
        vars: &[candle_core::Var],
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
            let store =
                profile::timed(Part::Backward, || (loss / total_targets as f64)?.backward())?;
            for (g, var) in grads.iter_mut().zip(vars) {
                if let Some(t) = store.get(var.as_tensor()) {
                    let values = t.flatten_all()?.to_vec1::<f32>()?;
                    g.iter_mut().zip(values).for_each(|(a, b)| *a += b);
                }
            }
        }
        Ok((grads, loss_sum))
    }

    fn evaluate(&self, model: &CausalLm) -> Result<f64> {
        Ok(batch::mean_loss(
            model,
            &self.val_rows,
            self.micro_batch,
            self.pad_id,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn summary(
        &self,
        info: &RunInfo,
        status: RunStatus,
        steps: u64,
        final_loss: Option<f64>,
        trainable: usize,
        total: usize,
        run: &RunDir,
    ) -> RunSummary {
        RunSummary {
            id: info.id.clone(),
            run_dir: run.path().to_path_buf(),
            status,
            steps,
            final_loss,
            trainable_params: trainable,
            total_params: total,
        }
    }
}

fn state_with(
    state: &State,
    order: &DataOrder,
    rng: &ChaCha8Rng,
    opt: &AdamW,
    micro: usize,
) -> State {
    State {
        cursor: order.cursor(),
        rng_word_pos: rng.get_word_pos().to_string(),
        optimizer_t: opt.t,
        micro_batch: Some(micro),
        ..state.clone()
    }
}

/// Whether a candle error is the device (or the simulated limit) running out of memory.
fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["out of memory", "out_of_memory", "failed to allocate"]
        .iter()
        .any(|m| text.contains(m))
}

/// The largest divisor of `per_step` at most half of `micro`, so that micro-batch ×
/// accumulation stays the same effective batch.
fn smaller_divisor(per_step: usize, micro: usize) -> Option<usize> {
    (1..=micro / 2).rev().find(|d| per_step.is_multiple_of(*d))
}

/// The effective batch under `batch_size = auto`: the token heuristic's micro-batch
/// times the accumulation the user asked for.
fn effective_auto(rows: &[Row], config: &TrainConfig) -> usize {
    auto_batch(rows) * config.gradient_accumulation as usize
}

/// The micro-batch and accumulation for this run: the user's effective batch
/// (batch_size × gradient_accumulation) kept exactly, the micro-batch lowered to what
/// the memory estimate says fits. A fixed batch_size is never raised.
fn plan_micro_batch(
    config: &TrainConfig,
    rows: &[Row],
    est: &Estimate,
    free: Option<u64>,
    sink: &dyn EventSink,
) -> (usize, usize) {
    let acc = config.gradient_accumulation as usize;
    let (cap, effective) = match config.batch_size {
        BatchSize::Fixed(n) => (n as usize, n as usize * acc),
        BatchSize::Auto => (effective_auto(rows, config), effective_auto(rows, config)),
    };
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

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Micro-batch when the user says `auto`, until memory-based sizing (GPU issue)
/// lands: about 4096 tokens per micro-batch at the 95th-percentile row length.
fn auto_batch(rows: &[Row]) -> usize {
    let mut lens: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    lens.sort_unstable();
    let p95 = lens.get(lens.len() * 95 / 100).copied().unwrap_or(1).max(1);
    (4096 / p95).clamp(1, 16)
}
