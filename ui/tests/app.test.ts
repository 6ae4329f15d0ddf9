import { describe, expect, it, vi } from 'vitest';
import type { Backend, Connection, DroppedFile } from '../src/api/backend';
import type { JobEvent } from '../src/generated/JobEvent';
import type { JobInfo } from '../src/generated/JobInfo';
import type { RunDetail } from '../src/generated/RunDetail';
import type { TrainConfig } from '../src/generated/TrainConfig';
import { App, isNotDownloaded, looksLikeRepoId } from '../src/lib/app.svelte';

const config = {
  model: '',
  data: '',
  steps: 40,
  learning_rate: 2e-4,
  batch_size: 'auto',
  max_seq_len: 2048,
  report_to: [],
} as unknown as TrainConfig;

const job = (over: Partial<JobInfo> = {}): JobInfo => ({
  id: 'j1',
  kind: 'train',
  run: 'r1',
  state: 'running',
  error: null,
  result: null,
  ...over,
});

const step = (s: number, loss = 2): JobEvent => ({
  job: 'j1',
  kind: 'train',
  run: 'r1',
  event: { type: 'Step', run: 0, step: s, loss, lr: 1e-4, grad_norm: 1, tokens_per_s: 10, elapsed_s: s, eta_s: 40 - s },
});

/** A backend whose calls answer from fixed data; events are pushed by the test. */
function fakeBackend(over: Partial<Backend> = {}) {
  let push: (e: JobEvent) => void = () => {};
  let connection: (c: Connection) => void = () => {};
  const b: Backend = {
    transport: 'http',
    info: async () => ({ version: '1', runs_dir: '/r', ollama_host: 'h', device: 'cpu' }),
    configDefaults: async () => structuredClone(config),
    inspectModel: async () => ({ path: '/m', architecture: 'X', hidden_size: 1, layers: 1, vocab_size: 1, parameters: 1, chat_template: null }),
    recentModels: async () => [],
    downloadModel: vi.fn(async () => job({ id: 'd1', kind: 'download', run: null })),
    uploadDataset: async (_f, name) => ({ path: `/uploads/${name}` }),
    checkData: vi.fn(async (req) => ({ ok: true, path: req.data, stats: null, template: 't', warnings: [], problems: [], more_problems: 0, samples: [] })),
    listRuns: async () => [],
    getRun: async () => {
      throw new Error('no run');
    },
    planTraining: vi.fn(async (c: TrainConfig) => ({
      train_rows: 200, val_rows: 0, steps: c.steps, micro_batch: 4, accumulation: 1, effective_batch: 4,
      epochs: (c.steps * 4) / 200, longest_row_tokens: 150, trainable_params: 1000, total_params: 100000,
      device: 'cpu', precision: 'f32', base_storage: 'f32', layers: 2, recomputed_layers: 0,
      predicted_peak_bytes: 1 << 30, free_bytes: 8 << 30, fits: true,
    })),
    startTraining: vi.fn(async () => job()),
    stopJob: async () => job(),
    resumeRun: async () => job({ id: 'j2' }),
    exportRun: async () => job({ kind: 'export' }),
    pushRun: async () => job({ kind: 'push' }),
    listJobs: async () => [],
    ollamaStatus: async () => ({ host: 'h', running: false, version: null, error: null, hint: null }),
    ollamaModels: async () => [],
    ollamaChat: async () => ({ role: 'assistant', content: 'hi' }),
    subscribe: (on, c) => {
      push = on;
      connection = c ?? (() => {});
      return () => {};
    },
    onFileDrop: (_d: (f: DroppedFile) => void) => () => {},
    ...over,
  };
  return { b, emit: (e: JobEvent) => push(e), connect: (c: Connection) => connection(c) };
}

async function ready(over: Partial<Backend> = {}) {
  const app = new App();
  const fake = fakeBackend(over);
  await app.init(fake.b);
  return { app, ...fake };
}

describe('App', () => {
  it('takes a dropped .gguf as the model on the desktop, and explains why not in a browser', async () => {
    const inspectModel = vi.fn(async (req: { model: string }) => ({
      path: req.model, architecture: 'llama', hidden_size: 1, layers: 1, vocab_size: 1, parameters: 1, chat_template: null,
    }));
    const uploadDataset = vi.fn(async (_f: File, name: string) => ({ path: `/uploads/${name}` }));
    const { app } = await ready({ inspectModel, uploadDataset });
    await app.useFile({ kind: 'path', path: '/models/SmolLM2.Q4_K_M.gguf' });
    expect(inspectModel).toHaveBeenCalledWith({ model: '/models/SmolLM2.Q4_K_M.gguf' });
    expect(app.model).toBe('/models/SmolLM2.Q4_K_M.gguf');
    expect(app.screen).toBe('model');
    expect(app.dataPath).toBe('');

    await app.useFile({ kind: 'file', file: new File(['GGUF'], 'other.GGUF') });
    expect(uploadDataset).not.toHaveBeenCalled();
    expect(app.modelError?.error).toContain('other.GGUF is a GGUF model');
    expect(app.modelError?.hint).toContain('Model field');
    expect(app.model).toBe('/models/SmolLM2.Q4_K_M.gguf');
    app.dispose();
  });

  it('starts training with the form config plus the chosen model and data', async () => {
    const { app, b } = await ready();
    app.model = '/models/tiny';
    app.dataPath = '/d.jsonl';
    app.config!.steps = 12;
    await app.startTraining();
    expect(b.startTraining).toHaveBeenCalledWith(expect.objectContaining({ model: '/models/tiny', data: '/d.jsonl', steps: 12 }));
    expect(app.liveJob).toBe('j1');
    expect(app.liveRun).toBe('r1');
    expect(app.liveStatus).toBe('running');
    expect(app.currentJob?.totalSteps).toBe(12);
    app.dispose();
  });

  it('plans the form config with the chosen model and data, and marks the plan stale when settings change', async () => {
    const { app, b } = await ready();
    app.model = '/models/tiny';
    app.dataPath = '/d.jsonl';
    app.config!.steps = 100;
    await app.planTraining();
    expect(b.planTraining).toHaveBeenCalledWith(expect.objectContaining({ model: '/models/tiny', data: '/d.jsonl', steps: 100 }));
    expect(app.plan?.epochs).toBe(2);
    expect(app.planStale).toBe(false);
    app.config!.steps = 50;
    expect(app.planStale).toBe(true);
    await app.planTraining();
    expect(app.plan?.epochs).toBe(1);
    expect(app.planStale).toBe(false);
    app.dispose();
  });

  it('shows why there is no plan when planning fails', async () => {
    const { app } = await ready({
      planTraining: async () => {
        throw new Error('model folder not found');
      },
    });
    app.model = '/nope';
    app.dataPath = '/d.jsonl';
    await app.planTraining();
    expect(app.plan).toBeNull();
    expect(app.planError?.message).toContain('model folder not found');
    app.dispose();
  });

  it('feeds the live chart from its job and keeps a stop that came before the stop answer', async () => {
    let resolveStop!: (j: JobInfo) => void;
    const { app, emit } = await ready({ stopJob: () => new Promise((r) => (resolveStop = r)) });
    app.model = 'm';
    app.dataPath = 'd';
    await app.startTraining();
    emit(step(1, 3));
    emit(step(2, 2.5));
    emit({ ...step(3), job: 'other', run: 'other-run' });
    expect(app.series.step).toEqual([1, 2]);
    expect(app.series.loss).toEqual([3, 2.5]);
    expect(app.liveStep?.step).toBe(2);

    const stopping = app.stopTraining();
    emit({ job: 'j1', kind: 'train', run: 'r1', event: { type: 'Stopped', step: 2, path: '/runs/r1' } });
    expect(app.liveStatus).toBe('stopped');
    resolveStop(job()); // the answer was made before the job ended: still "running"
    await stopping;
    expect(app.liveStatus).toBe('stopped');
    expect(app.currentJob?.info.id).toBe('other'); // the other job is still running
    expect(app.logs.at(-1)?.message).toMatch(/^stopped at step 2/);
    app.dispose();
  });

  it('learns the run and its length from Started, and restarts the curve at a resumed checkpoint', async () => {
    const { app, emit } = await ready({ startTraining: async () => job({ run: null }) });
    app.model = 'm';
    app.dataPath = 'd';
    await app.startTraining();
    expect(app.liveRun).toBeNull();
    emit({ job: 'j1', kind: 'train', run: 'r1', event: { type: 'Started', run_id: 'r1', path: '/runs/r1', total_steps: 30, start_step: 0 } });
    expect(app.liveRun).toBe('r1');
    expect(app.liveTotal).toBe(30);
    expect(app.jobs.j1.info.run).toBe('r1');
    for (let s = 1; s <= 7; s++) emit(step(s));
    // Killed after step 7, resumed from the checkpoint at 5 by a new job.
    emit({ job: 'j1', kind: 'train', run: 'r1', event: { type: 'Failed', error: 'killed', hint: null } });
    expect(app.liveStatus).toBe('failed');
    await app.resumeRun('r1');
    expect(app.liveJob).toBe('j2');
    emit({ job: 'j2', kind: 'train', run: 'r1', event: { type: 'Started', run_id: 'r1', path: '/runs/r1', total_steps: 30, start_step: 5 } });
    expect(app.series.step).toEqual([1, 2, 3, 4, 5]);
    expect(app.liveStatus).toBe('running');
    app.dispose();
  });

  it('still reads the older Failed{error: "stopped"} as a stop', async () => {
    const { app, emit } = await ready();
    app.model = 'm';
    app.dataPath = 'd';
    await app.startTraining();
    emit({ job: 'j1', kind: 'train', run: 'r1', event: { type: 'Failed', error: 'stopped', hint: null } });
    expect(app.liveStatus).toBe('stopped');
    expect(app.liveError).toBeNull();
    app.dispose();
  });

  it('keeps the events of a new job that arrive before the answer to start_training', async () => {
    let answer!: (j: JobInfo) => void;
    const { app, emit } = await ready({ startTraining: () => new Promise((r) => (answer = r)) });
    app.model = 'm';
    app.dataPath = 'd';
    const starting = app.startTraining();
    emit({ job: 'j1', kind: 'train', run: 'r1', event: { type: 'Log', level: 'info', message: 'tokenizing' } });
    emit(step(1, 3));
    emit({ job: 'j0', kind: 'train', run: 'old', event: { type: 'Log', level: 'info', message: 'someone else' } });
    answer(job());
    await starting;
    expect(app.logs.map((l) => l.message)).toEqual(['tokenizing']);
    expect(app.series.loss).toEqual([3]);
    app.dispose();
  });

  it('shows a reopened run from its saved metrics, then the events that came meanwhile', async () => {
    let answer!: (d: RunDetail) => void;
    const { app, emit } = await ready({ getRun: () => new Promise((r) => (answer = r)) });
    const watching = app.watchRun('r1', 'j1');
    emit(step(3, 1.5)); // arrives while the metrics load
    expect(app.series.length).toBe(0);
    answer({
      info: { id: 'r1', created: '', model_dir: '', data: '', data_sha256: '', status: 'running', step: 2 },
      config: { ...config, steps: 40 },
      metrics: [
        { step: 1, loss: 3 } as never,
        { step: 2, loss: 2 } as never,
      ],
      exports: [],
    });
    await watching;
    expect(app.series.step).toEqual([1, 2, 3]);
    expect(app.series.loss).toEqual([3, 2, 1.5]);
    expect(app.liveTotal).toBe(40);
    app.dispose();
  });

  it('uploads a dropped file in the browser and checks it against the chosen model', async () => {
    const { app, b } = await ready();
    app.model = '/models/tiny';
    const file = new File(['{"text":"a"}\n'], 'a.jsonl');
    await app.useFile({ kind: 'file', file });
    expect(app.screen).toBe('data');
    expect(app.dataPath).toBe('/uploads/a.jsonl');
    expect(b.checkData).toHaveBeenCalledWith({ data: '/uploads/a.jsonl', model: '/models/tiny', max_seq_len: 2048, show: 3 });
    expect(app.dataReport?.ok).toBe(true);
    app.dispose();
  });

  it('waits for a model before checking data, then checks it on inspect', async () => {
    const { app, b } = await ready();
    await app.useFile({ kind: 'path', path: '/data/x.jsonl' });
    expect(b.checkData).not.toHaveBeenCalled();
    expect(app.dataName).toBe('x.jsonl');
    await app.inspectModel('/models/tiny');
    await vi.waitFor(() => expect(b.checkData).toHaveBeenCalledTimes(1));
    app.dispose();
  });

  it('reloads jobs and the shown run after the stream lagged or reconnected', async () => {
    const listJobs = vi.fn(async () => [job({ state: 'finished', result: '/runs/r1' })]);
    const getRun = vi.fn(async () => ({
      info: { id: 'r1', created: '', model_dir: '', data: '', data_sha256: '', status: 'finished' as const, step: 2 },
      config: { ...config, steps: 2 },
      metrics: [{ step: 1, loss: 3 } as never, { step: 2, loss: 2 } as never],
      exports: [],
    }));
    const { app, connect } = await ready({ listJobs, getRun });
    app.upsertJob(job());
    await app.watchRun('r1', 'j1');
    expect(listJobs).toHaveBeenCalledTimes(1); // at start
    connect('lagged');
    await vi.waitFor(() => expect(getRun).toHaveBeenCalledTimes(2));
    expect(listJobs).toHaveBeenCalledTimes(2);
    expect(app.liveStatus).toBe('finished');
    expect(app.series.loss).toEqual([3, 2]);
    connect('open'); // first open: nothing to catch up on
    connect('reconnecting');
    expect(app.connection).toBe('reconnecting');
    connect('open');
    await vi.waitFor(() => expect(getRun).toHaveBeenCalledTimes(3));
    app.dispose();
  });

  it('keeps GPU samples that arrive without a job', async () => {
    const { app, emit } = await ready();
    emit({ job: null, kind: null, run: null, event: { type: 'Gpu', used_mb: 1000, total_mb: 8000, util: 50, temp_c: 60, power_w: 100 } });
    expect(app.gpu.length).toBe(1);
    expect(app.gpuVersion).toBe(app.gpu.version);
    expect(Object.keys(app.jobs)).toEqual([]);
    app.dispose();
  });

  describe('model download', () => {
    const dl = (event: JobEvent['event'], id = 'd1'): JobEvent => ({ job: id, kind: 'download', run: null, event });

    it('routes a download job to the Model screen and inspects the repo id when it finishes', async () => {
      const inspectModel = vi.fn(async () => ({ path: '/hf/m', architecture: 'LlamaForCausalLM', hidden_size: 1, layers: 1, vocab_size: 1, parameters: 1, chat_template: null }));
      const { app, b, emit } = await ready({ inspectModel });
      await app.downloadModel(' org/tiny ');
      expect(b.downloadModel).toHaveBeenCalledWith({ model: 'org/tiny' });
      expect(app.downloadJob).toBe('d1');
      expect(app.downloadRepo).toBe('org/tiny');
      expect(app.currentJob?.info.kind).toBe('download');
      emit(dl({ type: 'Log', level: 'info', message: 'fetching 3 files' }));
      emit(dl({ type: 'Progress', stage: 'download model.safetensors', done: 512, total: 2048 }));
      const j = app.jobs.d1;
      expect(j.lastLog).toBe('fetching 3 files');
      expect(j.progress).toEqual({ stage: 'download model.safetensors', done: 512, total: 2048 });
      expect(inspectModel).not.toHaveBeenCalled();
      emit(dl({ type: 'Finished', steps: 0, final_loss: null, path: '/hf/models--org--tiny/snapshots/abc' }));
      expect(j.info.state).toBe('finished');
      expect(j.info.result).toBe('/hf/models--org--tiny/snapshots/abc');
      await vi.waitFor(() => expect(app.modelInfo?.architecture).toBe('LlamaForCausalLM'));
      expect(inspectModel).toHaveBeenCalledTimes(1);
      expect(inspectModel).toHaveBeenCalledWith({ model: 'org/tiny' });
      expect(app.model).toBe('org/tiny');
      expect(app.currentJob).toBeNull();
      // A repeated end event (say after a resync) does not inspect again.
      emit(dl({ type: 'Finished', steps: 0, final_loss: null, path: '/x' }));
      expect(inspectModel).toHaveBeenCalledTimes(1);
      app.dispose();
    });

    it('inspects when the download ended before the answer to download_model', async () => {
      const inspectModel = vi.fn(async () => ({ path: '/m', architecture: 'X', hidden_size: 1, layers: 1, vocab_size: 1, parameters: 1, chat_template: null }));
      let emitEarly: (e: JobEvent) => void = () => {};
      const { app, emit } = await ready({
        inspectModel,
        downloadModel: async () => {
          emitEarly(dl({ type: 'Finished', steps: 0, final_loss: null, path: '/hf/cached' }));
          return job({ id: 'd1', kind: 'download', run: null });
        },
      });
      emitEarly = emit;
      await app.downloadModel('org/cached');
      expect(app.jobs.d1.info.state).toBe('finished');
      await vi.waitFor(() => expect(inspectModel).toHaveBeenCalledWith({ model: 'org/cached' }));
      app.dispose();
    });

    it('keeps the failure and its hint on the job, and leaves other jobs alone', async () => {
      const inspectModel = vi.fn();
      const { app, emit } = await ready({ inspectModel: inspectModel as never });
      await app.downloadModel('org/missing');
      emit({ job: 'x9', kind: 'export', run: 'r1', event: { type: 'Finished', steps: 0, final_loss: null, path: '/e' } });
      emit(dl({ type: 'Failed', error: 'org/missing: repository not found', hint: 'check the repo id' }));
      expect(app.jobs.d1.info.state).toBe('failed');
      expect(app.jobs.d1.info.error).toBe('org/missing: repository not found');
      expect(app.jobs.d1.hint).toBe('check the repo id');
      expect(app.downloadJob).toBe('d1');
      expect(inspectModel).not.toHaveBeenCalled();
      app.dispose();
    });

    it('shows why a download could not start', async () => {
      const { app } = await ready({
        downloadModel: async () => {
          throw { error: 'offline', hint: 'check the network' };
        },
      });
      await app.downloadModel('org/tiny');
      expect(app.downloadJob).toBeNull();
      expect(app.downloadError?.error).toBe('offline');
      expect(app.downloadError?.hint).toBe('check the network');
      expect(app.downloadStarting).toBe(false);
      app.dispose();
    });

    it('keeps an inspect error for the screen and recognises "not downloaded yet"', async () => {
      const { app } = await ready({
        inspectModel: async () => {
          throw { error: 'org/tiny is not downloaded yet', hint: 'Download it first' };
        },
      });
      expect(await app.chooseModel('org/tiny')).toBe(false);
      expect(app.modelBusy).toBe(false);
      expect(isNotDownloaded(app.modelError)).toBe(true);
      expect(isNotDownloaded({ error: 'no config.json in /m' })).toBe(false);
      // Starting the download clears it.
      await app.downloadModel('org/tiny');
      expect(app.modelError).toBeNull();
      app.dispose();
    });

    it('adopts a download already running at load and inspects its folder when it ends', async () => {
      const inspectModel = vi.fn(async () => ({ path: '/hf/snap', architecture: 'X', hidden_size: 1, layers: 1, vocab_size: 1, parameters: 1, chat_template: null }));
      const { app, emit } = await ready({
        inspectModel,
        listJobs: async () => [job({ id: 'd7', kind: 'download', run: null })],
      });
      expect(app.downloadJob).toBe('d7');
      emit(dl({ type: 'Finished', steps: 0, final_loss: null, path: '/hf/snap' }, 'd7'));
      await vi.waitFor(() => expect(inspectModel).toHaveBeenCalledWith({ model: '/hf/snap' }));
      app.dispose();
    });
  });

  it('tells repo ids from local folders', () => {
    for (const ok of ['Qwen/Qwen2.5-0.5B-Instruct', 'org/name', ' org/name ']) expect(looksLikeRepoId(ok), ok).toBe(true);
    for (const no of ['', 'name', '/abs/path', './rel/x', '../x', '~/models', '.hidden/x', 'a/b/c', 'org/', '/name', 'org\\name', 'C:\\m\\x', 'C:\\org/name'])
      expect(looksLikeRepoId(no), no).toBe(false);
  });
});
