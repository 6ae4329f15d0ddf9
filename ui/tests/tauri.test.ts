import { beforeEach, describe, expect, it, vi } from 'vitest';

const invoke = vi.fn();
const listen = vi.fn();
const onDragDropEvent = vi.fn();

vi.mock('@tauri-apps/api/core', () => ({ invoke: (...a: unknown[]) => invoke(...a) }));
vi.mock('@tauri-apps/api/event', () => ({ listen: (...a: unknown[]) => listen(...a) }));
vi.mock('@tauri-apps/api/webview', () => ({
  getCurrentWebview: () => ({ onDragDropEvent: (...a: unknown[]) => onDragDropEvent(...a) }),
}));

const { TauriBackend, EVENT_NAME } = await import('../src/api/tauri');
const { ApiFailure } = await import('../src/api/backend');

const flush = () => new Promise((r) => setTimeout(r, 0));

describe('TauriBackend commands', () => {
  beforeEach(() => {
    invoke.mockReset();
    invoke.mockResolvedValue('ok');
  });

  it('calls each command by its Tauri name with the documented arguments', async () => {
    const b = new TauriBackend();
    const config = { model: 'm', data: '/d.jsonl', steps: 40 } as never;
    await b.info();
    await b.configDefaults();
    await b.inspectModel({ model: '/models/tiny' });
    await b.recentModels();
    await b.downloadModel({ model: 'org/tiny' });
    await b.checkData({ data: '/d.jsonl', model: '/models/tiny', max_seq_len: 128 });
    await b.listRuns();
    await b.getRun('r1');
    await b.startTraining(config);
    await b.stopJob('j2');
    await b.resumeRun('r1');
    await b.exportRun('r1', { format: 'gguf', quantization: 'q8_0' });
    await b.pushRun('r1', { name: 'tiny', quantization: 'q8_0', as_adapter: false, overwrite: true });
    await b.listJobs();
    await b.ollamaStatus();
    await b.ollamaModels();
    await b.ollamaChat({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }] });
    await b.pickFile();
    await b.pickFolder();
    expect(invoke.mock.calls).toEqual([
      ['info', undefined],
      ['config_defaults', undefined],
      ['inspect_model', { req: { model: '/models/tiny' } }],
      ['recent_models', undefined],
      ['download_model', { req: { model: 'org/tiny' } }],
      ['check_data', { req: { data: '/d.jsonl', model: '/models/tiny', max_seq_len: 128 } }],
      ['list_runs', undefined],
      ['get_run', { id: 'r1' }],
      ['start_training', { req: { config: { model: 'm', data: '/d.jsonl', steps: 40 } } }],
      ['stop_job', { job: 'j2' }],
      ['resume_run', { id: 'r1' }],
      ['export_run', { id: 'r1', req: { format: 'gguf', quantization: 'q8_0' } }],
      ['push_run', { id: 'r1', req: { name: 'tiny', quantization: 'q8_0', as_adapter: false, overwrite: true } }],
      ['list_jobs', undefined],
      ['ollama_status', undefined],
      ['ollama_models', undefined],
      ['ollama_chat', { req: { model: 'tiny', messages: [{ role: 'user', content: 'hi' }] } }],
      ['pick_file', undefined],
      ['pick_folder', undefined],
    ]);
  });

  it('returns what the command returns', async () => {
    invoke.mockResolvedValueOnce({ id: 'j9', kind: 'export', run: 'r1', state: 'running', error: null, result: null });
    const job = await new TauriBackend().exportRun('r1', { format: 'adapter', quantization: 'f16' });
    expect(job.id).toBe('j9');
    expect(job.kind).toBe('export');
  });

  it('returns the download job', async () => {
    invoke.mockResolvedValueOnce({ id: 'j5', kind: 'download', run: null, state: 'running', error: null, result: null });
    const job = await new TauriBackend().downloadModel({ model: 'org/tiny' });
    expect(invoke).toHaveBeenCalledWith('download_model', { req: { model: 'org/tiny' } });
    expect(job.kind).toBe('download');
    expect(job.id).toBe('j5');
  });

  it('turns a rejected ApiError into ApiFailure', async () => {
    invoke.mockRejectedValueOnce({ error: 'no model at /x', hint: 'check the path' });
    const err = await new TauriBackend().inspectModel({ model: '/x' }).catch((e) => e);
    expect(err).toBeInstanceOf(ApiFailure);
    expect(err.error).toBe('no model at /x');
    expect(err.hint).toBe('check the path');
  });

  it('turns a rejected string into ApiFailure without a hint', async () => {
    invoke.mockRejectedValueOnce('command get_run not found');
    const err = await new TauriBackend().getRun('r').catch((e) => e);
    expect(err).toBeInstanceOf(ApiFailure);
    expect(err.error).toBe('command get_run not found');
    expect(err.hint).toBeNull();
  });

  it('refuses uploads without calling the shell', async () => {
    const err = await new TauriBackend().uploadDataset(new Blob(['x']), 'a.jsonl').catch((e) => e);
    expect(err).toBeInstanceOf(ApiFailure);
    expect(invoke).not.toHaveBeenCalled();
  });
});

describe('TauriBackend events', () => {
  beforeEach(() => {
    listen.mockReset();
    onDragDropEvent.mockReset();
  });

  it('forwards backprop://event payloads and unlistens', async () => {
    const unlisten = vi.fn();
    let handler: ((e: { payload: unknown }) => void) | undefined;
    listen.mockImplementation(async (_name: string, h: typeof handler) => {
      handler = h;
      return unlisten;
    });
    const got: unknown[] = [];
    const states: string[] = [];
    const off = new TauriBackend().subscribe(
      (e) => got.push(e),
      (c) => states.push(c),
    );
    expect(listen).toHaveBeenCalledTimes(1);
    expect(listen.mock.calls[0][0]).toBe(EVENT_NAME);
    expect(EVENT_NAME).toBe('backprop://event');
    await flush();
    const payload = { job: 'j1', kind: 'train', run: 'r', event: { type: 'Eval', step: 10, loss: 2.5 } };
    handler!({ payload });
    expect(got).toEqual([payload]);
    expect(states).toEqual(['connecting', 'open']);
    off();
    expect(unlisten).toHaveBeenCalledTimes(1);
  });

  it('unlistens once the listener exists when unsubscribed early', async () => {
    const unlisten = vi.fn();
    let resolve!: (f: () => void) => void;
    listen.mockReturnValue(new Promise((r) => (resolve = r)));
    const off = new TauriBackend().subscribe(() => {});
    off();
    expect(unlisten).not.toHaveBeenCalled();
    resolve(unlisten);
    await flush();
    expect(unlisten).toHaveBeenCalledTimes(1);
  });

  it('gives dropped paths and hover state from the webview drag-drop event', async () => {
    const unlisten = vi.fn();
    let handler: ((e: { payload: unknown }) => void) | undefined;
    onDragDropEvent.mockImplementation(async (h: typeof handler) => {
      handler = h;
      return unlisten;
    });
    const drops: unknown[] = [];
    const hovers: boolean[] = [];
    const off = new TauriBackend().onFileDrop(
      (f) => drops.push(f),
      (o) => hovers.push(o),
    );
    await flush();
    handler!({ payload: { type: 'enter', paths: ['/home/me/a.jsonl'], position: { x: 1, y: 1 } } });
    handler!({ payload: { type: 'leave' } });
    handler!({ payload: { type: 'over', position: { x: 2, y: 2 } } });
    handler!({ payload: { type: 'drop', paths: ['/home/me/a.jsonl', '/home/me/b.jsonl'], position: { x: 2, y: 2 } } });
    expect(drops).toEqual([{ kind: 'path', path: '/home/me/a.jsonl' }]);
    expect(hovers).toEqual([true, false, true, false]);
    off();
    expect(unlisten).toHaveBeenCalledTimes(1);
  });
});
