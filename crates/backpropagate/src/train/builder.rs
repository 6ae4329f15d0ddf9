//! The public entry points: a builder over `TrainConfig` that starts or resumes a run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::prepare::Session;
use super::{CancelToken, RunSummary};
use crate::config::{BatchSize, TrainConfig};
use crate::error::{Error, Result};
use crate::event::{EventSink, Silent};
use crate::run::{self, RunDir, RunInfo, RunStatus};

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
        let (model_dir, data) = self.inputs(sink)?;
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

    /// The checked configuration's model folder and data file, absolute; a repo id
    /// downloads into the shared HF cache (or is found there) first.
    fn inputs(&self, sink: &dyn EventSink) -> Result<(PathBuf, PathBuf)> {
        self.config.validate().map_err(Error::InvalidOption)?;
        let model_dir = absolute(&crate::hub::resolve_model(
            &self.config.model,
            &crate::hub::HubOptions::from_env(),
            sink,
        )?)?;
        Ok((model_dir, absolute(&self.config.data)?))
    }

    /// What a run with this configuration would do — rows, batch, epochs, gradient
    /// checkpointing, precision, base storage, predicted peak memory against the free
    /// memory — decided exactly as `start` decides it, with nothing written and no
    /// weights loaded (`backprop train --dry-run`).
    pub fn plan(&self) -> Result<super::TrainPlan> {
        let sink = self.sink.as_ref();
        let (model_dir, data) = self.inputs(sink)?;
        let info = RunInfo {
            id: String::new(),
            created: String::new(),
            model_dir,
            data,
            data_sha256: String::new(),
            status: RunStatus::Running,
            step: 0,
        };
        Ok(Session::prepare(&self.config, &info, sink, self.memory_limit)?.plan())
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
        // Steps after the checkpoint are trained (and reported) again.
        info.step = checkpoint.as_ref().map_or(0, |(step, _)| *step);
        session.run(run, info, checkpoint.map(|(_, p)| p), sink, cancel)
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
