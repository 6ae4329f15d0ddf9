//! Base checkpoints as they come from the hub: sharded with an index, and stored in
//! bf16 / f16, load into the same model as the single f32 file.

mod common;

use std::collections::HashMap;
use std::path::Path;

use backpropagate::fixture::Family;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::train::batch::{build, Row};
use candle_core::{DType, Device, Tensor};
use common::fixture;

fn logits(dir: &Path) -> Vec<f32> {
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    let model = CausalLm::load(dir, config, None, 16, &Device::Cpu).unwrap();
    let row = Row {
        input_ids: vec![5, 17, 42, 99, 7, 300, 12, 64],
        labels: vec![-100; 8],
        position_ids: (0..8).collect(),
        starts: vec![0],
    };
    let batch = build(&[&row], 0, &Device::Cpu).unwrap();
    model
        .logits(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Copies the fixture's side files and rewrites its weights as `shards` files of `dtype`.
fn rewrite(from: &Path, to: &Path, dtype: DType, shards: usize) {
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&part, to.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(to.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

#[test]
fn sharded_checkpoints_load_identically() {
    let base = fixture(Family::Llama);
    let dir = tempfile::tempdir().unwrap();
    rewrite(base, dir.path(), DType::F32, 3);
    assert!(!dir.path().join("model.safetensors").exists());
    assert_eq!(logits(dir.path()), logits(base));
}

#[test]
fn bf16_and_f16_checkpoints_load_close_to_f32() {
    let base = fixture(Family::Qwen2);
    let reference = logits(base);
    for (dtype, tol) in [(DType::BF16, 0.05f32), (DType::F16, 0.005)] {
        let dir = tempfile::tempdir().unwrap();
        rewrite(base, dir.path(), dtype, 1);
        let got = logits(dir.path());
        let max = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max > 0.0 && max < tol,
            "{dtype:?}: max logit difference {max}"
        );
    }
}
