//! Gradient checkpointing (`CausalLm::set_recompute_layers`): checkpointed layers keep
//! only their input and are recomputed in backward, which must not change the loss or
//! any LoRA gradient by a single bit — on the fused CPU ops and the basic-op decoder,
//! with dropout.

mod common;

use std::sync::{Arc, Mutex};

use backpropagate::config::{BatchSize, GradientCheckpointing, LoraConfig};
use backpropagate::event::Event;
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::lora::LoraSet;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::train::batch::Row;
use backpropagate::train::Trainer;
use candle_core::Device;
use common::{fixture, give_b_values, loss_and_grads, losses, random_rows, samples_dir};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn rows(vocab: u32, rng: &mut ChaCha8Rng) -> Vec<Row> {
    random_rows(vocab, rng, &[31, 12, 20], 4)
}

fn pass(model: &CausalLm, lora: &LoraSet, rows: &[Row]) -> (f32, Vec<Vec<f32>>) {
    loss_and_grads(model, lora, rows, 11)
}

#[test]
fn recomputed_layers_give_the_same_loss_and_gradients() {
    for family in [Family::Llama, Family::Qwen3] {
        let dir = tempfile::tempdir().unwrap();
        write_fixture_model(dir.path(), &FixtureSpec::new(family)).unwrap();
        let config = ModelConfig::load(&dir.path().join("config.json")).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let lora_config = LoraConfig {
            r: 4,
            dropout: 0.1,
            ..LoraConfig::default()
        };
        let lora = LoraSet::init(&config, &lora_config, &mut rng, &Device::Cpu).unwrap();
        give_b_values(&lora, &mut rng);
        let mut model =
            CausalLm::load(dir.path(), config.clone(), Some(&lora), 64, &Device::Cpu).unwrap();
        let rows = rows(config.vocab_size as u32, &mut rng);
        let layers = model.num_layers();
        assert!(layers >= 2);
        for fused in [true, false] {
            model.set_fused(fused);
            model.set_recompute_layers(0);
            let (want_loss, want) = pass(&model, &lora, &rows);
            for n in [1, layers] {
                model.set_recompute_layers(n);
                let what = format!("{family:?} fused={fused} recomputing {n} of {layers} layers");
                let (loss, got) = pass(&model, &lora, &rows);
                assert_eq!(loss, want_loss, "{what}: the loss changed");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(scale > 0.0, "{what}: gradient {i} is zero");
                    assert!(
                        diff == 0.0,
                        "{what}: gradient {} differs by up to {diff} (largest value {scale})",
                        lora.named_vars()[i].0
                    );
                }
            }
        }
        // Nothing is left behind for the next step.
        model.set_recompute_layers(layers);
        let (_, again) = pass(&model, &lora, &rows);
        let (_, once_more) = pass(&model, &lora, &rows);
        assert_eq!(
            again, once_more,
            "{family:?}: gradients leaked between passes"
        );
    }
}

/// A run with `gradient_checkpointing = on` logs the same losses as one without, says
/// so in its log, and when stopped at step 3 resumes to the same losses again.
#[test]
fn a_checkpointed_run_trains_and_resumes_exactly_like_a_plain_one() {
    let runs = tempfile::tempdir().unwrap();
    let run = |mode: GradientCheckpointing, stop_at: Option<u64>| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut t = Trainer::new(fixture(Family::Llama).to_str().unwrap())
            .batch_size(BatchSize::Fixed(4))
            .runs_dir(runs.path());
        t.config_mut().lora.dropout = 0.1;
        t.config_mut().gradient_checkpointing = mode;
        let cancel = t.cancel_token();
        let seen = log.clone();
        let t = t.on_event(move |e: Event| match e {
            Event::Log { message, .. } => seen.lock().unwrap().push(message),
            Event::Step { step, .. } if Some(step) == stop_at => cancel.cancel(),
            _ => {}
        });
        let summary = t.train(samples_dir().join("alpaca.jsonl"), 6).unwrap();
        let says = log
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("gradient checkpointing: 2 of 2 layers"));
        (summary, says)
    };
    let (plain, plain_says) = run(GradientCheckpointing::Off, None);
    let (checkpointed, says) = run(GradientCheckpointing::On, None);
    assert!(
        says && !plain_says,
        "the log says which layers are recomputed"
    );
    assert_eq!(losses(&checkpointed.run_dir), losses(&plain.run_dir));
    let (stopped, _) = run(GradientCheckpointing::On, Some(3));
    assert_eq!(stopped.steps, 3);
    let resumed = Trainer::resume(
        &stopped.run_dir,
        &backpropagate::event::Silent,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(resumed.steps, 6);
    assert_eq!(losses(&resumed.run_dir), losses(&plain.run_dir));
}
