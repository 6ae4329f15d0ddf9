//! Shared test fixtures: one tiny model folder per family, built once per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};

pub fn fixture(family: Family) -> &'static Path {
    static DIRS: [OnceLock<tempfile::TempDir>; 4] = [const { OnceLock::new() }; 4];
    let slot = Family::ALL
        .iter()
        .position(|f| *f == family)
        .expect("a known family");
    DIRS[slot]
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            write_fixture_model(dir.path(), &FixtureSpec::new(family)).unwrap();
            dir
        })
        .path()
}

pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples")
}

/// The training loss of every step a run logged, in order.
pub fn losses(run_dir: &Path) -> Vec<f64> {
    backpropagate::run::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|m| m.loss)
        .collect()
}

/// B starts at zero, which would leave A's gradient zero: gives every B values.
pub fn give_b_values(lora: &backpropagate::lora::LoraSet, rng: &mut rand_chacha::ChaCha8Rng) {
    use rand::Rng;
    for l in &lora.layers {
        let shape = l.b.as_tensor().shape().clone();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.gen_range(-0.5..0.5))
            .collect();
        let b = candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap();
        l.b.set(&b).unwrap();
    }
}

/// Every LoRA gradient in `store`, flattened, in `named_vars` order.
pub fn lora_grads(
    store: &candle_core::backprop::GradStore,
    lora: &backpropagate::lora::LoraSet,
) -> Vec<Vec<f32>> {
    lora.named_vars()
        .into_iter()
        .map(|(name, v)| {
            store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Single-sample rows of random ids in `3..vocab`, one per length in `lens`, whose
/// first `prompt` tokens carry no loss.
pub fn random_rows(
    vocab: u32,
    rng: &mut rand_chacha::ChaCha8Rng,
    lens: &[usize],
    prompt: usize,
) -> Vec<backpropagate::train::batch::Row> {
    use rand::Rng;
    lens.iter()
        .map(|&len| {
            let ids: Vec<u32> = (0..len).map(|_| rng.gen_range(3..vocab)).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < prompt { -100 } else { t as i32 })
                .collect();
            backpropagate::train::batch::Row::single(ids, labels)
        })
        .collect()
}

/// Loss and every LoRA gradient of one forward/backward through `CausalLm::backward`,
/// dropout seeded with `seed`.
pub fn loss_and_grads(
    model: &backpropagate::model::CausalLm,
    lora: &backpropagate::lora::LoraSet,
    rows: &[backpropagate::train::batch::Row],
    seed: u64,
) -> (f32, Vec<Vec<f32>>) {
    use rand::SeedableRng;
    let refs: Vec<_> = rows.iter().collect();
    let batch = backpropagate::train::batch::build(&refs, 0, &candle_core::Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let loss = model.loss_sum(&batch, Some(&mut rng)).unwrap();
    let grads = lora_grads(&model.backward(&loss).unwrap(), lora);
    (loss.to_scalar::<f32>().unwrap(), grads)
}
