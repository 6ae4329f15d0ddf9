//! [`Service`]: the calls of docs/http-api.md over the engine. Long work (training,
//! export, push) runs on its own thread with a cancel token; its events go to every
//! subscriber tagged with the job, and the job table records how it ended.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backpropagate::data::{
    encode_all_until, read_jsonl, ChatTemplate, Content, DataError, Diagnostic, EncodeOptions,
    Encoder, PrepareOptions, TemplateSource,
};
use backpropagate::event::{Event, EventSink, LogLevel};
use backpropagate::export::{self, ExportOptions};
use backpropagate::gpu::{ThermalChange, ThermalGuard};
use backpropagate::hub::{resolve_model, HubError, HubOptions, ModelSpec};
use backpropagate::model::ModelConfig;
use backpropagate::ollama::{self, OllamaClient, PushOptions};
use backpropagate::run::{list_runs, validate_run_id, RunDir, RunStatus};
use backpropagate::train::{CancelToken, TrainPlan, Trainer};
use backpropagate::TrainConfig;
use tokio::sync::broadcast;

use crate::dto::*;
use crate::error::{ErrorKind, Result, ServiceError};
use crate::limits::{too_large, DatasetUpload, RequestBudget, Slots};

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Runs live in `runs_dir`; uploaded datasets next to it in `datasets/`.
    pub runs_dir: PathBuf,
    /// OLLAMA_HOST-style address; `None` reads OLLAMA_HOST.
    pub ollama_host: Option<String>,
    /// Training pauses while the GPU is at or above this temperature (°C) and goes on
    /// 5 °C below it; `None` turns the guard off.
    pub thermal_limit_c: Option<f32>,
    /// Largest dataset upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Uploads written at the same time; more are refused as busy.
    pub max_concurrent_uploads: usize,
    /// Data checks run at the same time; more are refused as busy.
    pub max_concurrent_checks: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            runs_dir: backpropagate::run::default_runs_dir(),
            ollama_host: None,
            thermal_limit_c: Some(85.0),
            max_upload_bytes: 2 << 30,
            max_concurrent_uploads: 2,
            max_concurrent_checks: 2,
        }
    }
}

struct Job {
    info: JobInfo,
    cancel: CancelToken,
}

struct Inner {
    config: ServiceConfig,
    events: broadcast::Sender<JobEvent>,
    jobs: Mutex<Vec<Job>>,
    next_job: AtomicU64,
    /// Samples the first NVIDIA GPU once a second while the app runs (none without one).
    _gpu: Option<backpropagate::gpu::GpuMonitor>,
    gpu: backpropagate::gpu::GpuStatus,
    /// Set by the thermal guard; every training job's token shares it.
    thermal_pause: Arc<std::sync::atomic::AtomicBool>,
    /// One Ollama client for every call (building one costs a TLS setup), keyed by the
    /// host setting it was built for so a changed OLLAMA_HOST gets a new one.
    ollama: Mutex<Option<(String, OllamaClient)>>,
    uploads: Slots,
    checks: Slots,
}

/// Cheap to clone; every clone drives the same jobs.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn bad(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ErrorKind::BadRequest, message)
}

impl Service {
    pub fn new(config: ServiceConfig) -> Self {
        let (events, _) = broadcast::channel(4096);
        let gpu = backpropagate::gpu::probe();
        let thermal_pause = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = match &gpu {
            backpropagate::gpu::GpuStatus::Found { .. } => {
                let tx = events.clone();
                let guard = Mutex::new(config.thermal_limit_c.map(ThermalGuard::new));
                let pause = thermal_pause.clone();
                let sink = move |event: Event| {
                    let send = |event: Event| {
                        let _ = tx.send(JobEvent {
                            job: None,
                            kind: None,
                            run: None,
                            event,
                        });
                    };
                    if let Event::Gpu { temp_c, .. } = &event {
                        let mut guard = guard.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(g) = guard.as_mut() {
                            let limit = g.limit_c();
                            match g.update(*temp_c) {
                                Some(ThermalChange::Pause) => {
                                    pause.store(true, Ordering::SeqCst);
                                    send(Event::Log {
                                        level: LogLevel::Warn,
                                        message: format!("GPU at {temp_c:.0} °C (limit {limit:.0} °C): training pauses until it cools"),
                                    });
                                }
                                Some(ThermalChange::Resume) => {
                                    pause.store(false, Ordering::SeqCst);
                                    send(Event::Log {
                                        level: LogLevel::Info,
                                        message: format!(
                                            "GPU down to {temp_c:.0} °C: training goes on"
                                        ),
                                    });
                                }
                                None => {}
                            }
                        }
                    }
                    send(event);
                };
                backpropagate::gpu::GpuMonitor::start(
                    0,
                    std::time::Duration::from_secs(1),
                    Arc::new(sink),
                )
                .ok()
            }
            backpropagate::gpu::GpuStatus::Absent { .. } => None,
        };
        Service {
            inner: Arc::new(Inner {
                uploads: Slots::new(config.max_concurrent_uploads),
                checks: Slots::new(config.max_concurrent_checks),
                ollama: Mutex::new(None),
                config,
                events,
                jobs: Mutex::new(Vec::new()),
                next_job: AtomicU64::new(1),
                _gpu: monitor,
                gpu,
                thermal_pause,
            }),
        }
    }

    pub fn runs_dir(&self) -> &Path {
        &self.inner.config.runs_dir
    }

    fn datasets_dir(&self) -> PathBuf {
        let runs = self.runs_dir();
        runs.parent().unwrap_or(runs).join("datasets")
    }

    /// Every event of every job from now on. A subscriber that falls more than 4096
    /// events behind skips ahead (charts reload metrics from the run).
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.events.subscribe()
    }

    pub fn info(&self) -> AppInfo {
        AppInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            runs_dir: self.runs_dir().display().to_string(),
            // Only the address: no client (and no TLS setup) for a status line.
            ollama_host: ollama::parse_host(&ollama::host_setting(
                self.inner.config.ollama_host.as_deref(),
            ))
            .unwrap_or_default(),
            // Training runs on the CPU until the CUDA path lands (#9); a GPU is named.
            device: match &self.inner.gpu {
                backpropagate::gpu::GpuStatus::Found { gpus } => format!(
                    "cpu · GPU {} seen",
                    gpus.first().map(|g| g.name.as_str()).unwrap_or("")
                ),
                backpropagate::gpu::GpuStatus::Absent { .. } => "cpu".to_string(),
            },
        }
    }

    pub fn config_defaults(&self) -> TrainConfig {
        TrainConfig::default()
    }

    pub fn inspect_model(&self, req: &ModelRequest) -> Result<ModelInfo> {
        let dir = local_model(&req.model)?;
        let config_path = dir.join("config.json");
        let config = ModelConfig::load(&config_path)?;
        let raw: serde_json::Value = std::fs::read(&config_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let architecture = raw["architectures"][0].as_str().unwrap_or("").to_string();
        let template = ChatTemplate::from_model_dir(&dir)?;
        Ok(ModelInfo {
            path: dir.display().to_string(),
            architecture,
            hidden_size: config.hidden_size,
            layers: config.num_layers,
            vocab_size: config.vocab_size,
            parameters: config.parameter_count() as f64,
            chat_template: match template.source() {
                TemplateSource::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
                TemplateSource::FallbackChatml => None,
            },
        })
    }

    /// Models of earlier runs, newest first, each once.
    pub fn recent_models(&self) -> Result<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for run in self.runs()? {
            let m = run.model_dir.display().to_string();
            if seen.insert(m.clone()) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Stores an uploaded dataset (browser drops) and returns its path on this machine.
    pub fn save_upload(&self, name: &str, bytes: &[u8]) -> Result<UploadedDataset> {
        let mut upload = self.begin_upload(name, Some(bytes.len() as u64))?;
        upload.write(bytes)?;
        upload.finish()
    }

    /// Starts a streamed upload of a dataset named `name` (only its file name counts):
    /// refused when `declared_len` is over the size cap or when the server already
    /// writes as many uploads as it allows at once.
    pub fn begin_upload(&self, name: &str, declared_len: Option<u64>) -> Result<DatasetUpload> {
        let stem: String = Path::new(name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        if stem.is_empty() || stem.starts_with('.') {
            let shown: String = name.chars().take(80).collect();
            return Err(bad(format!("`{shown}` is not a usable file name"))
                .hint("Name the dataset file like data.jsonl."));
        }
        let limit = self.inner.config.max_upload_bytes;
        if declared_len.is_some_and(|n| n > limit) {
            return Err(too_large(limit));
        }
        let slot = self.inner.uploads.try_take().ok_or_else(|| {
            ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "{} uploads are already being received",
                    self.inner.uploads.max()
                ),
            )
            .hint("Wait until an upload finishes, then try again.")
        })?;
        let dir = self.datasets_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            ServiceError::new(ErrorKind::Internal, format!("{}: {e}", dir.display()))
        })?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".upload-{}-{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| {
            ServiceError::new(ErrorKind::Internal, format!("{}: {e}", tmp.display()))
        })?;
        Ok(DatasetUpload {
            tmp,
            dir,
            stem,
            file: Some(file),
            hasher: Default::default(),
            written: 0,
            limit,
            _slot: slot,
        })
    }

    /// Validates and tokenizes the data for the model, and renders the first samples.
    pub fn check_data(&self, req: &DataCheckRequest) -> Result<DataReport> {
        self.check_data_within(req, &RequestBudget::unbounded())
    }

    /// [`Service::check_data`] that stops between its stages once `budget` is cancelled
    /// or spent. The report says what a dataset report needs and no more: at most
    /// [`MAX_SHOWN_SAMPLES`] samples of at most [`MAX_SAMPLE_CHARS`] characters, and
    /// problems that name JSON keys and roles only when they are ones the formats use.
    pub fn check_data_within(
        &self,
        req: &DataCheckRequest,
        budget: &RequestBudget,
    ) -> Result<DataReport> {
        let _slot = self.inner.checks.try_take().ok_or_else(|| {
            ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "{} data checks are already running",
                    self.inner.checks.max()
                ),
            )
            .hint("Wait until a check finishes, then try again.")
        })?;
        let what = "the data check";
        budget.check(what)?;
        let model = local_model(&req.model)?;
        let data = PathBuf::from(&req.data);
        let encoder = Encoder::from_model_dir(&model)?;
        budget.check(what)?;
        let defaults = TrainConfig::default();
        let options = PrepareOptions {
            encode: EncodeOptions {
                max_seq_len: req.max_seq_len.unwrap_or(defaults.max_seq_len),
                train_on: defaults.train_on,
            },
            ..PrepareOptions::default()
        };
        let template = match encoder.template().source() {
            TemplateSource::File(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            TemplateSource::FallbackChatml => "ChatML (model has none)".to_string(),
        };
        let prepared = match read_jsonl(&data, &options.read).and_then(|raw| {
            budget
                .check(what)
                .map_err(|e| DataError::Io {
                    path: data.clone(),
                    source: std::io::Error::other(e.message),
                })
                .map(|()| raw)
                .and_then(|raw| {
                    encode_all_until(raw, &encoder, &options, &|| budget.check(what).is_err())
                })
        }) {
            Ok(p) => p,
            Err(DataError::Io { path, source }) => {
                budget.check(what)?;
                return Err(ServiceError::new(
                    ErrorKind::NotFound,
                    format!("cannot read {}: {source}", path.display()),
                ));
            }
            Err(e @ DataError::Invalid { .. }) => {
                let more = match &e {
                    DataError::Invalid { more, .. } => *more,
                    DataError::Io { .. } => 0,
                };
                return Ok(DataReport {
                    ok: false,
                    path: data.display().to_string(),
                    stats: None,
                    template,
                    warnings: Vec::new(),
                    problems: e.problems().iter().map(redact_file_text).collect(),
                    more_problems: more,
                    samples: Vec::new(),
                });
            }
        };
        budget.check(what)?;
        let samples = prepared
            .samples
            .iter()
            .zip(&prepared.encoded)
            .take(req.show.unwrap_or(3).min(MAX_SHOWN_SAMPLES))
            .map(|(sample, enc)| SamplePreview {
                line: sample.line,
                text: clip(match &sample.content {
                    Content::Chat(m) => encoder.template().render(m, false).unwrap_or_default(),
                    Content::Text(t) => t.clone(),
                }),
                tokens: enc.input_ids.len(),
                trainable_tokens: enc.labels.iter().filter(|&&l| l >= 0).count(),
            })
            .collect();
        Ok(DataReport {
            ok: true,
            path: prepared.path.display().to_string(),
            stats: Some(prepared.stats),
            template,
            warnings: prepared.warnings.iter().map(redact_file_text).collect(),
            problems: Vec::new(),
            more_problems: 0,
            samples,
        })
    }

    fn runs(&self) -> Result<Vec<backpropagate::run::RunInfo>> {
        let mut runs = list_runs(self.runs_dir())?;
        runs.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        Ok(runs)
    }

    pub fn list_runs(&self) -> Result<Vec<backpropagate::run::RunInfo>> {
        let mut runs = self.runs()?;
        // A run marked running but with no live job was killed: show it as stopped.
        let live: BTreeSet<String> = self
            .jobs()
            .into_iter()
            .filter(|j| j.state == JobState::Running)
            .filter_map(|j| j.run)
            .collect();
        for r in &mut runs {
            if r.status == RunStatus::Running && !live.contains(&r.id) {
                r.status = RunStatus::Stopped;
            }
        }
        Ok(runs)
    }

    /// The folder of run `id`, which must name a run directly under the runs dir: an
    /// id is never read as a path, so `..`, `a/b` or `/abs` cannot reach other folders.
    fn run_dir(&self, id: &str) -> Result<PathBuf> {
        validate_run_id(id).map_err(|e| {
            ServiceError::new(ErrorKind::BadRequest, e.to_string())
                .hint("Pick a run from the Runs list.")
        })?;
        let dir = self.runs_dir().join(id);
        if !dir.join("run.json").is_file() {
            return Err(ServiceError::new(
                ErrorKind::NotFound,
                format!("no run `{id}` under {}", self.runs_dir().display()),
            )
            .hint("Pick a run from the Runs list."));
        }
        Ok(dir)
    }

    pub fn get_run(&self, id: &str) -> Result<RunDetail> {
        let dir = self.run_dir(id)?;
        let run = RunDir::open(&dir)?;
        let mut exports = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("exports")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                exports.push(ExportInfo {
                    bytes: dir_size(&e.path()),
                    path: e.path().display().to_string(),
                    name,
                });
            }
        }
        exports.sort_by(|a, b| a.name.cmp(&b.name));
        let mut info = run.info()?;
        if info.status == RunStatus::Running && !self.run_is_live(&info.id) {
            info.status = RunStatus::Stopped;
        }
        Ok(RunDetail {
            info,
            config: run.config()?,
            metrics: run.metrics()?,
            exports,
        })
    }

    fn run_is_live(&self, run: &str) -> bool {
        self.jobs()
            .iter()
            .any(|j| j.state == JobState::Running && j.run.as_deref() == Some(run))
    }

    pub fn list_jobs(&self) -> Vec<JobInfo> {
        self.jobs()
    }

    fn jobs(&self) -> Vec<JobInfo> {
        self.inner
            .jobs
            .lock()
            .map(|j| j.iter().map(|j| j.info.clone()).collect())
            .unwrap_or_default()
    }

    fn update_job(&self, id: &str, f: impl FnOnce(&mut JobInfo)) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            if let Some(j) = jobs.iter_mut().find(|j| j.info.id == id) {
                f(&mut j.info);
            }
        }
    }

    /// Registers a job and runs `work` on a thread with a sink that tags events.
    fn spawn_job(
        &self,
        kind: JobKind,
        run: Option<String>,
        work: impl FnOnce(&dyn EventSink, &CancelToken) -> Result<String> + Send + 'static,
    ) -> Result<JobInfo> {
        let id = format!("j{}", self.inner.next_job.fetch_add(1, Ordering::SeqCst));
        let cancel = if kind == JobKind::Train {
            CancelToken::with_pause(self.inner.thermal_pause.clone())
        } else {
            CancelToken::default()
        };
        let info = JobInfo {
            id: id.clone(),
            kind,
            run: run.clone(),
            state: JobState::Running,
            error: None,
            result: None,
        };
        {
            let mut jobs = self
                .inner
                .jobs
                .lock()
                .map_err(|_| ServiceError::new(ErrorKind::Internal, "job table poisoned"))?;
            if kind == JobKind::Train
                && jobs
                    .iter()
                    .any(|j| j.info.kind == JobKind::Train && j.info.state == JobState::Running)
            {
                return Err(ServiceError::new(
                    ErrorKind::Conflict,
                    "a training run is already going",
                )
                .hint("Stop it first, or wait until it finishes."));
            }
            if let Some(r) = &run {
                if jobs
                    .iter()
                    .any(|j| j.info.state == JobState::Running && j.info.run.as_ref() == Some(r))
                {
                    return Err(ServiceError::new(
                        ErrorKind::Conflict,
                        format!("run {r} is busy with another job"),
                    )
                    .hint("Wait until it finishes."));
                }
            }
            jobs.push(Job {
                info: info.clone(),
                cancel: cancel.clone(),
            });
        }
        let service = self.clone();
        let job_id = id.clone();
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let run_id = Arc::new(Mutex::new(run));
                let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let sink = {
                    let service = service.clone();
                    let run_id = run_id.clone();
                    let job_id = job_id.clone();
                    let ended = ended.clone();
                    move |event: Event| {
                        match &event {
                            Event::Started { run_id: r, .. } => {
                                if let Ok(mut cur) = run_id.lock() {
                                    *cur = Some(r.clone());
                                }
                                let r = r.clone();
                                service.update_job(&job_id, |j| j.run = Some(r));
                            }
                            // The job ends with its terminal event, so a client reacting to
                            // it (resume, export) finds the job no longer running.
                            Event::Finished { path, .. } | Event::Stopped { path, .. } => {
                                ended.store(true, Ordering::SeqCst);
                                let state = if matches!(event, Event::Stopped { .. }) {
                                    JobState::Stopped
                                } else {
                                    JobState::Finished
                                };
                                let path = path.clone();
                                service.update_job(&job_id, |j| {
                                    j.state = state;
                                    j.result = Some(path);
                                });
                            }
                            Event::Failed { error, .. } => {
                                ended.store(true, Ordering::SeqCst);
                                let error = error.clone();
                                service.update_job(&job_id, |j| {
                                    j.state = JobState::Failed;
                                    j.error = Some(error);
                                });
                            }
                            _ => {}
                        }
                        let run = run_id.lock().ok().and_then(|r| r.clone());
                        let _ = service.inner.events.send(JobEvent {
                            job: Some(job_id.clone()),
                            kind: Some(kind),
                            run,
                            event,
                        });
                    }
                };
                let outcome = work(&sink, &cancel);
                // Training reports its own end; exports, pushes and early failures end here,
                // so every job's stream ends with exactly one terminal event.
                if !ended.load(Ordering::SeqCst) {
                    match outcome {
                        Ok(result) => sink(Event::Finished {
                            steps: 0,
                            final_loss: None,
                            path: result,
                        }),
                        Err(e) => sink(Event::Failed {
                            error: e.message,
                            hint: e.hint,
                        }),
                    }
                }
            })
            .map_err(|e| {
                ServiceError::new(
                    ErrorKind::Internal,
                    format!("cannot start a worker thread: {e}"),
                )
            })?;
        Ok(info)
    }

    /// Downloads a repo id into the Hugging Face cache as a job with byte progress;
    /// the job's `Finished.path` is the model folder.
    pub fn download_model(&self, req: &ModelRequest) -> Result<JobInfo> {
        if let ModelSpec::Local(p) = ModelSpec::parse(&req.model) {
            return Err(
                bad(format!("{} is a local path, not a repo id", p.display()))
                    .hint("Give a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct."),
            );
        }
        let model = req.model.clone();
        self.spawn_job(JobKind::Download, None, move |sink, _| {
            let dir = resolve_model(&model, &HubOptions::from_env(), sink)?;
            Ok(dir.display().to_string())
        })
    }

    /// The config as a run would take it: validated, its model a local folder, its
    /// data an existing file.
    fn runnable(config: TrainConfig) -> Result<TrainConfig> {
        config
            .validate()
            .map_err(|m| bad(m).hint("Fix the field named above in the Train form."))?;
        let mut config = config;
        config.model = local_model(&config.model)?.display().to_string();
        if !config.data.is_file() {
            return Err(ServiceError::new(
                ErrorKind::NotFound,
                format!("{}: no such data file", config.data.display()),
            )
            .hint("Drop a JSONL file on the Data screen first."));
        }
        Ok(config)
    }

    /// What `start_training` would do with this config (rows, batch, epochs,
    /// checkpointing, memory against what is free), without starting anything.
    pub fn plan_training(&self, req: StartTraining) -> Result<TrainPlan> {
        let config = Self::runnable(req.config)?;
        Ok(Trainer::from_config(config)
            .runs_dir(self.runs_dir())
            .plan()?)
    }

    pub fn start_training(&self, req: StartTraining) -> Result<JobInfo> {
        let config = Self::runnable(req.config)?;
        let runs_dir = self.runs_dir().to_path_buf();
        self.spawn_job(JobKind::Train, None, move |sink, cancel| {
            let summary = Trainer::from_config(config)
                .runs_dir(runs_dir)
                .start_with(sink, cancel)?;
            Ok(summary.run_dir.display().to_string())
        })
    }

    pub fn resume_run(&self, id: &str) -> Result<JobInfo> {
        let dir = self.run_dir(id)?;
        let info = RunDir::open(&dir)?.info()?;
        if info.status == RunStatus::Finished {
            return Err(bad(format!("run {id} already finished all its steps"))
                .hint("Start a new run to train more."));
        }
        self.spawn_job(JobKind::Train, Some(info.id), move |sink, cancel| {
            let summary = Trainer::resume(&dir, sink, cancel)?;
            Ok(summary.run_dir.display().to_string())
        })
    }

    pub fn stop_job(&self, job: &str) -> Result<JobInfo> {
        let jobs = self
            .inner
            .jobs
            .lock()
            .map_err(|_| ServiceError::new(ErrorKind::Internal, "job table poisoned"))?;
        let j = jobs
            .iter()
            .find(|j| j.info.id == job)
            .ok_or_else(|| ServiceError::new(ErrorKind::NotFound, format!("no job {job}")))?;
        j.cancel.cancel();
        Ok(j.info.clone())
    }

    pub fn export_run(&self, id: &str, req: &ExportRequest) -> Result<JobInfo> {
        let dir = self.run_dir(id)?;
        let options = ExportOptions::parse(&req.format, &req.quantization)?;
        let run = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        self.spawn_job(JobKind::Export, run, move |sink, _| {
            let out = export::export(&dir, &options, sink)?;
            Ok(out.display().to_string())
        })
    }

    pub fn push_run(&self, id: &str, req: &PushRequest) -> Result<JobInfo> {
        let dir = self.run_dir(id)?;
        ollama::validate_name(&req.name)?;
        let mut options = PushOptions::new(req.name.clone());
        options.quant = req.quantization.parse().map_err(|m: String| bad(m))?;
        options.as_adapter = req.as_adapter;
        options.overwrite = req.overwrite;
        options.host = self.inner.config.ollama_host.clone();
        let run = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        self.spawn_job(JobKind::Push, run, move |sink, cancel| {
            options.cancel = Some(cancel.clone());
            let report = ollama::push_run(&dir, &options, sink)?;
            Ok(report.name)
        })
    }

    fn ollama_client(&self) -> Result<OllamaClient> {
        let setting = ollama::host_setting(self.inner.config.ollama_host.as_deref());
        let mut cached = self.inner.ollama.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_for, client)) = cached.as_ref() {
            if *built_for == setting {
                return Ok(client.clone());
            }
        }
        let client = OllamaClient::new(&setting)?;
        *cached = Some((setting, client.clone()));
        Ok(client)
    }

    pub async fn ollama_status(&self) -> OllamaStatus {
        let client = match self.ollama_client() {
            Ok(c) => c,
            Err(e) => {
                return OllamaStatus {
                    host: String::new(),
                    running: false,
                    version: None,
                    error: Some(e.message),
                    hint: e.hint,
                }
            }
        };
        let client = client.with_timeout(std::time::Duration::from_secs(5));
        match client.version().await {
            Ok(v) => OllamaStatus {
                host: client.host().to_string(),
                running: true,
                version: Some(v),
                error: None,
                hint: None,
            },
            Err(e) => OllamaStatus {
                host: client.host().to_string(),
                running: false,
                version: None,
                hint: e.hint(),
                error: Some(e.to_string()),
            },
        }
    }

    pub async fn ollama_models(&self) -> Result<Vec<OllamaModel>> {
        let models = self.ollama_client()?.tags().await?;
        Ok(models
            .into_iter()
            .map(|m| OllamaModel {
                name: m.name,
                size: m.size,
                modified_at: m.modified_at,
            })
            .collect())
    }

    pub async fn ollama_chat(&self, req: &ChatRequest) -> Result<ChatMessage> {
        if req.messages.is_empty() {
            return Err(bad("there is no message to send"));
        }
        let messages: Vec<ollama::ChatMessage> = req
            .messages
            .iter()
            .map(|m| ollama::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let reply = self
            .ollama_client()?
            .chat(&req.model, &messages, 256)
            .await?;
        Ok(ChatMessage {
            role: reply.role,
            content: reply.content,
        })
    }
}

/// Most samples a data check renders, whatever the request asks.
pub const MAX_SHOWN_SAMPLES: usize = 20;
/// Longest rendered sample in a data check, in characters; longer ones are cut with `…`.
pub const MAX_SAMPLE_CHARS: usize = 8192;

fn clip(text: String) -> String {
    match text.char_indices().nth(MAX_SAMPLE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// Names a diagnostic may quote from the file: the keys and roles of the formats the
/// reader knows. Anything else the file says (an unknown key or role, which in a file
/// that is no dataset may be a secret) is shown as `…`.
const FORMAT_NAMES: &[&str] = &[
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "text",
    "system",
    "user",
    "assistant",
    "human",
    "gpt",
    "tool",
    "type",
    "name",
];

fn redact_file_text(d: &Diagnostic) -> Diagnostic {
    let mut d = d.clone();
    d.message = redact(&d.message);
    d.hint = d.hint.as_deref().map(redact);
    d
}

/// Replaces quoted file text by `…`: from the first `backtick` span that is not a format
/// name to the message's last backtick (a quoted value may itself hold backticks), and
/// each key of a `(found: a, b)` list that is not a format name.
fn redact(text: &str) -> String {
    let keep = |s: &str| FORMAT_NAMES.contains(&s) || s.starts_with('"') || s.is_empty();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('`') {
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        let inner = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..open]);
        if keep(inner) {
            out.push('`');
            out.push_str(inner);
            out.push('`');
            rest = &rest[open + len + 2..];
        } else {
            out.push_str("`…`");
            let last = rest.rfind('`').unwrap_or(open + len + 1);
            rest = &rest[last + 1..];
        }
    }
    out.push_str(rest);
    if let (Some(at), Some(close)) = (out.find("(found: "), out.rfind(')')) {
        if close > at {
            let shown: Vec<&str> = out[at + 8..close]
                .split(", ")
                .map(|k| if FORMAT_NAMES.contains(&k) { k } else { "…" })
                .collect();
            out = format!(
                "{}(found: {}){}",
                &out[..at],
                shown.join(", "),
                &out[close + 1..]
            );
        }
    }
    out
}

/// A local folder, or a repo id already in the Hugging Face cache. A repo that is not
/// there yet is an error pointing at `download_model`, so that a quick call never
/// starts a multi-gigabyte download by surprise.
fn local_model(model: &str) -> Result<PathBuf> {
    if let ModelSpec::Repo { .. } = ModelSpec::parse(model) {
        let mut options = HubOptions::from_env();
        options.offline = true;
        return resolve_model(model, &options, &backpropagate::event::Silent).map_err(|e| {
            ServiceError::new(
                ErrorKind::NotFound,
                format!("{model} is not downloaded yet"),
            )
            .hint(match e {
                backpropagate::Error::Hub(h @ HubError::NotCached { .. }) => format!(
                    "Download it first (the Download button, or `backprop model pull {model}`); {}",
                    h.hint().unwrap_or_default()
                ),
                other => other.to_string(),
            })
        });
    }
    let path = PathBuf::from(model);
    // A GGUF file or an Ollama model is read once into a model folder (gguf_base).
    if model.starts_with(backpropagate::gguf_base::OLLAMA_PREFIX)
        || backpropagate::gguf_base::is_gguf(&path)
    {
        return Ok(resolve_model(
            model,
            &HubOptions::from_env(),
            &backpropagate::event::Silent,
        )?);
    }
    if path.join("config.json").is_file() {
        return Ok(path);
    }
    if path.exists() {
        return Err(bad(format!("{model} has no config.json")).hint(
            "Pick the folder that holds config.json, tokenizer.json and the .safetensors files, or a .gguf file.",
        ));
    }
    Err(ServiceError::new(
        ErrorKind::NotFound,
        format!("{model}: no such model folder"),
    )
    .hint(
        "Give a local model folder, or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct.",
    ))
}

fn dir_size(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|es| es.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}
