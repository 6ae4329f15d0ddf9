//! One writer per run: run folders are created exclusively, every job that writes a
//! run holds its lock (a second one is refused at once, naming the holder, in this
//! process or another), and exports replace whole folders, falling back to the last
//! checkpoint when the final adapter is incomplete.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backpropagate::config::BatchSize;
use backpropagate::event::{Event, Silent};
use backpropagate::export::{export, ExportFormat, ExportOptions, GgufQuant};
use backpropagate::fixture::Family;
use backpropagate::run::{RunDir, RunInfo, RunLock, RunStatus};
use backpropagate::train::{CancelToken, Trainer};
use backpropagate::{Error, TrainConfig};
use common::{fixture, samples_dir};

fn trained(runs: &Path, steps: u64) -> PathBuf {
    let mut trainer = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs);
    trainer.config_mut().checkpoint_every = 2;
    trainer
        .train(samples_dir().join("alpaca.jsonl"), steps)
        .unwrap()
        .run_dir
}

fn gguf_q8() -> ExportOptions {
    ExportOptions {
        format: ExportFormat::Gguf,
        quant: GgufQuant::Q8_0,
        ..ExportOptions::default()
    }
}

#[test]
fn a_second_lock_in_the_same_process_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = RunLock::acquire(dir.path(), "train").unwrap();
    let err = RunLock::acquire(dir.path(), "export").unwrap_err();
    assert!(matches!(err, Error::RunInUse { .. }), "{err:?}");
    let text = err.to_string();
    let pid = std::process::id();
    assert!(
        text.contains(&format!(
            "is in use by this process {pid} (train, started 20"
        )),
        "{text}"
    );
    assert!(err.hint().unwrap().contains("killed"), "{:?}", err.hint());
    drop(first);
    // Released with the guard: the next job gets it.
    RunLock::acquire(dir.path(), "export").unwrap();
}

#[test]
fn a_job_of_this_process_that_is_letting_go_is_waited_for_not_refused() {
    // A job announces its end (the app then resumes or exports at once) just before it
    // drops its lock; the next job of the same process waits those moments out.
    let dir = tempfile::tempdir().unwrap();
    let first = RunLock::acquire(dir.path(), "train").unwrap();
    let ending = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    let start = std::time::Instant::now();
    RunLock::acquire(dir.path(), "resume").unwrap();
    assert!(start.elapsed() >= std::time::Duration::from_millis(250));
    ending.join().unwrap();
}

#[test]
fn runs_created_with_the_same_id_get_their_own_folders() {
    let runs = tempfile::tempdir().unwrap();
    let info = RunInfo {
        id: "20260101-000000-data".into(),
        created: "2026-01-01T00:00:00Z".into(),
        model_dir: "/m".into(),
        data: "/d.jsonl".into(),
        data_sha256: String::new(),
        status: RunStatus::Running,
        step: 0,
    };
    let (mut a, mut b) = (info.clone(), info);
    let config = TrainConfig::default();
    let run_a = RunDir::create(runs.path(), &mut a, &config, "train").unwrap();
    let run_b = RunDir::create(runs.path(), &mut b, &config, "train").unwrap();
    assert_eq!(a.id, "20260101-000000-data");
    assert_eq!(b.id, "20260101-000000-data-2");
    assert_ne!(run_a.path(), run_b.path());
    assert_eq!(run_b.info().unwrap().id, b.id);
}

#[test]
fn resuming_a_run_another_job_holds_is_refused_before_any_work() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained(runs.path(), 2);
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let _held = RunLock::acquire(&run, "train").unwrap();
    let err = Trainer::resume(&run, &Silent, &CancelToken::default()).unwrap_err();
    assert!(matches!(err, Error::RunInUse { .. }), "{err}");
    assert!(
        err.to_string().contains(&run.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics);
}

#[test]
fn an_export_during_another_job_fails_fast_and_keeps_the_finished_export() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained(runs.path(), 2);
    let out = export(&run, &gguf_q8(), &Silent).unwrap();
    let file = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let before = std::fs::read(&file).unwrap();

    let held = RunLock::acquire(&run, "push").unwrap();
    let t0 = Instant::now();
    let err = export(&run, &gguf_q8(), &Silent).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(err.to_string().contains("(push, started"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // The holder itself exports under its lock.
    let again = backpropagate::export::export_locked(&held, &gguf_q8(), &Silent).unwrap();
    assert_eq!(again, out);
}

#[test]
fn an_adapter_missing_its_config_exports_from_the_last_checkpoint_and_temps_go() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained(runs.path(), 4);
    // What a kill between the adapter's two files left before adapters were written
    // whole, plus leftovers of interrupted writes.
    std::fs::remove_file(run.join("adapter/adapter_config.json")).unwrap();
    let stale = [
        run.join(".tmp-adapter-4242"),
        run.join("exports/.tmp-gguf-q8_0-4242"),
        run.join("checkpoints/.tmp-step-6"),
    ];
    for dir in &stale {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), b"torn").unwrap();
    }
    std::fs::write(run.join(".run.json.tmp-4242"), b"{").unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let sink = move |e: Event| {
        if let Event::Log { message, .. } = e {
            log.lock().unwrap().push(message);
        }
    };
    let options = ExportOptions {
        format: ExportFormat::Adapter,
        ..ExportOptions::default()
    };
    let out = export(&run, &options, &sink).unwrap();
    assert_eq!(
        std::fs::read(out.join("adapter_config.json")).unwrap(),
        std::fs::read(run.join("checkpoints/step-4/adapter_config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(run.join("checkpoints/step-4/adapter_model.safetensors")).unwrap()
    );
    let messages = seen.lock().unwrap().join("\n");
    assert!(
        messages
            .contains("is incomplete (no adapter_config.json); exporting its checkpoint at step 4"),
        "{messages}"
    );
    for dir in &stale {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert!(!run.join(".run.json.tmp-4242").exists());
    // A GGUF export, which reads the adapter config, works from the fallback too.
    export(&run, &gguf_q8(), &Silent).unwrap();
}

#[test]
fn a_finished_run_leaves_a_whole_adapter_and_no_temporary_folders() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained(runs.path(), 2);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(run.join("adapter").join(f).is_file(), "{f}");
    }
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    // The holder note goes with the lock; the lock file itself stays.
    assert!(names.contains(&"run.lock".to_string()), "{names:?}");
    assert!(!names.contains(&"run.lock.json".to_string()), "{names:?}");
}
