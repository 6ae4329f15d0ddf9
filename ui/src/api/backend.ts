// The one interface the screens talk to. Two transports implement it: HTTP+SSE for a
// browser (`http.ts`) and Tauri IPC for the desktop window (`tauri.ts`). One method per
// call in docs/http-api.md, named after the Tauri command in camelCase.

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

/** A file dropped on the window: a path in the desktop app, the file itself in a browser. */
export type DroppedFile = { kind: 'path'; path: string } | { kind: 'file'; file: File };

/**
 * The event stream's state. After a reconnect, or `lagged` (the server dropped events
 * for this client because it fell behind), the UI reloads what it shows from the server.
 */
export type Connection = 'connecting' | 'open' | 'reconnecting' | 'lagged';

export interface Backend {
  /** Which transport this is: the desktop cannot upload, a browser cannot pass paths it picked. */
  readonly transport: 'http' | 'tauri';

  info(): Promise<AppInfo>;
  configDefaults(): Promise<TrainConfig>;
  inspectModel(req: ModelRequest): Promise<ModelInfo>;
  recentModels(): Promise<string[]>;
  /** Downloads a Hugging Face repo id into the local cache, as a job (kind `download`). */
  downloadModel(req: ModelRequest): Promise<JobInfo>;
  /** Browser only: sends the file's bytes to the server, which answers with a path it can read. */
  uploadDataset(file: Blob, name: string): Promise<UploadedDataset>;
  checkData(req: DataCheckRequest): Promise<DataReport>;
  listRuns(): Promise<RunInfo[]>;
  getRun(id: string): Promise<RunDetail>;
  /** What starting this config would do (rows, batch, epochs, checkpointing, memory); starts nothing. */
  planTraining(config: TrainConfig): Promise<TrainPlan>;
  startTraining(config: TrainConfig): Promise<JobInfo>;
  stopJob(job: string): Promise<JobInfo>;
  /** Continues a stopped or failed run from its last checkpoint, to its own step count. */
  resumeRun(id: string): Promise<JobInfo>;
  exportRun(id: string, req: ExportRequest): Promise<JobInfo>;
  pushRun(id: string, req: PushRequest): Promise<JobInfo>;
  listJobs(): Promise<JobInfo[]>;
  ollamaStatus(): Promise<OllamaStatus>;
  ollamaModels(): Promise<OllamaModel[]>;
  ollamaChat(req: ChatRequest): Promise<ChatMessage>;

  /** Desktop only: the native open dialog for a dataset; null when cancelled. */
  pickFile?(): Promise<string | null>;
  /** Desktop only: the native folder dialog for a model folder; null when cancelled. */
  pickFolder?(): Promise<string | null>;

  /** Every `JobEvent` from now on; returns the unsubscribe function. */
  subscribe(onEvent: (e: JobEvent) => void, onConnection?: (c: Connection) => void): () => void;
  /**
   * Files dropped anywhere on the window. `onHover` says when a drag is over the window
   * (for the drop overlay). Returns the function that stops listening.
   */
  onFileDrop(onDrop: (f: DroppedFile) => void, onHover?: (over: boolean) => void): () => void;
}

/** A failed call, carrying the server's `{error, hint}` (the `ApiError` body). */
export class ApiFailure extends Error {
  readonly error: string;
  readonly hint: string | null;
  /** HTTP status; 0 when the server could not be reached or the call was not HTTP. */
  readonly status: number;

  constructor(error: string, hint: string | null = null, status = 0) {
    super(hint ? `${error} (${hint})` : error);
    this.name = 'ApiFailure';
    this.error = error;
    this.hint = hint;
    this.status = status;
  }
}

/** Turns whatever a call threw into an `ApiFailure`, so screens show one shape of error. */
export function toFailure(e: unknown): ApiFailure {
  if (e instanceof ApiFailure) return e;
  if (e && typeof e === 'object' && typeof (e as { error?: unknown }).error === 'string') {
    const { error, hint } = e as { error: string; hint?: unknown };
    return new ApiFailure(error, typeof hint === 'string' ? hint : null);
  }
  if (typeof e === 'string') return new ApiFailure(e);
  if (e instanceof Error) return new ApiFailure(e.message);
  return new ApiFailure(String(e));
}

/** Browser drag and drop on the whole window: the shared part of both transports' fallback. */
export function windowFileDrop(
  target: Window,
  onDrop: (f: DroppedFile) => void,
  onHover?: (over: boolean) => void,
): () => void {
  // dragenter/dragleave fire for every child element crossed; counting them tells when
  // the pointer really left the window.
  let depth = 0;
  const hasFiles = (e: DragEvent) => Array.from(e.dataTransfer?.types ?? []).includes('Files');
  const enter = (e: DragEvent) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    if (depth++ === 0) onHover?.(true);
  };
  const over = (e: DragEvent) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
  };
  const leave = (e: DragEvent) => {
    if (!hasFiles(e)) return;
    if (--depth <= 0) {
      depth = 0;
      onHover?.(false);
    }
  };
  const drop = (e: DragEvent) => {
    if (!hasFiles(e) && !e.dataTransfer?.files?.length) return;
    e.preventDefault();
    depth = 0;
    onHover?.(false);
    const file = e.dataTransfer?.files?.[0];
    if (file) onDrop({ kind: 'file', file });
  };
  target.addEventListener('dragenter', enter);
  target.addEventListener('dragover', over);
  target.addEventListener('dragleave', leave);
  target.addEventListener('drop', drop);
  return () => {
    target.removeEventListener('dragenter', enter);
    target.removeEventListener('dragover', over);
    target.removeEventListener('dragleave', leave);
    target.removeEventListener('drop', drop);
  };
}
