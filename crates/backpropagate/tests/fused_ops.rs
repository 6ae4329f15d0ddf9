//! The fused CPU ops against the basic-op reference decoder (`CausalLm::set_fused`):
//! same loss and same LoRA gradients, for every family, with and without rsLoRA and
//! dropout, on padded and packed rows.

use backpropagate::config::LoraConfig;
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::lora::LoraSet;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::train::batch::{build, Row};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Rows of different lengths (so there is padding) and one packed row of two samples.
fn rows(vocab: u32, rng: &mut ChaCha8Rng) -> Vec<Row> {
    let mut sample = |len: usize| -> (Vec<u32>, Vec<i32>) {
        let ids: Vec<u32> = (0..len).map(|_| rng.gen_range(3..vocab)).collect();
        // The first third is the prompt: no loss there.
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < len / 3 { -100 } else { t as i32 })
            .collect();
        (ids, labels)
    };
    let mut out: Vec<Row> = [23, 9, 17]
        .into_iter()
        .map(|len| {
            let (ids, labels) = sample(len);
            Row::single(ids, labels)
        })
        .collect();
    let (a, la) = sample(8);
    let (b, lb) = sample(12);
    out.push(Row {
        position_ids: (0..8).chain(0..12).collect(),
        input_ids: [a, b].concat(),
        labels: [la, lb].concat(),
        starts: vec![0, 8],
    });
    out
}

struct Pass {
    loss: f32,
    grads: Vec<Vec<f32>>,
}

fn pass(model: &CausalLm, lora: &LoraSet, rows: &[Row], dropout: bool) -> Pass {
    let refs: Vec<&Row> = rows.iter().collect();
    let batch = build(&refs, 0, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let loss = model.loss_sum(&batch, dropout.then_some(&mut rng)).unwrap();
    let store = loss.backward().unwrap();
    let grads = lora
        .named_vars()
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
        .collect();
    Pass {
        loss: loss.to_scalar::<f32>().unwrap(),
        grads,
    }
}

#[test]
fn fused_ops_match_the_reference_decoder_for_every_family() {
    for family in Family::ALL {
        let dir = tempfile::tempdir().unwrap();
        write_fixture_model(dir.path(), &FixtureSpec::new(family)).unwrap();
        let config = ModelConfig::load(&dir.path().join("config.json")).unwrap();
        for (rslora, dropout) in [(false, 0.0), (true, 0.1)] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let lora_config = LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout,
                rslora,
                ..LoraConfig::default()
            };
            let lora = LoraSet::init(&config, &lora_config, &mut rng, &Device::Cpu).unwrap();
            // B starts at zero, which would leave A's gradient zero: give it values.
            for l in &lora.layers {
                let shape = l.b.as_tensor().shape().clone();
                let values: Vec<f32> = (0..shape.elem_count())
                    .map(|_| rng.gen_range(-0.5..0.5))
                    .collect();
                l.b.set(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
                    .unwrap();
            }
            let mut model =
                CausalLm::load(dir.path(), config.clone(), Some(&lora), 64, &Device::Cpu).unwrap();
            let rows = rows(config.vocab_size as u32, &mut rng);
            model.set_fused(false);
            let want = pass(&model, &lora, &rows, dropout > 0.0);
            model.set_fused(true);
            let got = pass(&model, &lora, &rows, dropout > 0.0);
            let what = format!("{family:?} rslora={rslora} dropout={dropout}");
            assert!(
                (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
                "{what}: loss {} vs reference {}",
                got.loss,
                want.loss
            );
            for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(scale > 0.0, "{what}: gradient {i} is zero");
                assert!(
                    diff <= 1e-4 * scale,
                    "{what}: gradient {} differs by {diff} (largest value {scale})",
                    lora.named_vars()[i].0
                );
            }
        }
    }
}
