//! The desktop shell: every command forwards to the same [`Service`] that `backprop
//! serve` uses, and every engine event goes to the window as `backprop://event`. Long
//! work runs on the service's worker threads; blocking reads run on tokio's blocking
//! pool, so the window never stalls.

use backprop_service::dto::*;
use backprop_service::{Service, ServiceConfig, ServiceError};
use backpropagate::event::Event;
use tauri::{AppHandle, Emitter, Manager, State};
use tauri_plugin_dialog::DialogExt;
use tauri_plugin_notification::NotificationExt;

type Reply<T> = Result<T, ApiError>;

fn api(e: ServiceError) -> ApiError {
    e.to_api()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> backprop_service::Result<T> + Send + 'static,
) -> Reply<T> {
    tauri::async_runtime::spawn_blocking(f)
        .await
        .map_err(|e| ApiError {
            error: format!("worker failed: {e}"),
            hint: None,
        })?
        .map_err(api)
}

#[tauri::command]
fn info(s: State<'_, Service>) -> AppInfo {
    s.info()
}

#[tauri::command]
fn config_defaults(s: State<'_, Service>) -> backpropagate::TrainConfig {
    s.config_defaults()
}

#[tauri::command]
async fn inspect_model(s: State<'_, Service>, req: ModelRequest) -> Reply<ModelInfo> {
    let s = s.inner().clone();
    blocking(move || s.inspect_model(&req)).await
}

#[tauri::command]
async fn download_model(s: State<'_, Service>, req: ModelRequest) -> Reply<JobInfo> {
    let s = s.inner().clone();
    blocking(move || s.download_model(&req)).await
}

#[tauri::command]
async fn recent_models(s: State<'_, Service>) -> Reply<Vec<String>> {
    let s = s.inner().clone();
    blocking(move || s.recent_models()).await
}

#[tauri::command]
async fn check_data(s: State<'_, Service>, req: DataCheckRequest) -> Reply<DataReport> {
    let s = s.inner().clone();
    blocking(move || s.check_data(&req)).await
}

#[tauri::command]
async fn list_runs(s: State<'_, Service>) -> Reply<Vec<backpropagate::run::RunInfo>> {
    let s = s.inner().clone();
    blocking(move || s.list_runs()).await
}

#[tauri::command]
async fn get_run(s: State<'_, Service>, id: String) -> Reply<RunDetail> {
    let s = s.inner().clone();
    blocking(move || s.get_run(&id)).await
}

#[tauri::command]
async fn plan_training(s: State<'_, Service>, req: StartTraining) -> Reply<TrainPlan> {
    let s = s.inner().clone();
    blocking(move || s.plan_training(req)).await
}

#[tauri::command]
async fn start_training(s: State<'_, Service>, req: StartTraining) -> Reply<JobInfo> {
    let s = s.inner().clone();
    blocking(move || s.start_training(req)).await
}

#[tauri::command]
fn stop_job(s: State<'_, Service>, job: String) -> Reply<JobInfo> {
    s.stop_job(&job).map_err(api)
}

#[tauri::command]
async fn resume_run(s: State<'_, Service>, id: String) -> Reply<JobInfo> {
    let s = s.inner().clone();
    blocking(move || s.resume_run(&id)).await
}

#[tauri::command]
async fn export_run(s: State<'_, Service>, id: String, req: ExportRequest) -> Reply<JobInfo> {
    let s = s.inner().clone();
    blocking(move || s.export_run(&id, &req)).await
}

#[tauri::command]
async fn push_run(s: State<'_, Service>, id: String, req: PushRequest) -> Reply<JobInfo> {
    let s = s.inner().clone();
    blocking(move || s.push_run(&id, &req)).await
}

#[tauri::command]
fn list_jobs(s: State<'_, Service>) -> Vec<JobInfo> {
    s.list_jobs()
}

#[tauri::command]
async fn ollama_status(s: State<'_, Service>) -> Reply<OllamaStatus> {
    Ok(s.ollama_status().await)
}

#[tauri::command]
async fn ollama_models(s: State<'_, Service>) -> Reply<Vec<OllamaModel>> {
    s.ollama_models().await.map_err(api)
}

#[tauri::command]
async fn ollama_chat(s: State<'_, Service>, req: ChatRequest) -> Reply<ChatMessage> {
    s.ollama_chat(&req).await.map_err(api)
}

/// The native open dialog for a dataset; `None` when the user cancels.
#[tauri::command]
async fn pick_file(app: AppHandle) -> Option<String> {
    app.dialog()
        .file()
        .add_filter("Training data", &["jsonl", "json"])
        .blocking_pick_file()
        .and_then(|p| p.into_path().ok())
        .map(|p| p.display().to_string())
}

/// The native folder dialog for a model folder.
#[tauri::command]
async fn pick_folder(app: AppHandle) -> Option<String> {
    app.dialog()
        .file()
        .blocking_pick_folder()
        .and_then(|p| p.into_path().ok())
        .map(|p| p.display().to_string())
}

/// Forwards engine events to the window and tells the desktop when a run ends.
fn forward_events(app: AppHandle, service: &Service) {
    let mut rx = service.subscribe();
    tauri::async_runtime::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if ev.kind == Some(JobKind::Train) {
                        let note = match &ev.event {
                            Event::Finished { final_loss, .. } => Some(format!(
                                "Training finished{}",
                                final_loss
                                    .map(|l| format!(", loss {l:.3}"))
                                    .unwrap_or_default()
                            )),
                            Event::Failed { error, .. } => {
                                Some(format!("Training failed: {error}"))
                            }
                            _ => None,
                        };
                        if let Some(body) = note {
                            let _ = app
                                .notification()
                                .builder()
                                .title("Backpropagate")
                                .body(body)
                                .show();
                        }
                    }
                    let _ = app.emit("backprop://event", &ev);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

pub fn run() {
    backpropagate::threads::use_physical_cores();
    let result = tauri::Builder::default()
        .plugin(tauri_plugin_dialog::init())
        .plugin(tauri_plugin_notification::init())
        .setup(|app| {
            let service = Service::new(ServiceConfig::default());
            forward_events(app.handle().clone(), &service);
            app.manage(service);
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            info,
            config_defaults,
            inspect_model,
            recent_models,
            download_model,
            check_data,
            list_runs,
            get_run,
            plan_training,
            start_training,
            stop_job,
            resume_run,
            export_run,
            push_run,
            list_jobs,
            ollama_status,
            ollama_models,
            ollama_chat,
            pick_file,
            pick_folder,
        ])
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("Backpropagate could not start its window: {e}");
        std::process::exit(1);
    }
}
