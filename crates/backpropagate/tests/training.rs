//! Training on fixture models: the loss really falls, runs stop and resume through
//! the library API, and bad models fail with errors that name the problem.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use backpropagate::config::BatchSize;
use backpropagate::event::Event;
use backpropagate::fixture::Family;
use backpropagate::run::{read_metrics, RunStatus};
use backpropagate::train::Trainer;
use common::{fixture, losses, samples_dir};

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn loss_falls_on_the_sample_dataset() {
    let runs = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .lora_r(16)
        .learning_rate(1e-2)
        .batch_size(BatchSize::Fixed(4))
        .runs_dir(runs.path());
    trainer.config_mut().schedule.warmup_steps = 5;
    let summary = trainer
        .train(samples_dir().join("alpaca.jsonl"), 60)
        .unwrap();
    assert_eq!(summary.status, RunStatus::Finished);
    let l = losses(&summary.run_dir);
    assert_eq!(l.len(), 60);
    let vocab = 1027f64;
    // Starts near ln(vocab) (a random model), ends clearly lower.
    assert!((l[0] - vocab.ln()).abs() < 0.5, "first loss {}", l[0]);
    let end = mean(&l[50..]);
    assert!(end < l[0] - 0.4, "first {} → last-10 mean {end}", l[0]);
    assert!(end < vocab.ln() - 0.2, "last-10 mean {end}");
    assert!(summary
        .run_dir
        .join("adapter/adapter_model.safetensors")
        .is_file());
    assert!(summary.trainable_params > 0 && summary.trainable_params < summary.total_params);
}

#[test]
fn a_small_dataset_is_memorised() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("eight.jsonl");
    let text = std::fs::read_to_string(samples_dir().join("alpaca.jsonl")).unwrap();
    std::fs::write(&data, text.lines().take(8).collect::<Vec<_>>().join("\n")).unwrap();
    let mut trainer = Trainer::new(fixture(Family::Llama).to_str().unwrap())
        .learning_rate(1e-2)
        .batch_size(BatchSize::Fixed(4))
        .runs_dir(dir.path().join("runs"));
    trainer.config_mut().lora.dropout = 0.0;
    trainer.config_mut().schedule.warmup_steps = 5;
    let summary = trainer.train(&data, 60).unwrap();
    let l = losses(&summary.run_dir);
    assert!(l[59] < l[0] - 2.0, "first {} last {}", l[0], l[59]);
}

#[test]
fn cancel_stops_with_a_checkpoint_and_resume_finishes() {
    let runs = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs.path());
    trainer.config_mut().val_ratio = 0.1;
    trainer.config_mut().eval_every = 3;
    let cancel = trainer.cancel_token();
    let trainer = trainer.on_event(move |e: Event| {
        if let Event::Step { step: 4, .. } = e {
            cancel.cancel();
        }
    });
    let stopped = trainer
        .train(samples_dir().join("messages.jsonl"), 8)
        .unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert_eq!(stopped.steps, 4);
    assert!(stopped
        .run_dir
        .join("checkpoints/step-4/state.json")
        .is_file());
    assert!(!stopped.run_dir.join("adapter").exists());
    // The stop's checkpoint carries the time up to step 4, not that of an earlier one.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stopped.run_dir.join("checkpoints/step-4/state.json")).unwrap(),
    )
    .unwrap();
    let metrics = read_metrics(&stopped.run_dir.join("metrics.jsonl")).unwrap();
    let at_4 = metrics
        .iter()
        .find(|m| m.step == 4 && m.loss.is_some())
        .unwrap();
    assert_eq!(state["elapsed_s"].as_f64(), at_4.elapsed_s, "{state}");

    let events = std::sync::Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let done = Trainer::resume(&stopped.run_dir, &sink, &Default::default()).unwrap();
    assert_eq!(done.status, RunStatus::Finished);
    assert_eq!(done.steps, 8);
    let steps: Vec<u64> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![5, 6, 7, 8]);
    let metrics = read_metrics(&done.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.iter().filter(|m| m.loss.is_some()).count(), 8);
    let evals: Vec<u64> = metrics
        .iter()
        .filter(|m| m.eval_loss.is_some())
        .map(|m| m.step)
        .collect();
    assert_eq!(evals, vec![3, 6, 8]);
    // Only the newest checkpoints are kept.
    let kept = std::fs::read_dir(done.run_dir.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(kept, 2);
}

#[test]
fn bad_data_creates_no_run() {
    let runs = tempfile::tempdir().unwrap();
    let err = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .runs_dir(runs.path().join("runs"))
        .train(samples_dir().join("broken/bad_lines.jsonl"), 5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2: missing field `output`"), "{err}");
    assert!(
        !runs.path().join("runs").exists(),
        "nothing written for a bad file"
    );
}

fn broken_model(edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    for entry in std::fs::read_dir(fixture(Family::Llama)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    edit(&dir);
    let runs = dir.join("runs");
    let err = Trainer::new(dir.to_str().unwrap())
        .runs_dir(&runs)
        .train(samples_dir().join("alpaca.jsonl"), 1)
        .unwrap_err()
        .to_string();
    assert!(!runs.exists(), "a failed start leaves no run directory");
    err
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unsupported_architecture_is_named() {
    let err = broken_model(|d| edit_config(d, |v| v["model_type"] = "gpt2".into()));
    assert!(
        err.contains("unsupported architecture `gpt2` (field `model_type`)"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let err = broken_model(|d| {
        std::fs::rename(
            d.join("model.safetensors"),
            d.join("model-00001-of-00002.safetensors"),
        )
        .unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert!(
        err.contains("shard `model-00002-of-00002.safetensors` listed in the index is missing"),
        "{err}"
    );
}

/// One tensor of a safetensors file, owned: name, dtype, shape, bytes.
type OwnedTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites the model's `model.safetensors` after `edit` changed its tensors.
fn edit_tensors(model: &Path, edit: impl FnOnce(&mut Vec<OwnedTensor>)) {
    let p = model.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<OwnedTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut owned);
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn wrong_dtype_and_wrong_shape_are_named() {
    let err = broken_model(|d| {
        edit_tensors(d, |owned| {
            for t in owned.iter_mut().filter(|t| t.0 == "model.norm.weight") {
                t.1 = safetensors::Dtype::I32;
            }
        });
    });
    assert!(err.contains("tensor `model.norm.weight` is I32"), "{err}");
    let err = broken_model(|d| edit_config(d, |v| v["intermediate_size"] = 100.into()));
    assert!(err.contains("tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64] but config.json implies [100, 64]"), "{err}");
}

#[test]
fn a_paused_token_holds_training_between_steps_until_resumed() {
    use backpropagate::event::Event;
    use backpropagate::train::CancelToken;
    use std::sync::{Arc, Mutex};

    let runs = tempfile::tempdir().unwrap();
    let cancel = CancelToken::default();
    cancel.set_paused(true);
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let worker = {
        let (cancel, seen) = (cancel.clone(), seen.clone());
        let runs = runs.path().to_path_buf();
        std::thread::spawn(move || {
            let mut t = backpropagate::train::Trainer::new(
                common::fixture(backpropagate::fixture::Family::Qwen2)
                    .to_str()
                    .unwrap(),
            )
            .batch_size(backpropagate::config::BatchSize::Fixed(2))
            .runs_dir(runs);
            t.config_mut().data = common::samples_dir().join("alpaca.jsonl");
            t.config_mut().steps = 3;
            let sink = move |e: Event| seen.lock().unwrap().push(e);
            t.start_with(&sink, &cancel)
        })
    };
    // Held before the first step: no Step events, and the log says why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !seen.lock().unwrap().iter().any(
        |e| matches!(e, Event::Log { message, .. } if message.starts_with("paused before step 1")),
    ) {
        assert!(std::time::Instant::now() < deadline, "never paused");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!seen
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::Step { .. })));
    cancel.set_paused(false);
    let summary = worker.join().unwrap().unwrap();
    assert_eq!(summary.steps, 3);
    let events = seen.lock().unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Step { .. }))
            .count(),
        3
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Log { message, .. } if message == "resumed")));
}

/// A copy of the llama fixture, edited by `edit`.
fn edited_model(edit: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    for entry in std::fs::read_dir(fixture(Family::Llama)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn a_token_id_past_the_vocabulary_is_refused_before_step_1_naming_the_line() {
    // A tokenizer with an added token the model's embedding has no row for.
    let model = edited_model(|d| {
        let p = d.join("tokenizer.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let next = v["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .max()
            .unwrap()
            + 1;
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
            "id": next, "content": "<|beyond|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false}));
        std::fs::write(&p, v.to_string()).unwrap();
    });
    let vocab = backpropagate::model::ModelConfig::load(&model.join("config.json"))
        .unwrap()
        .vocab_size;
    let data = model.join("data.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(samples_dir().join("alpaca.jsonl"))
        .unwrap()
        .lines()
        .take(5)
        .map(String::from)
        .collect();
    let mut text = lines.join("\n");
    text = text.replacen("al dente when", "al dente <|beyond|> when", 1);
    std::fs::write(&data, text).unwrap();
    let steps = Arc::new(Mutex::new(0));
    let count = steps.clone();
    let runs = model.join("runs");
    let err = Trainer::new(model.to_str().unwrap())
        .runs_dir(&runs)
        .on_event(move |e: Event| {
            if let Event::Step { .. } = e {
                *count.lock().unwrap() += 1;
            }
        })
        .train(&data, 2)
        .unwrap_err()
        .to_string();
    // The trainer's data preparation refuses it (the same check as `data check`).
    assert!(
        err.contains("data.jsonl") && err.contains("line 1:"),
        "{err}"
    );
    assert!(err.contains(&format!("token id {vocab}")), "{err}");
    assert!(err.contains("vocabulary"), "{err}");
    assert!(!err.contains("compute error"), "{err}");
    assert_eq!(*steps.lock().unwrap(), 0, "refused before step 1");
    assert!(!runs.exists(), "refused before creating a run");
}

#[test]
fn a_nan_in_the_base_weights_is_named_instead_of_blaming_the_learning_rate() {
    const TENSOR: &str = "model.layers.1.mlp.down_proj.weight";
    let model = edited_model(|d| {
        edit_tensors(d, |owned| {
            let t = owned.iter_mut().find(|t| t.0 == TENSOR).expect(TENSOR);
            assert_eq!(t.1, safetensors::Dtype::F32);
            t.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        });
    });
    let err = Trainer::new(model.to_str().unwrap())
        .runs_dir(model.join("runs"))
        .learning_rate(1e-4)
        .train(samples_dir().join("alpaca.jsonl"), 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("because the base tensor `{TENSOR}` in ")),
        "{err}"
    );
    assert!(err.contains("(value NaN at element 10)"), "{err}");
    assert!(!err.contains("lower the learning rate"), "{err}");
}
