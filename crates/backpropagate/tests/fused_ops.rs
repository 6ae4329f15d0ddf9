//! The fused CPU ops against the basic-op reference decoder (`CausalLm::set_fused`):
//! same loss and same LoRA gradients, for every family, with and without rsLoRA and
//! dropout, on padded and packed rows.

mod common;

use backpropagate::config::LoraConfig;
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};
use backpropagate::lora::LoraSet;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::train::batch::{build, Row};
use candle_core::Device;
use common::{give_b_values, lora_grads};
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
    let grads = lora_grads(&loss.backward().unwrap(), lora);
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
            give_b_values(&lora, &mut rng);
            let mut model =
                CausalLm::load(dir.path(), config.clone(), Some(&lora), 64, &Device::Cpu).unwrap();
            let rows = rows(config.vocab_size as u32, &mut rng);
            let refs: Vec<&Row> = rows.iter().collect();
            let batch = build(&refs, 0, &Device::Cpu).unwrap();
            model.set_fused(false);
            let want = pass(&model, &lora, &rows, dropout > 0.0);
            let want_logits = model.logits(&batch).unwrap();
            model.set_fused(true);
            let got = pass(&model, &lora, &rows, dropout > 0.0);
            let what = format!("{family:?} rslora={rslora} dropout={dropout}");
            // The padded layout (previews) too, padding positions included.
            let logits_diff = (model.logits(&batch).unwrap() - &want_logits)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(logits_diff < 1e-4, "{what}: logits differ by {logits_diff}");
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

/// Copies the model folder `src` to `dst`, its f32 tensors rewritten by `f` (which
/// gets the values and returns the dtype and bytes to store).
fn rewrite_weights(
    src: &std::path::Path,
    dst: &std::path::Path,
    f: impl Fn(&[f32]) -> (safetensors::Dtype, Vec<u8>),
) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (dtype, data) = f(&values);
        tensors.push((name, dtype, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dst.join("model.safetensors"), out).unwrap();
}

#[test]
fn a_bf16_checkpoint_keeps_its_linears_in_bf16_with_the_same_results_as_widened_f32() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("f32");
    write_fixture_model(&src, &FixtureSpec::new(Family::Qwen2)).unwrap();
    let half = work.path().join("bf16");
    rewrite_weights(&src, &half, |v| {
        let b = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        (safetensors::Dtype::BF16, b)
    });
    // The same values, rounded to bf16, stored as f32.
    let wide = work.path().join("wide");
    rewrite_weights(&src, &wide, |v| {
        let b = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_f32().to_le_bytes())
            .collect();
        (safetensors::Dtype::F32, b)
    });
    let config = ModelConfig::load(&src.join("config.json")).unwrap();
    let lora_config = LoraConfig {
        r: 4,
        dropout: 0.1,
        ..LoraConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let lora = LoraSet::init(&config, &lora_config, &mut rng, &Device::Cpu).unwrap();
    give_b_values(&lora, &mut rng);
    let rows = rows(config.vocab_size as u32, &mut rng);
    let load = |dir: &std::path::Path| {
        CausalLm::load(dir, config.clone(), Some(&lora), 64, &Device::Cpu).unwrap()
    };
    let (mut m_half, m_wide) = (load(&half), load(&wide));
    assert_eq!(m_half.linear_bytes() * 2, m_wide.linear_bytes());
    let (a, b) = (
        pass(&m_half, &lora, &rows, true),
        pass(&m_wide, &lora, &rows, true),
    );
    assert_eq!(a.loss, b.loss, "fused: bf16-held weights change the loss");
    assert_eq!(
        a.grads, b.grads,
        "fused: bf16-held weights change the gradients"
    );
    // The reference decoder widens them too.
    m_half.set_fused(false);
    let r = pass(&m_half, &lora, &rows, true);
    assert!((r.loss - a.loss).abs() <= 1e-5 * a.loss.abs());
}

/// QLoRA bases through the fused ops (a band of rows decoded at a time) against the
/// reference decoder (the whole weight dequantized for each product), with LoRA on two
/// projections only so the other linears take the frozen-only op; and a bf16 base
/// likewise, both on padded and packed rows.
#[test]
fn quantized_and_frozen_only_linears_match_the_reference_decoder() {
    use backpropagate::config::BaseQuant;
    use candle_core::DType;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_model(dir.path(), &FixtureSpec::new(Family::Llama)).unwrap();
    let config = ModelConfig::load(&dir.path().join("config.json")).unwrap();
    for quant in [BaseQuant::Q8_0, BaseQuant::Q4K, BaseQuant::F32] {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let lora_config = LoraConfig {
            r: 4,
            dropout: 0.1,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..LoraConfig::default()
        };
        let lora = LoraSet::init(&config, &lora_config, &mut rng, &Device::Cpu).unwrap();
        give_b_values(&lora, &mut rng);
        let mut model = CausalLm::load_with(
            dir.path(),
            config.clone(),
            Some(&lora),
            64,
            &Device::Cpu,
            quant,
            DType::F32,
        )
        .unwrap();
        let rows = rows(config.vocab_size as u32, &mut rng);
        model.set_fused(false);
        let want = pass(&model, &lora, &rows, true);
        model.set_fused(true);
        let got = pass(&model, &lora, &rows, true);
        assert!(
            (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "{quant:?}: loss {} vs reference {}",
            got.loss,
            want.loss
        );
        assert_eq!(got.grads.len(), 2 * 2 * config.num_layers);
        for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.0, "{quant:?}: gradient {i} is zero");
            assert!(
                diff <= 1e-4 * scale,
                "{quant:?}: gradient {} differs by {diff} (largest value {scale})",
                lora.named_vars()[i].0
            );
        }
    }
}

/// Segments longer than one block of query rows (64) and than one tile of keys (256):
/// the blocked attention, its causal prefixes, its online softmax across key tiles and
/// its summed dk/dv shares against the reference decoder.
#[test]
fn long_segments_over_several_attention_blocks_match_the_reference_decoder() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture_model(dir.path(), &FixtureSpec::new(Family::Qwen2)).unwrap();
    let config = ModelConfig::load(&dir.path().join("config.json")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let lora = LoraSet::init(&config, &LoraConfig::default(), &mut rng, &Device::Cpu).unwrap();
    give_b_values(&lora, &mut rng);
    let mut model =
        CausalLm::load(dir.path(), config.clone(), Some(&lora), 1024, &Device::Cpu).unwrap();
    let vocab = config.vocab_size as u32;
    let rows: Vec<Row> = [150usize, 70, 600]
        .into_iter()
        .map(|len| {
            let ids: Vec<u32> = (0..len).map(|_| rng.gen_range(3..vocab)).collect();
            let labels = ids.iter().map(|&t| t as i32).collect();
            Row::single(ids, labels)
        })
        .collect();
    model.set_fused(false);
    let want = pass(&model, &lora, &rows, false);
    model.set_fused(true);
    let got = pass(&model, &lora, &rows, false);
    assert!(
        (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
        "loss {} vs reference {}",
        got.loss,
        want.loss
    );
    for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale,
            "gradient {} differs by {diff} (largest value {scale})",
            lora.named_vars()[i].0
        );
    }
}
