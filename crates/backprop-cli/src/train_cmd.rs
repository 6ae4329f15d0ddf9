//! `backprop train`: start or resume a LoRA run, with a progress bar (or JSON events).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, Result};
use backpropagate::config::{
    BaseQuant, BatchSize, GradientCheckpointing, LrSchedule, Precision, ReportTo,
};
use backpropagate::data::TrainOn;
use backpropagate::event::{Event, EventSink};
use backpropagate::run::{default_runs_dir, resolve_run, RunDir, RunStatus};
use backpropagate::train::{RunSummary, TrainPlan, Trainer};
use backpropagate::TrainConfig;
use clap::Args;

use crate::print::safe;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct TrainArgs {
    /// Model: a folder (Hugging Face layout: config.json, tokenizer.json, *.safetensors),
    /// a repo id (org/name[@revision]), a .gguf file or ollama:NAME[:TAG]
    #[arg(long, required_unless_present_any = ["resume", "config"])]
    pub model: Option<String>,
    /// JSONL training data
    #[arg(long, required_unless_present_any = ["resume", "config"])]
    pub data: Option<PathBuf>,
    /// Start from a run.toml (flags given as well override it)
    #[arg(long, conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Continue a run (its id or folder) from its newest checkpoint
    #[arg(long)]
    pub resume: Option<String>,
    /// Optimizer steps [default: 100]
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate [default: 2e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// LoRA rank [default: 16]
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha [default: 32]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0.05]
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Layers to adapt, comma-separated [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Micro-batch size: `auto` or a number [default: auto]
    #[arg(long)]
    pub batch_size: Option<BatchSize>,
    /// Micro-batches per optimizer step [default: 1]
    #[arg(long)]
    pub grad_accum: Option<u32>,
    /// Longest sample in tokens [default: 2048]
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Learning-rate schedule after warmup: cosine, linear or constant [default: cosine]
    #[arg(long)]
    pub schedule: Option<String>,
    /// Warmup steps [default: 10]
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Loss on `assistant` replies only or on `all` tokens [default: assistant]
    #[arg(long)]
    pub train_on: Option<TrainOn>,
    /// Pack several samples into each row
    #[arg(long)]
    pub packing: bool,
    /// Share of samples held out for validation loss [default: 0]
    #[arg(long)]
    pub val_ratio: Option<f64>,
    /// Validation loss every N steps [default: at the end only]
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps [default: 50]
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Random seed [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to train: auto, cpu, cuda, cuda:N or metal [default: auto: the GPU when this
    /// build and the machine have one, else the CPU with a notice]
    #[arg(long)]
    pub device: Option<String>,
    /// Frozen base in memory: auto, f32, q8_0 or q4_k (QLoRA: 4.5 bits per weight)
    /// [default: auto: as stored; bitsandbytes 4-bit checkpoints as q4_k]
    #[arg(long)]
    pub base_quant: Option<BaseQuant>,
    /// Compute precision: auto, f32 or bf16 (GPU: mixed precision with f32 LoRA
    /// weights; CPU with AVX512-BF16: bf16 products with the frozen weights, ~1.5×
    /// faster) [default: auto: bf16 on a GPU, f32 on the CPU]
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Gradient checkpointing: auto, off or on (recompute layers in backward instead of
    /// keeping their activations: far less memory for about one more forward pass)
    /// [default: auto: only as many layers as the memory plan needs]
    #[arg(long)]
    pub gradient_checkpointing: Option<GradientCheckpointing>,
    /// Also report to these experiment trackers, comma-separated: tensorboard (event
    /// files in the run's tensorboard/ folder; `tensorboard --logdir RUNS_DIR` shows
    /// every run), wandb (an offline run in the run's wandb/ folder; `wandb sync`
    /// uploads it) [default: none; metrics.jsonl is always written]
    #[arg(long, value_delimiter = ',')]
    pub report_to: Option<Vec<ReportTo>>,
    /// Where runs are kept [default: $BACKPROP_HOME/runs or the platform data folder]
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
    /// A readable suffix for the run id [default: the data file's name]
    #[arg(long, conflicts_with = "resume")]
    pub name: Option<String>,
    /// Print events as JSON lines instead of a progress bar
    #[arg(long)]
    pub json: bool,
    /// Print the plan (rows, batch, epochs, gradient checkpointing, precision, base
    /// storage, predicted peak memory against the free memory) and stop: nothing is
    /// written and no weights are loaded
    #[arg(long, conflicts_with = "resume")]
    pub dry_run: bool,
}

impl TrainArgs {
    pub fn apply(&self, c: &mut TrainConfig) -> Result<()> {
        if let Some(m) = &self.model {
            c.model = m.clone();
        }
        if let Some(d) = &self.data {
            c.data = d.clone();
        }
        macro_rules! set {
            ($field:expr, $value:expr) => {
                if let Some(v) = $value.clone() {
                    $field = v;
                }
            };
        }
        set!(c.steps, self.steps);
        set!(c.learning_rate, self.lr);
        set!(c.lora.r, self.lora_r);
        set!(c.lora.alpha, self.lora_alpha);
        set!(c.lora.dropout, self.lora_dropout);
        set!(c.lora.target_modules, self.target_modules);
        set!(c.batch_size, self.batch_size);
        set!(c.gradient_accumulation, self.grad_accum);
        set!(c.max_seq_len, self.max_seq_len);
        set!(c.schedule.warmup_steps, self.warmup);
        set!(c.train_on, self.train_on);
        set!(c.val_ratio, self.val_ratio);
        set!(c.eval_every, self.eval_every);
        set!(c.checkpoint_every, self.checkpoint_every);
        set!(c.seed, self.seed);
        set!(c.device, self.device);
        set!(c.base_quant, self.base_quant);
        set!(c.precision, self.precision);
        set!(c.gradient_checkpointing, self.gradient_checkpointing);
        set!(c.report_to, self.report_to);
        if let Some(s) = &self.schedule {
            c.schedule.kind = match s.as_str() {
                "cosine" => LrSchedule::Cosine,
                "linear" => LrSchedule::Linear,
                "constant" => LrSchedule::Constant,
                other => {
                    anyhow::bail!("unknown schedule `{other}`; use cosine, linear or constant")
                }
            };
        }
        if self.packing {
            c.packing = true;
        }
        Ok(())
    }
}

pub fn train(args: &TrainArgs) -> Result<ExitCode> {
    let runs_dir = args.runs_dir.clone().unwrap_or_else(default_runs_dir);
    let summary = if let Some(run) = &args.resume {
        let dir = resolve_run(&runs_dir, run)?;
        let steps = RunDir::open(&dir)?.config()?.steps;
        let face = Face::new(args.json, steps);
        let s = Trainer::resume(&dir, &face, &Default::default())
            .with_context(|| format!("resuming {}", dir.display()))?;
        face.finish();
        s
    } else {
        let mut config = match &args.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        args.apply(&mut config)?;
        config.validate().map_err(anyhow::Error::msg)?;
        let face = Face::new(args.json, config.steps);
        let mut trainer = Trainer::from_config(config)
            .runs_dir(runs_dir)
            .on_event(face.clone());
        if let Some(name) = &args.name {
            trainer = trainer.name(name);
        }
        if args.dry_run {
            let plan = trainer.plan()?;
            face.finish();
            print_plan(&plan, args.json);
            return Ok(ExitCode::SUCCESS);
        }
        let s = trainer.start()?;
        face.finish();
        s
    };
    report(&summary, args.json);
    Ok(match summary.status {
        RunStatus::Finished => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn print_plan(p: &TrainPlan, json: bool) {
    if json {
        println!("{}", serde_json::json!({"type": "Plan", "plan": p}));
        return;
    }
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64);
    let free = match (p.free_bytes, p.fits) {
        (Some(f), Some(true)) => format!(" of {} free: fits", mib(f)),
        (Some(f), _) => format!(
            " of {} free: may not fit: lower max_seq_len or batch_size, or use --base-quant q4_k",
            mib(f)
        ),
        (None, _) => " (free memory unknown)".into(),
    };
    println!("plan (nothing written)");
    println!(
        "  data        {} training rows, {} validation rows, longest {} tokens",
        p.train_rows, p.val_rows, p.longest_row_tokens
    );
    println!(
        "  steps       {} × {} rows (micro-batch {} × accumulation {}) = {:.1} epochs",
        p.steps, p.effective_batch, p.micro_batch, p.accumulation, p.epochs
    );
    println!(
        "  trainable   {} of {} parameters ({:.3}%)",
        p.trainable_params,
        p.total_params,
        100.0 * p.trainable_params as f64 / p.total_params.max(1) as f64
    );
    println!(
        "  device      {}, {} compute, base held as {}",
        p.device, p.precision, p.base_storage
    );
    println!(
        "  checkpoint  {} of {} layers recomputed in backward",
        p.recomputed_layers, p.layers
    );
    println!("  memory      about {}{free}", mib(p.predicted_peak_bytes));
}

fn report(s: &RunSummary, json: bool) {
    if json {
        println!("{}", serde_json::json!({"type": "Summary", "summary": s}));
        return;
    }
    let loss = s
        .final_loss
        .map(|l| format!("{l:.4}"))
        .unwrap_or_else(|| "-".into());
    println!(
        "run {} {:?} after {} steps, final loss {loss}\n  {}",
        s.id,
        s.status,
        s.steps,
        s.run_dir.display()
    );
}

/// Renders engine events on the terminal.
#[derive(Clone)]
struct Face {
    json: bool,
    steps: u64,
    bar: std::sync::Arc<Mutex<Option<ProgressBar>>>,
}

impl Face {
    fn new(json: bool, steps: u64) -> Self {
        Face {
            json,
            steps,
            bar: Default::default(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish();
        }
    }
}

impl EventSink for Face {
    fn emit(&self, event: Event) {
        if self.json {
            println!("{}", serde_json::to_string(&event).unwrap_or_default());
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_s,
                eta_s,
                ..
            } => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(self.steps);
                    b.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b
                });
                b.set_position(step);
                b.set_message(format!(
                    "loss {loss:.4} · lr {lr:.2e} · {tokens_per_s:.0} tok/s · ETA {}s",
                    eta_s.round()
                ));
            }
            Event::Log { level, message } => {
                let line = crate::log_line(level, message);
                // A hidden bar (stderr not a terminal) drops what it is asked to print.
                match bar.as_ref() {
                    Some(b) if !b.is_hidden() => b.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            Event::Eval { step, loss } => {
                let line = format!("step {step}: validation loss {loss:.4}");
                // A hidden bar (stderr not a terminal) drops what it is asked to print.
                match bar.as_ref() {
                    Some(b) if !b.is_hidden() => b.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            Event::Failed { error, hint } => {
                eprintln!("error: {}", safe(&error));
                if let Some(h) = hint {
                    eprintln!("  fix: {}", safe(&h));
                }
            }
            _ => {}
        }
    }
}
