//! Exports from a run directory: sharded merged checkpoints load like unsharded ones,
//! and runs without anything to export fail clearly, leaving nothing behind.

mod common;

use backpropagate::config::BatchSize;
use backpropagate::event::Silent;
use backpropagate::export::{export, ExportFormat, ExportOptions, WeightDtype};
use backpropagate::fixture::Family;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::train::batch::{build, Row};
use backpropagate::train::Trainer;
use candle_core::Device;
use common::{fixture, samples_dir};

fn logits(dir: &std::path::Path) -> Vec<f32> {
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    let model = CausalLm::load(dir, config, None, 8, &Device::Cpu).unwrap();
    let row = Row {
        input_ids: vec![3, 14, 15, 92, 65, 35],
        labels: vec![-100; 6],
        position_ids: (0..6).collect(),
        starts: vec![0],
    };
    model
        .logits(&build(&[&row], 0, &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_merged_export_equals_the_single_file_one() {
    let runs = tempfile::tempdir().unwrap();
    let summary = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .learning_rate(5e-2)
        .batch_size(BatchSize::Fixed(4))
        .runs_dir(runs.path())
        .train(samples_dir().join("alpaca.jsonl"), 3)
        .unwrap();
    let single = export(
        &summary.run_dir,
        &ExportOptions {
            format: ExportFormat::Merged,
            dtype: WeightDtype::F32,
            ..Default::default()
        },
        &Silent,
    )
    .unwrap();
    let reference = logits(&single);
    let sharded_opts = ExportOptions {
        format: ExportFormat::Merged,
        dtype: WeightDtype::F32,
        max_shard_bytes: 100_000,
        ..ExportOptions::default()
    };
    let sharded = export(&summary.run_dir, &sharded_opts, &Silent).unwrap();
    assert_eq!(
        sharded, single,
        "same export name: the new export replaced the old one"
    );
    let shards = std::fs::read_dir(&sharded)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-0")
        })
        .count();
    assert!(shards >= 3, "{shards} shards");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert_eq!(logits(&sharded), reference);
    // Merging really changed the weights.
    assert_ne!(reference, logits(fixture(Family::Qwen2)));
}

#[test]
fn a_run_without_adapter_or_checkpoint_cannot_be_exported() {
    let runs = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(fixture(Family::Llama).to_str().unwrap()).runs_dir(runs.path());
    let cancel = trainer.cancel_token();
    cancel.cancel();
    trainer.config_mut().checkpoint_every = 0;
    let summary = trainer
        .train(samples_dir().join("alpaca.jsonl"), 5)
        .unwrap();
    // Cancelled before the first step: a step-0 checkpoint exists, so remove it to get
    // a run that has nothing at all.
    std::fs::remove_dir_all(summary.run_dir.join("checkpoints")).unwrap();
    let err = export(&summary.run_dir, &ExportOptions::default(), &Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no adapter or checkpoint yet"), "{err}");
    assert!(!summary.run_dir.join("exports").exists(), "nothing written");
}

#[test]
fn format_names_are_checked() {
    assert_eq!("gguf".parse::<ExportFormat>(), Ok(ExportFormat::Gguf));
    assert!("q3_k_xl"
        .parse::<backpropagate::export::GgufQuant>()
        .unwrap_err()
        .contains("use auto, f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0"));
    assert!("onnx"
        .parse::<ExportFormat>()
        .unwrap_err()
        .contains("unknown export format `onnx`"));
    assert!("int4"
        .parse::<WeightDtype>()
        .unwrap_err()
        .contains("use f32, f16 or bf16"));
}
