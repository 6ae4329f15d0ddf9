// Declares the app's own commands so capabilities/default.json can grant exactly these
// to the window (least privilege) instead of everything the invoke handler exposes.
const COMMANDS: &[&str] = &[
    "info",
    "config_defaults",
    "inspect_model",
    "recent_models",
    "download_model",
    "check_data",
    "list_runs",
    "get_run",
    "start_training",
    "stop_job",
    "resume_run",
    "export_run",
    "push_run",
    "list_jobs",
    "ollama_status",
    "ollama_models",
    "ollama_chat",
    "pick_file",
    "pick_folder",
];

fn main() {
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS)),
    )
    .expect("tauri build configuration");
}
