//! Multi-run training against catastrophic forgetting: the data is cut into `runs`
//! consecutive slices (tasks arriving over time); each run trains one LoRA stage on its
//! slice plus a `replay_ratio` share of samples from earlier slices, and the stages are
//! combined into a single adapter whose size never grows.
//!
//! SLAO ("Merge before Forget", Qiao & Mahdavi, arXiv 2512.23017), with t = 1, 2, … the
//! run index:
//! - run 1 trains a fresh LoRA; it becomes the accumulated adapter (A₁, B₁).
//! - run t > 1 starts from A = Qᵀ where Q R = A_{t-1}ᵀ (thin QR, columns of Q signed
//!   so that diag R > 0: an orthonormal basis of the previous run's A row space) and
//!   B = B_{t-1}, the previous run's fine-tuned B.
//! - after run t: A_acc ← A_t (the run's A replaces it) and
//!   B_acc ← B_acc + λ(t)·(B_t − B_acc) with λ(t) = 1/√t.
//!
//! This follows the paper's Algorithm 1 where the Python `backpropagate` package
//! differs: the package starts run t's B from the merged B_acc (not B_{t-1}) and clamps
//! λ to [0.1, 1]. `replay_ratio` is the package's addition (the paper is data-free);
//! 0 gives the paper's setting.
//!
//! `Sequential` is the plain baseline: each run continues from the previous adapter
//! and the last one is the result.
//!
//! Layout under `runs/<id>/`: `multi_run.json` (progress), `slices/run-N.jsonl`,
//! `stages/` (one ordinary run per stage, resumable), `init/run-N/` (each stage's
//! starting adapter), `merged/` (the accumulated adapter after the last completed run)
//! and, when all runs are done, `adapter/`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{MultiRunMethod, TrainConfig};
use crate::data::{read_jsonl, ReadOptions};
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::fsx::write_atomic;
use crate::lora::LoraSet;
use crate::model::ModelConfig;
use crate::run::{self, RunStatus};
use crate::train::{CancelToken, RunSummary, Trainer};

/// Progress of a multi-run, rewritten atomically after every completed run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    config: TrainConfig,
    model_dir: PathBuf,
    completed: u32,
    stage_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MultiRunSummary {
    pub run_dir: PathBuf,
    pub status: RunStatus,
    pub completed_runs: u32,
    pub stages: Vec<RunSummary>,
    /// The combined adapter (PEFT layout), once every run is done.
    pub adapter: Option<PathBuf>,
}

/// λ(t) = 1/√t: how much of run t's change to B is kept.
pub fn merge_weight(t: u32) -> f64 {
    1.0 / (t as f64).sqrt()
}

/// Orthonormal rows spanning the rows of `a` (r × in): Qᵀ of the thin QR of aᵀ with
/// diag R > 0, computed by modified Gram–Schmidt in f64.
pub fn orthonormal_rows(a: &[f32], r: usize, n: usize) -> Vec<f32> {
    let mut q: Vec<Vec<f64>> = (0..r)
        .map(|i| a[i * n..(i + 1) * n].iter().map(|&v| v as f64).collect())
        .collect();
    for i in 0..r {
        for j in 0..i {
            let dot: f64 = q[i].iter().zip(&q[j]).map(|(x, y)| x * y).sum();
            let qj = q[j].clone();
            q[i].iter_mut().zip(&qj).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = q[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 {
            q[i].iter_mut().for_each(|x| *x /= norm);
        }
    }
    q.into_iter().flatten().map(|v| v as f32).collect()
}

/// Starts a multi-run of `config` (its `multi_run` section) in a new run folder.
pub fn multi_run(
    config: &TrainConfig,
    runs_dir: &Path,
    sink: &dyn EventSink,
    cancel: &CancelToken,
) -> Result<MultiRunSummary> {
    config.validate().map_err(Error::InvalidOption)?;
    let resolved =
        crate::hub::resolve_model(&config.model, &crate::hub::HubOptions::from_env(), sink)?;
    let model_dir = std::fs::canonicalize(&resolved).map_err(|e| Error::io(&resolved, e))?;
    let data = std::fs::canonicalize(&config.data).map_err(|e| Error::io(&config.data, e))?;
    let slices = slice_lines(&data, config)?;
    let (_, stamp) = run::now_utc();
    let stem = data
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (_, dir) = run::create_unique_dir(runs_dir, &format!("{stamp}-{stem}-multi"))?;
    let lock = run::RunLock::acquire(&dir, "multi-run")?;
    let slices_dir = dir.join("slices");
    std::fs::create_dir_all(&slices_dir).map_err(|e| Error::io(&slices_dir, e))?;
    for (i, lines) in slices.iter().enumerate() {
        let mut text = lines.join("\n");
        text.push('\n');
        write_atomic(
            &dir.join("slices").join(format!("run-{}.jsonl", i + 1)),
            text.as_bytes(),
        )?;
    }
    let progress = Progress {
        config: config.clone(),
        model_dir,
        completed: 0,
        stage_dirs: Vec::new(),
    };
    save_progress(&dir, &progress)?;
    continue_runs(&lock, progress, sink, cancel)
}

/// Continues a multi-run after a crash or a stop, from the run it was in.
pub fn resume_multi_run(
    dir: &Path,
    sink: &dyn EventSink,
    cancel: &CancelToken,
) -> Result<MultiRunSummary> {
    let path = dir.join("multi_run.json");
    if !path.is_file() {
        return Err(Error::Run {
            path: dir.to_path_buf(),
            message: "not a multi-run folder (no multi_run.json)".into(),
        });
    }
    let lock = run::RunLock::acquire(dir, "multi-run")?;
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let progress: Progress = serde_json::from_str(&text).map_err(|e| Error::Run {
        path,
        message: format!("unreadable: {e}"),
    })?;
    continue_runs(&lock, progress, sink, cancel)
}

fn save_progress(dir: &Path, p: &Progress) -> Result<()> {
    let json = serde_json::to_string_pretty(p).expect("progress serializes");
    write_atomic(&dir.join("multi_run.json"), json.as_bytes())
}

/// The data's lines cut into `runs` consecutive slices, later slices extended by a
/// seeded `replay_ratio` share of earlier samples.
fn slice_lines(data: &Path, config: &TrainConfig) -> Result<Vec<Vec<String>>> {
    let raw = read_jsonl(data, &ReadOptions::default())?;
    let text = std::fs::read_to_string(data).map_err(|e| Error::io(data, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let records: Vec<String> = raw
        .samples
        .iter()
        .map(|s| {
            lines[s.line - 1]
                .trim_start_matches('\u{feff}')
                .trim_end_matches('\r')
                .to_string()
        })
        .collect();
    let runs = config.multi_run.runs as usize;
    if records.len() < runs {
        return Err(Error::InvalidOption(format!(
            "{} has {} samples but {runs} runs were asked for; each run needs at least one sample of its own",
            data.display(),
            records.len()
        )));
    }
    let n = records.len();
    let bounds: Vec<usize> = (0..=runs).map(|i| i * n / runs).collect();
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut slice: Vec<String> = records[bounds[i]..bounds[i + 1]].to_vec();
        let earlier = &records[..bounds[i]];
        let k = ((slice.len() as f64 * config.multi_run.replay_ratio).round() as usize)
            .min(earlier.len());
        if k > 0 {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed.wrapping_add(i as u64));
            slice.extend(earlier.choose_multiple(&mut rng, k).cloned());
        }
        out.push(slice);
    }
    Ok(out)
}

/// Runs the remaining stages; `lock` (held for the whole multi-run) names the folder.
fn continue_runs(
    lock: &run::RunLock,
    mut progress: Progress,
    sink: &dyn EventSink,
    cancel: &CancelToken,
) -> Result<MultiRunSummary> {
    let dir = lock.run_dir();
    let c = progress.config.clone();
    let model_config = ModelConfig::load(&progress.model_dir.join("config.json"))?;
    let stages_dir = dir.join("stages");
    let mut stages = Vec::new();
    for t in progress.completed + 1..=c.multi_run.runs {
        sink.emit(Event::Log {
            level: LogLevel::Info,
            message: format!("run {t} of {} ({:?})", c.multi_run.runs, c.multi_run.method),
        });
        let tag = move |mut e: Event| {
            if let Event::Step { run, .. } = &mut e {
                *run = t;
            }
            e
        };
        let forward = |e: Event| sink.emit(tag(e));
        let existing = find_stage(&stages_dir, t)?;
        let summary = match existing {
            Some(stage) => Trainer::resume(&stage, &forward, cancel)?,
            None => {
                let mut stage = c.clone();
                stage.model = progress.model_dir.display().to_string();
                stage.data = dir.join("slices").join(format!("run-{t}.jsonl"));
                stage.steps = c.multi_run.steps_per_run;
                stage.seed = c.seed.wrapping_add(t as u64 - 1);
                stage.init_adapter = (t > 1).then(|| dir.join("init").join(format!("run-{t}")));
                run_stage(stage, &stages_dir, t, &forward, cancel)?
            }
        };
        if summary.status != RunStatus::Finished {
            return Ok(MultiRunSummary {
                run_dir: dir.to_path_buf(),
                status: summary.status,
                completed_runs: progress.completed,
                stages: {
                    stages.push(summary);
                    stages
                },
                adapter: None,
            });
        }
        combine(dir, &model_config, &c, t, &summary.run_dir.join("adapter"))?;
        progress.completed = t;
        progress.stage_dirs.push(summary.run_dir.clone());
        save_progress(dir, &progress)?;
        stages.push(summary);
    }
    let adapter = dir.join("adapter");
    copy_adapter(&dir.join("merged"), &adapter)?;
    sink.emit(Event::Finished {
        steps: c.multi_run.steps_per_run * c.multi_run.runs as u64,
        final_loss: stages.last().and_then(|s| s.final_loss),
        path: adapter.display().to_string(),
    });
    Ok(MultiRunSummary {
        run_dir: dir.to_path_buf(),
        status: RunStatus::Finished,
        completed_runs: progress.completed,
        stages,
        adapter: Some(adapter),
    })
}

/// Runs one stage as an ordinary run named `run-N`.
fn run_stage(
    stage: TrainConfig,
    stages_dir: &Path,
    t: u32,
    sink: &dyn EventSink,
    cancel: &CancelToken,
) -> Result<RunSummary> {
    Trainer::from_config(stage)
        .runs_dir(stages_dir)
        .name(format!("run-{t}"))
        .start_with(sink, cancel)
}

/// The stage run folder of run `t`, if it was started before.
fn find_stage(stages_dir: &Path, t: u32) -> Result<Option<PathBuf>> {
    let suffix = format!("-run-{t}");
    let Ok(entries) = std::fs::read_dir(stages_dir) else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(&suffix) && entry.path().join("run.json").is_file() {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Folds run `t`'s adapter into `merged/` and writes the next run's starting adapter.
fn combine(
    dir: &Path,
    model: &ModelConfig,
    c: &TrainConfig,
    t: u32,
    stage_adapter: &Path,
) -> Result<()> {
    let device = Device::Cpu;
    let stage = LoraSet::load_peft(stage_adapter, model, &device)?;
    let merged_dir = dir.join("merged");
    let base_model = dir.display().to_string();
    let merged = if t == 1 || c.multi_run.method == MultiRunMethod::Sequential {
        stage.clone()
    } else {
        let acc = LoraSet::load_peft(&merged_dir, model, &device)?;
        let lambda = merge_weight(t);
        let mut layers = Vec::with_capacity(acc.layers.len());
        for (old, new) in acc.layers.iter().zip(&stage.layers) {
            let (b_old, b_new) = (old.b.as_tensor(), new.b.as_tensor());
            let b = (b_old + ((b_new - b_old)? * lambda)?)?;
            layers.push(crate::lora::LoraLayer {
                module: new.module.clone(),
                a: new.a.clone(),
                b: Var::from_tensor(&b)?,
            });
        }
        LoraSet {
            config: stage.config.clone(),
            layers,
        }
    };
    crate::train::write_adapter(&merged, &merged_dir, &base_model)?;
    if t < c.multi_run.runs {
        let next = match c.multi_run.method {
            MultiRunMethod::Sequential => merged,
            MultiRunMethod::Slao => {
                let mut layers = Vec::with_capacity(stage.layers.len());
                for l in &stage.layers {
                    let (r, n) = l.a.as_tensor().dims2()?;
                    let a = l.a.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    let q = Tensor::from_vec(orthonormal_rows(&a, r, n), (r, n), &device)?;
                    layers.push(crate::lora::LoraLayer {
                        module: l.module.clone(),
                        a: Var::from_tensor(&q)?,
                        b: l.b.clone(),
                    });
                }
                LoraSet {
                    config: stage.config.clone(),
                    layers,
                }
            }
        };
        let init = dir.join("init");
        std::fs::create_dir_all(&init).map_err(|e| Error::io(&init, e))?;
        crate::train::write_adapter(&next, &init.join(format!("run-{}", t + 1)), &base_model)?;
    }
    Ok(())
}

/// Copies an adapter folder whole (temporary folder, then rename), like the trainer
/// writes its own.
fn copy_adapter(from: &Path, to: &Path) -> Result<()> {
    crate::fsx::write_dir(to, |tmp| {
        for name in ["adapter_model.safetensors", "adapter_config.json"] {
            let bytes =
                std::fs::read(from.join(name)).map_err(|e| Error::io(from.join(name), e))?;
            write_atomic(&tmp.join(name), &bytes)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_weight_is_inverse_sqrt_clamped() {
        assert_eq!(merge_weight(1), 1.0);
        assert!((merge_weight(4) - 0.5).abs() < 1e-12);
        assert!((merge_weight(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn orthonormal_rows_span_and_are_orthonormal() {
        let a = [3.0f32, 0.0, 0.0, 1.0, 1.0, 0.0];
        let q = orthonormal_rows(&a, 2, 3);
        assert_eq!(&q[..3], &[1.0, 0.0, 0.0]);
        assert_eq!(&q[3..], &[0.0, 1.0, 0.0]);
    }
}
