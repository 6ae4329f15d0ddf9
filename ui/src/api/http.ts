// The browser transport: REST calls with fetch and the event stream over Server-Sent
// Events, as served by `backprop serve` (docs/http-api.md).

import type { AppInfo } from '../generated/AppInfo';
import type { ChatMessage } from '../generated/ChatMessage';
import type { ChatRequest } from '../generated/ChatRequest';
import type { DataCheckRequest } from '../generated/DataCheckRequest';
import type { DataReport } from '../generated/DataReport';
import type { ExportRequest } from '../generated/ExportRequest';
import type { JobEvent } from '../generated/JobEvent';
import type { JobInfo } from '../generated/JobInfo';
import type { ModelInfo } from '../generated/ModelInfo';
import type { ModelRequest } from '../generated/ModelRequest';
import type { OllamaModel } from '../generated/OllamaModel';
import type { OllamaStatus } from '../generated/OllamaStatus';
import type { PushRequest } from '../generated/PushRequest';
import type { RunDetail } from '../generated/RunDetail';
import type { RunInfo } from '../generated/RunInfo';
import type { TrainConfig } from '../generated/TrainConfig';
import type { TrainPlan } from '../generated/TrainPlan';
import type { UploadedDataset } from '../generated/UploadedDataset';
import { ApiFailure, windowFileDrop, type Backend, type Connection, type DroppedFile } from './backend';

/** The part of `EventSource` this module uses, so tests can hand in a fake. */
export interface EventSourceLike {
  onopen: ((ev: Event) => unknown) | null;
  onmessage: ((ev: MessageEvent) => unknown) | null;
  onerror: ((ev: Event) => unknown) | null;
  readonly readyState: number;
  addEventListener(type: string, listener: (ev: MessageEvent) => void): void;
  close(): void;
}

export interface HttpOptions {
  fetch?: typeof fetch;
  eventSource?: new (url: string) => EventSourceLike;
  /** Delay before reconnect attempt n (1, 2, ...), in milliseconds. */
  retryDelay?: (attempt: number) => number;
}

const seg = encodeURIComponent;

export class HttpBackend implements Backend {
  readonly transport = 'http' as const;
  private readonly base: string;
  private readonly token: string | undefined;
  private readonly opts: HttpOptions;

  constructor(baseUrl: string, token?: string, opts: HttpOptions = {}) {
    this.base = baseUrl.replace(/\/+$/, '');
    this.token = token || undefined;
    this.opts = opts;
  }

  info() {
    return this.call<AppInfo>('GET', '/api/info');
  }
  configDefaults() {
    return this.call<TrainConfig>('GET', '/api/config/defaults');
  }
  inspectModel(req: ModelRequest) {
    return this.call<ModelInfo>('POST', '/api/models/inspect', req);
  }
  recentModels() {
    return this.call<string[]>('GET', '/api/models/recent');
  }
  downloadModel(req: ModelRequest) {
    return this.call<JobInfo>('POST', '/api/models/download', req);
  }
  uploadDataset(file: Blob, name: string) {
    return this.call<UploadedDataset>('POST', `/api/datasets?name=${seg(name)}`, file);
  }
  checkData(req: DataCheckRequest) {
    return this.call<DataReport>('POST', '/api/data/check', req);
  }
  listRuns() {
    return this.call<RunInfo[]>('GET', '/api/runs');
  }
  getRun(id: string) {
    return this.call<RunDetail>('GET', `/api/runs/${seg(id)}`);
  }
  planTraining(config: TrainConfig) {
    return this.call<TrainPlan>('POST', '/api/runs/plan', { config });
  }
  startTraining(config: TrainConfig) {
    return this.call<JobInfo>('POST', '/api/runs', { config });
  }
  stopJob(job: string) {
    return this.call<JobInfo>('POST', `/api/jobs/${seg(job)}/stop`);
  }
  resumeRun(id: string) {
    return this.call<JobInfo>('POST', `/api/runs/${seg(id)}/resume`);
  }
  exportRun(id: string, req: ExportRequest) {
    return this.call<JobInfo>('POST', `/api/runs/${seg(id)}/export`, req);
  }
  pushRun(id: string, req: PushRequest) {
    return this.call<JobInfo>('POST', `/api/runs/${seg(id)}/push`, req);
  }
  listJobs() {
    return this.call<JobInfo[]>('GET', '/api/jobs');
  }
  ollamaStatus() {
    return this.call<OllamaStatus>('GET', '/api/ollama/status');
  }
  ollamaModels() {
    return this.call<OllamaModel[]>('GET', '/api/ollama/models');
  }
  ollamaChat(req: ChatRequest) {
    return this.call<ChatMessage>('POST', '/api/ollama/chat', req);
  }

  /**
   * One EventSource per subscription. The browser retries a dropped stream by itself
   * only while the server keeps answering 200; after any error the source is closed and
   * opened again here with a growing delay, so a restarted server is always picked up.
   */
  subscribe(onEvent: (e: JobEvent) => void, onConnection?: (c: Connection) => void): () => void {
    const ES = this.opts.eventSource ?? (globalThis.EventSource as unknown as HttpOptions['eventSource']);
    if (!ES) throw new ApiFailure('this browser has no EventSource', 'use a current browser');
    const delay = this.opts.retryDelay ?? ((n: number) => Math.min(500 * 2 ** (n - 1), 10_000));
    const url = this.url('/api/events' + (this.token ? `?token=${seg(this.token)}` : ''));
    let source: EventSourceLike | null = null;
    let timer: ReturnType<typeof setTimeout> | null = null;
    let attempt = 0;
    let closed = false;

    const open = () => {
      timer = null;
      if (closed) return;
      const es = new ES(url);
      source = es;
      es.onopen = () => {
        attempt = 0;
        onConnection?.('open');
      };
      es.onmessage = (m: MessageEvent) => {
        const event = parseEvent(m.data);
        if (event) onEvent(event);
      };
      // `event: lagged` (data: how many were dropped) when the server's buffer overflowed.
      es.addEventListener('lagged', () => onConnection?.('lagged'));
      es.onerror = () => {
        if (closed || source !== es) return;
        es.close();
        source = null;
        attempt += 1;
        onConnection?.('reconnecting');
        timer = setTimeout(open, delay(attempt));
      };
    };
    onConnection?.('connecting');
    open();
    return () => {
      closed = true;
      if (timer) clearTimeout(timer);
      source?.close();
      source = null;
    };
  }

  onFileDrop(onDrop: (f: DroppedFile) => void, onHover?: (over: boolean) => void): () => void {
    return windowFileDrop(window, onDrop, onHover);
  }

  private url(path: string): string {
    return this.base + path;
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let payload: BodyInit | undefined;
    if (body instanceof Blob) {
      payload = body;
      headers['Content-Type'] = 'application/octet-stream';
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers['Content-Type'] = 'application/json';
    }
    const doFetch = this.opts.fetch ?? globalThis.fetch.bind(globalThis);
    let res: Response;
    try {
      res = await doFetch(this.url(path), { method, headers, body: payload });
    } catch (e) {
      throw new ApiFailure(
        `cannot reach the Backpropagate server (${e instanceof Error ? e.message : String(e)})`,
        'start it with `backprop serve` and reload the page',
      );
    }
    const text = await res.text();
    if (!res.ok) throw failureFromBody(res.status, res.statusText, text);
    if (!text) return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch {
      throw new ApiFailure(`${method} ${path}: the server answered with something that is not JSON`, null, res.status);
    }
  }
}

/** An error response's `{error, hint}`, or the status line when the body is not that. */
export function failureFromBody(status: number, statusText: string, text: string): ApiFailure {
  try {
    const body = JSON.parse(text) as { error?: unknown; hint?: unknown };
    if (body && typeof body.error === 'string') {
      return new ApiFailure(body.error, typeof body.hint === 'string' ? body.hint : null, status);
    }
  } catch {
    // not JSON: fall through
  }
  const hint = status === 401 ? 'open the address with #token=<token> as printed by `backprop serve`' : null;
  return new ApiFailure(text.trim() || `${status} ${statusText}`.trim(), hint, status);
}

/** One SSE message as a `JobEvent`, or null when it is not one (comments, junk). */
export function parseEvent(data: unknown): JobEvent | null {
  if (typeof data !== 'string' || !data) return null;
  try {
    const v = JSON.parse(data) as JobEvent;
    if (v && typeof v === 'object' && v.event && typeof v.event.type === 'string') return v;
  } catch {
    // ignored below
  }
  console.warn('backprop: ignoring an event that is not a JobEvent:', data.slice(0, 200));
  return null;
}
