// The app's state, shared by the screens: the chosen model and data, the training form,
// jobs and their progress, the run shown on the Train screen with its chart series, GPU
// samples and Ollama's status. One event subscription feeds all of it.

import { ApiFailure, toFailure, type Backend, type Connection, type DroppedFile } from '../api/backend';
import { GpuSeries, TrainSeries } from '../charts/series';
import type { AppInfo } from '../generated/AppInfo';
import type { DataReport } from '../generated/DataReport';
import type { Event } from '../generated/Event';
import type { JobEvent } from '../generated/JobEvent';
import type { JobInfo } from '../generated/JobInfo';
import type { LogLevel } from '../generated/LogLevel';
import type { ModelInfo } from '../generated/ModelInfo';
import type { OllamaModel } from '../generated/OllamaModel';
import type { OllamaStatus } from '../generated/OllamaStatus';
import type { RunInfo } from '../generated/RunInfo';
import type { TrainConfig } from '../generated/TrainConfig';
import type { TrainPlan } from '../generated/TrainPlan';
import { basename, fmtLoss } from './format';

export type Screen = 'model' | 'data' | 'train' | 'runs' | 'export';
export type StepEvent = Extract<Event, { type: 'Step' }>;
export type GpuEvent = Extract<Event, { type: 'Gpu' }>;

export interface LogLine {
  id: number;
  level: LogLevel;
  message: string;
}

export interface Progress {
  stage: string;
  done: number;
  total: number;
}

/** A job as the UI knows it: the server's JobInfo plus what its events said. */
export interface JobView {
  info: JobInfo;
  progress: Progress | null;
  step: StepEvent | null;
  /** Total steps of a training job, when known (from the config it was started with). */
  totalSteps: number | null;
  hint: string | null;
  /** The job's latest `Log` line (download jobs show it under their progress bar). */
  lastLog: string | null;
  /** Order of appearance, newest highest. */
  seq: number;
}

/** Where the run on the Train screen stands. */
export type LiveStatus = 'idle' | 'starting' | 'running' | 'finished' | 'stopped' | 'failed';

const LOG_CAP = 200;

/**
 * Whether a model field's value reads as a Hugging Face repo id (`org/name`) rather than
 * a local folder: exactly one '/', no backslash, not starting with '/', '.' or '~'.
 */
export function looksLikeRepoId(value: string): boolean {
  const v = value.trim();
  if (!v || /^[/.~]/.test(v) || v.includes('\\')) return false;
  const parts = v.split('/');
  return parts.length === 2 && parts[0] !== '' && parts[1] !== '';
}

/** The server's answer to inspecting a repo id that is not in the local cache yet. */
export function isNotDownloaded(e: { error: string } | null): boolean {
  return !!e && /not downloaded yet/i.test(e.error);
}

export class App {
  backend!: Backend;
  status = $state<'loading' | 'ready' | 'failed'>('loading');
  fatal = $state.raw<ApiFailure | null>(null);
  connection = $state<Connection>('connecting');
  info = $state.raw<AppInfo | null>(null);
  screen = $state<Screen>('model');
  dragging = $state(false);

  // Model
  model = $state('');
  modelInfo = $state.raw<ModelInfo | null>(null);
  recent = $state.raw<string[]>([]);
  modelBusy = $state(false);
  modelError = $state.raw<ApiFailure | null>(null);
  /** The download job shown on the Model screen, and the repo id it fetches (null when adopted at load). */
  downloadJob = $state<string | null>(null);
  downloadRepo = $state<string | null>(null);
  downloadStarting = $state(false);
  /** Why the download could not start (the job's own failure is on its JobView). */
  downloadError = $state.raw<ApiFailure | null>(null);

  // Data
  dataPath = $state('');
  dataName = $state('');
  dataReport = $state.raw<DataReport | null>(null);
  dataBusy = $state<null | 'uploading' | 'checking'>(null);
  dataError = $state.raw<ApiFailure | null>(null);

  // Train
  config = $state<TrainConfig | null>(null);
  defaults: TrainConfig | null = null;
  jobs = $state<Record<string, JobView>>({});
  liveRun = $state<string | null>(null);
  liveJob = $state<string | null>(null);
  liveRunInfo = $state.raw<RunInfo | null>(null);
  liveTotal = $state<number | null>(null);
  liveStep = $state.raw<StepEvent | null>(null);
  liveError = $state.raw<{ error: string; hint: string | null } | null>(null);
  starting = $state(false);
  /** The plan for the settings as they were when asked (`planFor`), or why there is none. */
  plan = $state.raw<TrainPlan | null>(null);
  planFor = $state<string | null>(null);
  planBusy = $state(false);
  planError = $state.raw<ApiFailure | null>(null);
  readonly series = new TrainSeries();
  seriesVersion = $state(0);
  logs = $state.raw<LogLine[]>([]);
  readonly gpu = new GpuSeries();
  gpuVersion = $state(0);

  // Runs and Ollama
  runs = $state.raw<RunInfo[]>([]);
  ollama = $state.raw<OllamaStatus | null>(null);
  ollamaModels = $state.raw<OllamaModel[]>([]);
  /** Run preselected on the Export screen. */
  exportRun = $state('');

  private seq = 0;
  private logId = 0;
  /** While a run's saved metrics load, its streamed events wait here, then apply in order. */
  private loading: { run: string; buffer: JobEvent[] } | null = null;
  private wasConnected = false;
  /** Events of training jobs seen while a start call is under way: possibly its own. */
  private early: JobEvent[] = [];
  /** The download job whose model was inspected after it finished (once per job). */
  private downloadInspected: string | null = null;
  private timers: ReturnType<typeof setInterval>[] = [];
  private stops: (() => void)[] = [];

  /** The newest running job, for the header. */
  currentJob = $derived.by<JobView | null>(() => {
    let best: JobView | null = null;
    for (const j of Object.values(this.jobs)) {
      if (j.info.state === 'running' && (!best || j.seq > best.seq)) best = j;
    }
    return best;
  });

  liveStatus = $derived.by<LiveStatus>(() => {
    if (this.starting) return 'starting';
    const job = this.liveJob ? this.jobs[this.liveJob] : undefined;
    if (job) return job.info.state;
    return this.liveRunInfo?.status ?? 'idle';
  });

  async init(backend: Backend): Promise<void> {
    this.backend = backend;
    this.stops.push(
      backend.subscribe(
        (e) => this.onEvent(e),
        (c) => this.onConnection(c),
      ),
      backend.onFileDrop(
        (f) => void this.useFile(f),
        (over) => (this.dragging = over),
      ),
    );
    try {
      const [info, defaults, jobs] = await Promise.all([
        backend.info(),
        backend.configDefaults(),
        backend.listJobs(),
      ]);
      this.info = info;
      this.defaults = defaults;
      this.config = structuredClone(defaults);
      for (const j of jobs) this.upsertJob(j);
      this.status = 'ready';
    } catch (e) {
      this.fatal = toFailure(e);
      this.status = 'failed';
      return;
    }
    void this.refreshRecent();
    void this.refreshRuns();
    void this.refreshOllama();
    // A training job already running (started before this page loaded) is shown live.
    const running = jobsNewestFirst(this.jobs).find((j) => j.info.kind === 'train' && j.info.state === 'running');
    if (running?.info.run) void this.watchRun(running.info.run, running.info.id);
    // So is a download still under way; its model is inspected by folder when it ends.
    const download = jobsNewestFirst(this.jobs).find((j) => j.info.kind === 'download' && j.info.state === 'running');
    if (download) this.downloadJob = download.info.id;
    this.timers.push(setInterval(() => void this.refreshOllama(), 15_000));
  }

  dispose(): void {
    this.stops.forEach((s) => s());
    this.timers.forEach((t) => clearInterval(t));
  }

  // ---- events -------------------------------------------------------------------------

  onEvent(je: JobEvent): void {
    const e = je.event;
    if (e.type === 'Gpu') {
      this.gpu.apply(e);
      this.gpuVersion = this.gpu.version;
      return;
    }
    if (je.job) this.trackJob(je);
    const forLive =
      je.kind === 'train' &&
      ((je.job !== null && je.job === this.liveJob) || (je.run !== null && je.run === this.liveRun));
    if (!forLive) {
      // The job's first events can beat the answer to start_training.
      if (this.starting && !this.liveJob && je.kind === 'train') this.early.push(je);
      return;
    }
    if (je.run && !this.liveRun) this.liveRun = je.run;
    if (this.loading && this.loading.run === this.liveRun) {
      this.loading.buffer.push(je);
      return;
    }
    this.applyLive(e);
  }

  private trackJob(je: JobEvent): void {
    const id = je.job!;
    let j = this.jobs[id];
    if (!j) {
      this.upsertJob({ id, kind: je.kind ?? 'train', run: je.run, state: 'running', error: null, result: null });
      j = this.jobs[id];
    }
    if (je.run && !j.info.run) j.info.run = je.run;
    const e = je.event;
    switch (e.type) {
      case 'Started':
        j.info.run = e.run_id;
        j.totalSteps = e.total_steps;
        break;
      case 'Progress':
        j.progress = { stage: e.stage, done: e.done, total: e.total };
        break;
      case 'Log':
        j.lastLog = e.message;
        break;
      case 'Step':
        j.step = e;
        break;
      case 'Finished':
        j.info.state = 'finished';
        j.info.result = j.info.result ?? e.path;
        this.onJobEnded(j);
        break;
      case 'Stopped':
        j.info.state = 'stopped';
        j.info.result = j.info.result ?? e.path;
        this.onJobEnded(j);
        break;
      case 'Failed':
        // Servers before the `Stopped` event said Failed{error: "stopped"}.
        j.info.state = e.error === 'stopped' ? 'stopped' : 'failed';
        j.info.error = e.error;
        j.hint = e.hint;
        this.onJobEnded(j);
        break;
      default:
        break;
    }
  }

  private applyLive(e: Event): void {
    switch (e.type) {
      case 'Started':
        // A resume starts after its checkpoint: what the chart has past it is discarded,
        // as the engine discards it from metrics.jsonl.
        this.series.keepUpTo(e.start_step);
        this.seriesVersion = this.series.version;
        this.liveRun = e.run_id;
        this.liveTotal = e.total_steps;
        this.liveError = null;
        if (e.start_step > 0) this.log('info', `resuming from step ${e.start_step}`);
        break;
      case 'Step':
        this.series.apply(e);
        this.seriesVersion = this.series.version;
        this.liveStep = e;
        break;
      case 'Eval':
        this.series.apply(e);
        this.seriesVersion = this.series.version;
        this.log('info', `eval loss ${fmtLoss(e.loss)} at step ${e.step}`);
        break;
      case 'Log':
        this.log(e.level, e.message);
        break;
      case 'Checkpoint':
        this.log('info', `checkpoint at step ${e.step}`);
        break;
      case 'Stopped':
        this.log('warn', `stopped at step ${e.step}; resume continues from there`);
        this.liveError = null;
        break;
      case 'Finished':
        this.log('info', `finished after ${e.steps} steps${e.final_loss != null ? `, loss ${fmtLoss(e.final_loss)}` : ''}`);
        this.liveError = null;
        break;
      case 'Failed':
        this.log(e.error === 'stopped' ? 'warn' : 'error', e.error === 'stopped' ? 'stopped' : e.error);
        if (e.hint) this.log('info', e.hint);
        this.liveError = e.error === 'stopped' ? null : { error: e.error, hint: e.hint };
        break;
      default:
        break;
    }
  }

  private log(level: LogLevel, message: string): void {
    const next = this.logs.length >= LOG_CAP ? this.logs.slice(this.logs.length - LOG_CAP + 1) : this.logs.slice();
    next.push({ id: ++this.logId, level, message });
    this.logs = next;
  }

  private onJobEnded(j: JobView): void {
    void this.refreshRuns();
    if (j.info.kind === 'train' && j.info.run && j.info.run === this.liveRun) void this.refreshLiveInfo();
    if (j.info.kind === 'push' && j.info.state === 'finished') void this.refreshOllamaModels();
    if (j.info.kind === 'download') this.afterDownload(j);
  }

  private onConnection(c: Connection): void {
    if (c === 'lagged') {
      if (this.status === 'ready') void this.resync();
      return;
    }
    this.connection = c;
    if (c !== 'open') return;
    // Events sent while the stream was down are lost: catch up from the server's state.
    if (this.wasConnected && this.status === 'ready') void this.resync();
    this.wasConnected = true;
  }

  private async resync(): Promise<void> {
    try {
      for (const j of await this.backend.listJobs()) this.upsertJob(j);
    } catch {
      return;
    }
    // A download that ended while the stream was down still opens its model.
    const dl = this.downloadJob ? this.jobs[this.downloadJob] : undefined;
    if (dl) this.afterDownload(dl);
    void this.refreshRuns();
    if (this.liveRun) void this.watchRun(this.liveRun, this.liveJob);
  }

  upsertJob(info: JobInfo, totalSteps: number | null = null): JobView {
    const old = this.jobs[info.id];
    if (old) {
      // A job never runs again once ended: an answer sent before the end event (stop_job
      // returns at once) must not undo what the event said.
      const ended = old.info.state !== 'running' && info.state === 'running';
      old.info = ended
        ? { ...old.info, run: info.run ?? old.info.run }
        : { ...old.info, ...info, run: info.run ?? old.info.run };
      if (totalSteps != null) old.totalSteps = totalSteps;
      return old;
    }
    this.jobs[info.id] = { info, progress: null, step: null, totalSteps, hint: null, lastLog: null, seq: ++this.seq };
    return this.jobs[info.id];
  }

  // ---- model and data -------------------------------------------------------------------

  async inspectModel(model: string): Promise<ModelInfo> {
    const info = await this.backend.inspectModel({ model });
    this.model = model;
    this.modelInfo = info;
    void this.refreshRecent();
    // Data picked before the model waits for its tokenizer; check it now.
    if (this.dataPath && !this.dataReport && !this.dataBusy) void this.checkData();
    return info;
  }

  /** Inspects what the Model screen's field holds, keeping the error for the screen. */
  async chooseModel(model: string): Promise<boolean> {
    model = model.trim();
    if (!model) return false;
    this.modelBusy = true;
    this.modelError = null;
    try {
      await this.inspectModel(model);
      return true;
    } catch (e) {
      this.modelError = toFailure(e);
      return false;
    } finally {
      this.modelBusy = false;
    }
  }

  /** Starts downloading a repo id into the cache; the model is inspected when it finishes. */
  async downloadModel(repo: string): Promise<void> {
    repo = repo.trim();
    if (!repo || this.downloadStarting) return;
    this.downloadStarting = true;
    this.downloadError = null;
    this.modelError = null;
    this.downloadRepo = repo;
    this.downloadJob = null;
    try {
      const j = this.upsertJob(await this.backend.downloadModel({ model: repo }));
      this.downloadJob = j.info.id;
      // Its end event can beat the answer when every file was already in the cache.
      this.afterDownload(j);
    } catch (e) {
      this.downloadError = toFailure(e);
    } finally {
      this.downloadStarting = false;
    }
  }

  private afterDownload(j: JobView): void {
    const id = j.info.id;
    if (id !== this.downloadJob || j.info.state !== 'finished' || this.downloadInspected === id) return;
    this.downloadInspected = id;
    // The server resolves the repo id from the cache; a download adopted at load has
    // only its folder.
    const model = this.downloadRepo ?? j.info.result;
    if (model) void this.chooseModel(model);
  }

  async refreshRecent(): Promise<void> {
    try {
      this.recent = await this.backend.recentModels();
    } catch {
      // the list is a convenience; the field still works
    }
  }

  /** A dropped or picked file: uploaded first in a browser, used in place on the desktop.
   * A `.gguf` is a model, not data: on the desktop it becomes the base model; a browser
   * cannot hand over a path, and the engine reads GGUF bases from the server's disk. */
  async useFile(f: DroppedFile): Promise<void> {
    if (/\.gguf$/i.test(f.kind === 'path' ? f.path : f.file.name)) {
      if (f.kind === 'path') {
        await this.chooseModel(f.path);
      } else {
        this.modelError = new ApiFailure(
          `${f.file.name} is a GGUF model; a browser cannot pass its path to the server`,
          'type the path of the .gguf on the server (or ollama:NAME) in the Model field',
        );
      }
      this.screen = 'model';
      return;
    }
    this.screen = 'data';
    this.dataError = null;
    this.dataReport = null;
    if (f.kind === 'path') {
      this.dataPath = f.path;
      this.dataName = basename(f.path);
    } else {
      this.dataBusy = 'uploading';
      this.dataName = f.file.name;
      try {
        this.dataPath = (await this.backend.uploadDataset(f.file, f.file.name)).path;
      } catch (e) {
        this.dataError = toFailure(e);
        this.dataBusy = null;
        return;
      }
      this.dataBusy = null;
    }
    await this.checkData();
  }

  async checkData(): Promise<void> {
    if (!this.dataPath || !this.model) return;
    this.dataBusy = 'checking';
    this.dataError = null;
    try {
      this.dataReport = await this.backend.checkData({
        data: this.dataPath,
        model: this.model,
        max_seq_len: this.config?.max_seq_len,
        show: 3,
      });
    } catch (e) {
      this.dataError = toFailure(e);
      this.dataReport = null;
    } finally {
      this.dataBusy = null;
    }
  }

  // ---- training -------------------------------------------------------------------------

  /** Shows a run on the Train screen: its saved metrics first, then what streams in. */
  async watchRun(run: string, job: string | null = null): Promise<void> {
    this.liveRun = run;
    this.liveJob = job ?? this.runningJobFor(run)?.info.id ?? null;
    this.liveError = null;
    this.series.reset();
    this.seriesVersion = this.series.version;
    const loading = { run, buffer: [] as JobEvent[] };
    this.loading = loading;
    try {
      const detail = await this.backend.getRun(run);
      if (this.loading !== loading) return;
      this.liveRunInfo = detail.info;
      this.liveTotal = detail.config.steps;
      this.series.mergeMetrics(detail.metrics);
      const last = detail.metrics.filter((m) => m.loss != null).at(-1);
      this.liveStep = last
        ? {
            type: 'Step',
            run: 0,
            step: last.step,
            loss: last.loss ?? NaN,
            lr: last.lr ?? NaN,
            grad_norm: last.grad_norm ?? NaN,
            tokens_per_s: last.tokens_per_s ?? NaN,
            elapsed_s: last.elapsed_s ?? NaN,
            eta_s: NaN,
          }
        : null;
      if (this.liveJob && this.jobs[this.liveJob]) this.jobs[this.liveJob].totalSteps = detail.config.steps;
    } catch (e) {
      if (this.loading === loading) this.liveError = toFailure(e);
    } finally {
      if (this.loading === loading) {
        this.loading = null;
        for (const je of loading.buffer) this.applyLive(je.event);
        this.seriesVersion = this.series.version;
      }
    }
  }

  /** The config a run started now would get: the form plus the chosen model and data. */
  private runConfig(): TrainConfig | null {
    if (!this.config) return null;
    return { ...$state.snapshot(this.config), model: this.model, data: this.dataPath };
  }

  /** Whether the shown plan was made for other settings than the form's now. */
  get planStale(): boolean {
    const c = this.runConfig();
    return !!this.plan && (!c || JSON.stringify(c) !== this.planFor);
  }

  /** Asks the engine what the current settings would do (nothing starts). */
  async planTraining(): Promise<void> {
    const config = this.runConfig();
    if (!config) return;
    this.planBusy = true;
    this.planError = null;
    try {
      this.plan = await this.backend.planTraining(config);
      this.planFor = JSON.stringify(config);
    } catch (e) {
      this.plan = null;
      this.planError = toFailure(e);
    } finally {
      this.planBusy = false;
    }
  }

  async startTraining(): Promise<void> {
    if (!this.config) return;
    const config: TrainConfig = { ...$state.snapshot(this.config), model: this.model, data: this.dataPath };
    this.starting = true;
    this.liveError = null;
    this.loading = null;
    this.series.reset();
    this.seriesVersion = this.series.version;
    this.logs = [];
    this.liveStep = null;
    this.liveRunInfo = null;
    this.liveRun = null;
    this.liveTotal = config.steps;
    this.liveJob = null;
    this.early = [];
    try {
      const job = await this.backend.startTraining(config);
      this.upsertJob(job, config.steps);
      this.liveJob = job.id;
      if (job.run) this.liveRun = job.run;
      for (const je of this.early) {
        if (je.job !== job.id) continue;
        if (je.run && !this.liveRun) this.liveRun = je.run;
        this.applyLive(je.event);
      }
    } catch (e) {
      this.liveError = toFailure(e);
    } finally {
      this.early = [];
      this.starting = false;
    }
  }

  async stopTraining(): Promise<void> {
    if (!this.liveJob) return;
    try {
      this.upsertJob(await this.backend.stopJob(this.liveJob));
    } catch (e) {
      this.liveError = toFailure(e);
    }
  }

  async resumeRun(run: string): Promise<void> {
    this.liveError = null;
    this.starting = true;
    try {
      if (this.liveRun !== run) await this.watchRun(run);
      const job = await this.backend.resumeRun(run);
      this.upsertJob({ ...job, run: job.run ?? run }, this.liveTotal);
      this.liveJob = job.id;
    } catch (e) {
      this.liveError = toFailure(e);
    } finally {
      this.starting = false;
    }
  }

  private runningJobFor(run: string): JobView | undefined {
    return jobsNewestFirst(this.jobs).find(
      (j) => j.info.kind === 'train' && j.info.run === run && j.info.state === 'running',
    );
  }

  private async refreshLiveInfo(): Promise<void> {
    const run = this.liveRun;
    if (!run) return;
    try {
      const detail = await this.backend.getRun(run);
      if (this.liveRun === run) this.liveRunInfo = detail.info;
    } catch {
      // the list refresh shows the state too
    }
  }

  async refreshRuns(): Promise<void> {
    try {
      this.runs = await this.backend.listRuns();
    } catch {
      // shown as an empty list; the Runs screen has its own retry
    }
  }

  // ---- Ollama ---------------------------------------------------------------------------

  async refreshOllama(): Promise<void> {
    try {
      this.ollama = await this.backend.ollamaStatus();
    } catch (e) {
      const f = toFailure(e);
      this.ollama = { host: this.info?.ollama_host ?? '', running: false, version: null, error: f.error, hint: f.hint };
    }
    if (this.ollama.running) await this.refreshOllamaModels();
  }

  async refreshOllamaModels(): Promise<void> {
    try {
      this.ollamaModels = await this.backend.ollamaModels();
    } catch {
      this.ollamaModels = [];
    }
  }
}

export function jobsNewestFirst(jobs: Record<string, JobView>): JobView[] {
  return Object.values(jobs).sort((a, b) => b.seq - a.seq);
}

export const app = new App();
