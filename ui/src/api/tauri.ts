// The desktop transport: Tauri commands (the engine calls) and the `backprop://event`
// event, plus the webview's native drag and drop, which gives file paths.

import { invoke } from '@tauri-apps/api/core';
import { listen } from '@tauri-apps/api/event';
import { getCurrentWebview } from '@tauri-apps/api/webview';
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
import type { StartTraining } from '../generated/StartTraining';
import type { TrainConfig } from '../generated/TrainConfig';
import type { TrainPlan } from '../generated/TrainPlan';
import type { UploadedDataset } from '../generated/UploadedDataset';
import { ApiFailure, toFailure, type Backend, type Connection, type DroppedFile } from './backend';

export const EVENT_NAME = 'backprop://event';

async function call<T>(command: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return await invoke<T>(command, args);
  } catch (e) {
    // Commands reject with the serialized `ApiError`, or a bare string from Tauri itself.
    throw toFailure(e);
  }
}

/** Runs `cleanup` once `pending` resolves, even if the caller gave up before that. */
function lateUnlisten(pending: Promise<() => void>): () => void {
  let done = false;
  let unlisten: (() => void) | null = null;
  pending
    .then((fn) => {
      if (done) fn();
      else unlisten = fn;
    })
    .catch((e) => console.error('backprop: cannot listen to the desktop shell', e));
  return () => {
    done = true;
    unlisten?.();
    unlisten = null;
  };
}

export class TauriBackend implements Backend {
  readonly transport = 'tauri' as const;

  info() {
    return call<AppInfo>('info');
  }
  configDefaults() {
    return call<TrainConfig>('config_defaults');
  }
  inspectModel(req: ModelRequest) {
    return call<ModelInfo>('inspect_model', { req });
  }
  recentModels() {
    return call<string[]>('recent_models');
  }
  downloadModel(req: ModelRequest) {
    return call<JobInfo>('download_model', { req });
  }
  uploadDataset(_file: Blob, _name: string): Promise<UploadedDataset> {
    return Promise.reject(
      new ApiFailure(
        'the desktop app reads data files where they are and does not upload them',
        'drop the file on the window or type its path',
      ),
    );
  }
  checkData(req: DataCheckRequest) {
    return call<DataReport>('check_data', { req });
  }
  listRuns() {
    return call<RunInfo[]>('list_runs');
  }
  getRun(id: string) {
    return call<RunDetail>('get_run', { id });
  }
  planTraining(config: TrainConfig) {
    const req: StartTraining = { config };
    return call<TrainPlan>('plan_training', { req });
  }
  startTraining(config: TrainConfig) {
    const req: StartTraining = { config };
    return call<JobInfo>('start_training', { req });
  }
  stopJob(job: string) {
    return call<JobInfo>('stop_job', { job });
  }
  resumeRun(id: string) {
    return call<JobInfo>('resume_run', { id });
  }
  exportRun(id: string, req: ExportRequest) {
    return call<JobInfo>('export_run', { id, req });
  }
  pushRun(id: string, req: PushRequest) {
    return call<JobInfo>('push_run', { id, req });
  }
  listJobs() {
    return call<JobInfo[]>('list_jobs');
  }
  ollamaStatus() {
    return call<OllamaStatus>('ollama_status');
  }
  ollamaModels() {
    return call<OllamaModel[]>('ollama_models');
  }
  ollamaChat(req: ChatRequest) {
    return call<ChatMessage>('ollama_chat', { req });
  }

  pickFile() {
    return call<string | null>('pick_file');
  }
  pickFolder() {
    return call<string | null>('pick_folder');
  }

  subscribe(onEvent: (e: JobEvent) => void, onConnection?: (c: Connection) => void): () => void {
    onConnection?.('connecting');
    return lateUnlisten(
      listen<JobEvent>(EVENT_NAME, (e) => onEvent(e.payload)).then((unlisten) => {
        onConnection?.('open');
        return unlisten;
      }),
    );
  }

  onFileDrop(onDrop: (f: DroppedFile) => void, onHover?: (over: boolean) => void): () => void {
    return lateUnlisten(
      getCurrentWebview().onDragDropEvent((e) => {
        const p = e.payload;
        if (p.type === 'enter' || p.type === 'over') onHover?.(true);
        else if (p.type === 'leave') onHover?.(false);
        else if (p.type === 'drop') {
          onHover?.(false);
          const path = p.paths[0];
          if (path) onDrop({ kind: 'path', path });
        }
      }),
    );
  }
}
