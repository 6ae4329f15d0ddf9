import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ApiFailure } from '../src/api/backend';
import { HttpBackend, type EventSourceLike } from '../src/api/http';
import type { JobEvent } from '../src/generated/JobEvent';

type Call = { url: string; init: RequestInit };

/** A fetch that records calls and answers from a queue of [status, body] pairs. */
function fakeFetch(answers: [number, string][]) {
  const calls: Call[] = [];
  const fn = vi.fn(async (url: string | URL | Request, init?: RequestInit) => {
    calls.push({ url: String(url), init: init ?? {} });
    const [status, body] = answers.shift() ?? [200, '{}'];
    return new Response(body, { status, statusText: status === 200 ? 'OK' : 'Error' });
  });
  return { fn: fn as unknown as typeof fetch, calls };
}

class FakeEventSource implements EventSourceLike {
  static all: FakeEventSource[] = [];
  onopen: ((ev: Event) => unknown) | null = null;
  onmessage: ((ev: MessageEvent) => unknown) | null = null;
  onerror: ((ev: Event) => unknown) | null = null;
  readyState = 0;
  closed = false;
  listeners = new Map<string, (ev: MessageEvent) => void>();
  addEventListener(type: string, listener: (ev: MessageEvent) => void) {
    this.listeners.set(type, listener);
  }
  constructor(readonly url: string) {
    FakeEventSource.all.push(this);
  }
  close() {
    this.closed = true;
    this.readyState = 2;
  }
  open() {
    this.readyState = 1;
    this.onopen?.(new Event('open'));
  }
  send(data: string) {
    this.onmessage?.(new MessageEvent('message', { data }));
  }
  fail() {
    this.onerror?.(new Event('error'));
  }
}

const stepEvent: JobEvent = {
  job: 'j3',
  kind: 'train',
  run: '20261125-101500-alpaca',
  event: { type: 'Step', run: 0, step: 12, loss: 6.8, lr: 0.0002, grad_norm: 1.1, tokens_per_s: 480, elapsed_s: 4.2, eta_s: 30.1 },
};

describe('HttpBackend calls', () => {
  it('sends the bearer token and reads the JSON answer', async () => {
    const f = fakeFetch([[200, '{"version":"0.3.0","runs_dir":"/r","ollama_host":"http://127.0.0.1:11434","device":"cpu"}']]);
    const b = new HttpBackend('http://host:7860/', 's3cret', { fetch: f.fn });
    const info = await b.info();
    expect(info.version).toBe('0.3.0');
    expect(info.device).toBe('cpu');
    expect(f.calls[0].url).toBe('http://host:7860/api/info');
    expect(f.calls[0].init.method).toBe('GET');
    expect((f.calls[0].init.headers as Record<string, string>).Authorization).toBe('Bearer s3cret');
  });

  it('sends no Authorization header without a token', async () => {
    const f = fakeFetch([[200, '[]']]);
    await new HttpBackend('', undefined, { fetch: f.fn }).listRuns();
    expect(f.calls[0].url).toBe('/api/runs');
    expect(f.calls[0].init.headers).not.toHaveProperty('Authorization');
  });

  it('posts JSON bodies to the documented paths', async () => {
    const f = fakeFetch([]);
    const b = new HttpBackend('http://h', undefined, { fetch: f.fn });
    await b.checkData({ data: '/d/a.jsonl', model: '/m', max_seq_len: 128, show: 3 });
    await b.inspectModel({ model: 'Qwen/Qwen2.5-0.5B' });
    await b.downloadModel({ model: 'Qwen/Qwen2.5-0.5B' });
    await b.resumeRun('run 1/x');
    await b.exportRun('r2', { format: 'gguf', quantization: 'q8_0' });
    await b.pushRun('r2', { name: 'm', quantization: 'q8_0', as_adapter: false, overwrite: true });
    await b.stopJob('j7');
    await b.ollamaChat({ model: 'm', messages: [{ role: 'user', content: 'hi' }] });
    const seen = f.calls.map((c) => [c.init.method, c.url, c.init.body]);
    expect(seen).toEqual([
      ['POST', 'http://h/api/data/check', '{"data":"/d/a.jsonl","model":"/m","max_seq_len":128,"show":3}'],
      ['POST', 'http://h/api/models/inspect', '{"model":"Qwen/Qwen2.5-0.5B"}'],
      ['POST', 'http://h/api/models/download', '{"model":"Qwen/Qwen2.5-0.5B"}'],
      ['POST', 'http://h/api/runs/run%201%2Fx/resume', undefined],
      ['POST', 'http://h/api/runs/r2/export', '{"format":"gguf","quantization":"q8_0"}'],
      ['POST', 'http://h/api/runs/r2/push', '{"name":"m","quantization":"q8_0","as_adapter":false,"overwrite":true}'],
      ['POST', 'http://h/api/jobs/j7/stop', undefined],
      ['POST', 'http://h/api/ollama/chat', '{"model":"m","messages":[{"role":"user","content":"hi"}]}'],
    ]);
    expect((f.calls[0].init.headers as Record<string, string>)['Content-Type']).toBe('application/json');
  });

  it('starts a download and answers its JobInfo', async () => {
    const f = fakeFetch([[200, '{"id":"j4","kind":"download","run":null,"state":"running","error":null,"result":null}']]);
    const job = await new HttpBackend('http://h', 'tok', { fetch: f.fn }).downloadModel({ model: 'org/name' });
    expect(job.kind).toBe('download');
    expect(job.id).toBe('j4');
    expect(f.calls[0].url).toBe('http://h/api/models/download');
    expect(f.calls[0].init.method).toBe('POST');
    expect(f.calls[0].init.body).toBe('{"model":"org/name"}');
    const headers = f.calls[0].init.headers as Record<string, string>;
    expect(headers['Content-Type']).toBe('application/json');
    expect(headers.Authorization).toBe('Bearer tok');
  });

  it('wraps the config in {config} to start training', async () => {
    const f = fakeFetch([[200, '{"id":"j1","kind":"train","run":null,"state":"running","error":null,"result":null}']]);
    const b = new HttpBackend('http://h', undefined, { fetch: f.fn });
    const config = { model: 'm', data: 'd', steps: 40 } as never;
    const job = await b.startTraining(config);
    expect(job.id).toBe('j1');
    expect(f.calls[0].url).toBe('http://h/api/runs');
    expect(JSON.parse(f.calls[0].init.body as string)).toEqual({ config: { model: 'm', data: 'd', steps: 40 } });
  });

  it('uploads raw bytes with the file name in the query', async () => {
    const f = fakeFetch([[200, '{"path":"/srv/uploads/my data.jsonl"}']]);
    const b = new HttpBackend('http://h', 't', { fetch: f.fn });
    const blob = new Blob(['{"text":"a"}\n']);
    const up = await b.uploadDataset(blob, 'my data.jsonl');
    expect(up.path).toBe('/srv/uploads/my data.jsonl');
    expect(f.calls[0].url).toBe('http://h/api/datasets?name=my%20data.jsonl');
    expect(f.calls[0].init.body).toBe(blob);
    expect((f.calls[0].init.headers as Record<string, string>)['Content-Type']).toBe('application/octet-stream');
  });
});

describe('HttpBackend errors', () => {
  it('throws ApiFailure with the error and hint of the body', async () => {
    const f = fakeFetch([[422, '{"error":"line 3: missing `output`","hint":"add an output field"}']]);
    const b = new HttpBackend('http://h', undefined, { fetch: f.fn });
    const err = await b.checkData({ data: 'd', model: 'm' }).catch((e) => e);
    expect(err).toBeInstanceOf(ApiFailure);
    expect(err.error).toBe('line 3: missing `output`');
    expect(err.hint).toBe('add an output field');
    expect(err.status).toBe(422);
  });

  it('keeps a null hint as null', async () => {
    const f = fakeFetch([[404, '{"error":"no run `x`","hint":null}']]);
    const err = await new HttpBackend('', undefined, { fetch: f.fn }).getRun('x').catch((e) => e);
    expect(err.error).toBe('no run `x`');
    expect(err.hint).toBeNull();
  });

  it('uses the text of a body that is not JSON, and hints at the token on 401', async () => {
    const f = fakeFetch([
      [502, 'Bad gateway'],
      [401, ''],
    ]);
    const b = new HttpBackend('', undefined, { fetch: f.fn });
    const e1 = await b.info().catch((e) => e);
    expect(e1.error).toBe('Bad gateway');
    expect(e1.status).toBe(502);
    const e2 = await b.info().catch((e) => e);
    expect(e2.status).toBe(401);
    expect(e2.hint).toMatch(/#token=/);
  });

  it('reports an unreachable server as ApiFailure with a hint', async () => {
    const fetchFn = vi.fn(async () => {
      throw new TypeError('Failed to fetch');
    }) as unknown as typeof fetch;
    const err = await new HttpBackend('', undefined, { fetch: fetchFn }).info().catch((e) => e);
    expect(err).toBeInstanceOf(ApiFailure);
    expect(err.error).toMatch(/cannot reach/);
    expect(err.error).toMatch(/Failed to fetch/);
    expect(err.hint).toMatch(/backprop serve/);
  });
});

describe('HttpBackend events', () => {
  beforeEach(() => {
    FakeEventSource.all = [];
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('opens /api/events with the token in the query and parses JobEvents', () => {
    const b = new HttpBackend('http://h', 'a b', { eventSource: FakeEventSource });
    const got: JobEvent[] = [];
    b.subscribe((e) => got.push(e));
    expect(FakeEventSource.all).toHaveLength(1);
    const es = FakeEventSource.all[0];
    expect(es.url).toBe('http://h/api/events?token=a%20b');
    es.open();
    es.send(JSON.stringify(stepEvent));
    es.send(JSON.stringify({ job: null, kind: null, run: null, event: { type: 'Gpu', used_mb: 900, total_mb: 8000, util: 40, temp_c: 55, power_w: 90 } }));
    expect(got).toHaveLength(2);
    expect(got[0]).toEqual(stepEvent);
    expect(got[1].event.type).toBe('Gpu');
    expect(got[1].job).toBeNull();
  });

  it('has no query without a token and ignores messages that are not JobEvents', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const b = new HttpBackend('http://h', undefined, { eventSource: FakeEventSource });
    const got: JobEvent[] = [];
    b.subscribe((e) => got.push(e));
    const es = FakeEventSource.all[0];
    expect(es.url).toBe('http://h/api/events');
    es.send('not json');
    es.send('{"job":"j1"}');
    es.send(JSON.stringify(stepEvent));
    expect(got).toEqual([stepEvent]);
    expect(warn).toHaveBeenCalledTimes(2);
    warn.mockRestore();
  });

  it('reconnects after an error with a growing delay and reports the connection', () => {
    const b = new HttpBackend('http://h', undefined, { eventSource: FakeEventSource, retryDelay: (n) => n * 1000 });
    const states: string[] = [];
    const got: JobEvent[] = [];
    b.subscribe((e) => got.push(e), (c) => states.push(c));
    FakeEventSource.all[0].open();
    FakeEventSource.all[0].fail();
    expect(FakeEventSource.all[0].closed).toBe(true);
    expect(FakeEventSource.all).toHaveLength(1);
    vi.advanceTimersByTime(999);
    expect(FakeEventSource.all).toHaveLength(1);
    vi.advanceTimersByTime(1);
    expect(FakeEventSource.all).toHaveLength(2);
    // A second failure before opening waits 2 s.
    FakeEventSource.all[1].fail();
    vi.advanceTimersByTime(1999);
    expect(FakeEventSource.all).toHaveLength(2);
    vi.advanceTimersByTime(1);
    expect(FakeEventSource.all).toHaveLength(3);
    const es = FakeEventSource.all[2];
    es.open();
    es.send(JSON.stringify(stepEvent));
    expect(got).toEqual([stepEvent]);
    expect(states).toEqual(['connecting', 'open', 'reconnecting', 'reconnecting', 'open']);
    // The attempt counter resets once connected: the next failure waits 1 s again.
    es.fail();
    vi.advanceTimersByTime(1000);
    expect(FakeEventSource.all).toHaveLength(4);
  });

  it('reports a lagged stream so the UI can reload', () => {
    const b = new HttpBackend('http://h', undefined, { eventSource: FakeEventSource });
    const states: string[] = [];
    b.subscribe(() => {}, (c) => states.push(c));
    const es = FakeEventSource.all[0];
    es.open();
    es.listeners.get('lagged')!(new MessageEvent('lagged', { data: '12' }));
    expect(states).toEqual(['connecting', 'open', 'lagged']);
    expect(es.closed).toBe(false);
  });

  it('stops reconnecting and closes the source when unsubscribed', () => {
    const b = new HttpBackend('http://h', undefined, { eventSource: FakeEventSource, retryDelay: () => 100 });
    const off = b.subscribe(() => {});
    FakeEventSource.all[0].fail();
    off();
    vi.advanceTimersByTime(1000);
    expect(FakeEventSource.all).toHaveLength(1);

    const off2 = b.subscribe(() => {});
    const es = FakeEventSource.all[1];
    off2();
    expect(es.closed).toBe(true);
    es.fail();
    vi.advanceTimersByTime(1000);
    expect(FakeEventSource.all).toHaveLength(2);
  });
});
