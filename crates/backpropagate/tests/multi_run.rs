//! Multi-run training: SLAO forgets an earlier task less than plain sequential LoRA,
//! runs are tagged in events, progress survives a stop, and bad settings are refused.

mod common;

use std::path::{Path, PathBuf};

use backpropagate::config::{BatchSize, MultiRunMethod};
use backpropagate::event::{Event, Silent};
use backpropagate::fixture::Family;
use backpropagate::run::RunStatus;
use backpropagate::slao::{multi_run, resume_multi_run};
use backpropagate::train::probe::evaluate_adapter;
use backpropagate::train::CancelToken;
use backpropagate::TrainConfig;
use common::{fixture, samples_dir};

fn two_tasks(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    backpropagate::fixture::write_two_tasks(dir).unwrap()
}

fn config(data: &Path, method: MultiRunMethod) -> TrainConfig {
    let mut c = TrainConfig {
        model: fixture(Family::Qwen2).display().to_string(),
        data: data.to_path_buf(),
        learning_rate: 1e-2,
        batch_size: BatchSize::Fixed(4),
        ..TrainConfig::default()
    };
    c.schedule.warmup_steps = 5;
    c.lora.dropout = 0.0;
    c.multi_run.runs = 2;
    c.multi_run.steps_per_run = 40;
    c.multi_run.replay_ratio = 0.0;
    c.multi_run.method = method;
    c
}

#[test]
fn slao_forgets_the_first_task_less_than_sequential_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, held_a, held_b) = two_tasks(tmp.path());
    let model = fixture(Family::Qwen2);
    let mut results = Vec::new();
    for method in [MultiRunMethod::Sequential, MultiRunMethod::Slao] {
        let runs = tmp.path().join(format!("{method:?}"));
        let steps = std::sync::Mutex::new(Vec::new());
        let sink = |e: Event| {
            if let Event::Step { run, step, .. } = e {
                steps.lock().unwrap().push((run, step));
            }
        };
        let summary = multi_run(
            &config(&train, method),
            &runs,
            &sink,
            &CancelToken::default(),
        )
        .unwrap();
        assert_eq!(summary.status, RunStatus::Finished);
        let steps = steps.into_inner().unwrap();
        assert_eq!(steps.len(), 80);
        assert_eq!(steps[0], (1, 1));
        assert_eq!(steps[79], (2, 40), "events carry the run index");
        let after_a = summary.stages[0].run_dir.join("adapter");
        let adapter = summary.adapter.unwrap();
        let a_after_a = evaluate_adapter(model, &after_a, &held_a, 2048).unwrap();
        let a_after_b = evaluate_adapter(model, &adapter, &held_a, 2048).unwrap();
        let b_after_b = evaluate_adapter(model, &adapter, &held_b, 2048).unwrap();
        println!("{method:?}: held-out A loss after A {a_after_a:.4}, after B {a_after_b:.4} (forgetting {:+.4}); held-out B after B {b_after_b:.4}", a_after_b - a_after_a);
        results.push((a_after_a, a_after_b, b_after_b));
    }
    let (seq, slao) = (results[0], results[1]);
    assert_eq!(
        seq.0, slao.0,
        "run 1 is the same plain LoRA in both methods"
    );
    assert!(
        slao.1 < seq.1,
        "SLAO held-out A loss {:.4} vs sequential {:.4}",
        slao.1,
        seq.1
    );
    let base_b = seq.2.max(slao.2);
    assert!(base_b.is_finite());
}

#[test]
fn a_stopped_multi_run_resumes_where_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _, _) = two_tasks(tmp.path());
    let mut c = config(&train, MultiRunMethod::Slao);
    c.multi_run.steps_per_run = 6;
    c.multi_run.replay_ratio = 0.2;
    let cancel = CancelToken::default();
    let stop = cancel.clone();
    let sink = move |e: Event| {
        if let Event::Step {
            run: 2, step: 3, ..
        } = e
        {
            stop.cancel();
        }
    };
    let stopped = multi_run(&c, tmp.path(), &sink, &cancel).unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert_eq!(stopped.completed_runs, 1);
    assert!(stopped
        .run_dir
        .join("merged/adapter_model.safetensors")
        .is_file());
    assert!(stopped
        .run_dir
        .join("init/run-2/adapter_model.safetensors")
        .is_file());
    // Run 2's slice: 180 samples of its own plus 20% replayed from run 1.
    let slice = std::fs::read_to_string(stopped.run_dir.join("slices/run-2.jsonl")).unwrap();
    assert_eq!(slice.lines().count(), 180 + 36);
    {
        // One writer at a time for the multi-run folder too.
        let _held = backpropagate::run::RunLock::acquire(&stopped.run_dir, "export").unwrap();
        let err = resume_multi_run(&stopped.run_dir, &Silent, &CancelToken::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is in use by this process"), "{err}");
    }
    let done = resume_multi_run(&stopped.run_dir, &Silent, &CancelToken::default()).unwrap();
    assert_eq!(done.status, RunStatus::Finished);
    assert_eq!(done.completed_runs, 2);
    assert_eq!(done.stages.len(), 1, "only run 2 was left");
    assert_eq!(done.stages[0].steps, 6);
    assert!(done.adapter.unwrap().join("adapter_config.json").is_file());
}

#[test]
fn bad_multi_run_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = samples_dir().join("prompt_completion.jsonl");
    let mut c = config(&data, MultiRunMethod::Slao);
    c.multi_run.runs = 0;
    let err = multi_run(&c, tmp.path(), &Silent, &CancelToken::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("multi_run.runs must be at least 1"), "{err}");
    c.multi_run.runs = 2;
    c.multi_run.replay_ratio = 1.5;
    let err = multi_run(&c, tmp.path(), &Silent, &CancelToken::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multi_run.replay_ratio must be in [0, 1]"),
        "{err}"
    );
    c.multi_run.replay_ratio = 0.2;
    c.multi_run.runs = 30;
    let err = multi_run(&c, tmp.path(), &Silent, &CancelToken::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("has 20 samples but 30 runs"), "{err}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );
}
