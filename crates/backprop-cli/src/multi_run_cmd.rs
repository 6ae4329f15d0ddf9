//! `backprop multi-run`: staged training (SLAO or plain sequential) over slices of the
//! data, with the run index on every step.

use std::process::ExitCode;

use anyhow::Result;
use backpropagate::config::MultiRunMethod;
use backpropagate::event::{Event, EventSink};
use backpropagate::run::{default_runs_dir, RunStatus};
use backpropagate::slao::{multi_run, resume_multi_run};
use backpropagate::train::CancelToken;
use backpropagate::TrainConfig;
use clap::Args;

use crate::print::safe;

use crate::train_cmd::TrainArgs;

#[derive(Args)]
pub struct MultiRunArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Number of runs (the data is cut into this many consecutive slices) [default: 3]
    #[arg(long)]
    pub runs: Option<u32>,
    /// Optimizer steps per run [default: 50]
    #[arg(long)]
    pub steps_per_run: Option<u64>,
    /// Share of each later run's samples replayed from earlier slices, 0..1 [default: 0.2]
    #[arg(long)]
    pub replay_ratio: Option<f64>,
    /// `slao` (orthogonal init + time-aware merge) or `sequential` (plain LoRA) [default: slao]
    #[arg(long, value_parser = ["slao", "sequential"])]
    pub method: Option<String>,
}

struct Lines {
    json: bool,
}

impl EventSink for Lines {
    fn emit(&self, event: Event) {
        if self.json {
            println!("{}", serde_json::to_string(&event).unwrap_or_default());
            return;
        }
        match event {
            Event::Step {
                run, step, loss, ..
            } if step % 10 == 0 => eprintln!("run {run} step {step}: loss {loss:.4}"),
            Event::Log { message, .. } => eprintln!("{}", safe(&message)),
            Event::Failed { error, .. } => eprintln!("error: {}", safe(&error)),
            _ => {}
        }
    }
}

pub fn run(args: &MultiRunArgs) -> Result<ExitCode> {
    let runs_dir = args.train.runs_dir.clone().unwrap_or_else(default_runs_dir);
    let sink = Lines {
        json: args.train.json,
    };
    let summary = if let Some(dir) = &args.train.resume {
        let dir = if std::path::Path::new(dir).join("multi_run.json").is_file() {
            std::path::PathBuf::from(dir)
        } else {
            runs_dir.join(dir)
        };
        resume_multi_run(&dir, &sink, &CancelToken::default())?
    } else {
        let mut config = match &args.train.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        args.train.apply(&mut config)?;
        if let Some(n) = args.runs {
            config.multi_run.runs = n;
        }
        if let Some(n) = args.steps_per_run {
            config.multi_run.steps_per_run = n;
        }
        if let Some(r) = args.replay_ratio {
            config.multi_run.replay_ratio = r;
        }
        if let Some(m) = &args.method {
            config.multi_run.method = if m == "sequential" {
                MultiRunMethod::Sequential
            } else {
                MultiRunMethod::Slao
            };
        }
        multi_run(&config, &runs_dir, &sink, &CancelToken::default())?
    };
    println!("{}", summary.run_dir.display());
    Ok(match summary.status {
        RunStatus::Finished => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
