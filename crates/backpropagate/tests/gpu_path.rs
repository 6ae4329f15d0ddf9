//! The GPU path, checked on the CPU: device choice, out-of-memory back-off (through a
//! simulated memory limit), QLoRA on quantized bases, and bitsandbytes 4-bit
//! checkpoints.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backpropagate::config::{BaseQuant, BatchSize};
use backpropagate::event::Event;
use backpropagate::fixture::{write_bnb_4bit, write_fixture_model, Family, FixtureSpec};
use backpropagate::gpu::memory::{estimate_fused, weight_bits, Shape};
use backpropagate::model::qlinear::FrozenWeight;
use backpropagate::model::{CausalLm, ModelConfig};
use backpropagate::run::{RunDir, RunStatus};
use backpropagate::train::probe::probe_with;
use backpropagate::train::{CancelToken, Trainer};
use candle_core::{DType, Device};
use common::{fixture, losses, samples_dir};

type Log = Arc<Mutex<Vec<Event>>>;

fn train_logged(
    t: Trainer,
) -> (
    backpropagate::Result<backpropagate::train::RunSummary>,
    Vec<String>,
) {
    let seen: Log = Arc::default();
    let sink = {
        let seen = seen.clone();
        move |e: Event| seen.lock().unwrap().push(e)
    };
    let result = t.start_with(&sink, &CancelToken::default());
    let logs = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Log { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect();
    (result, logs)
}

/// Packed 64-token rows of the alpaca sample, batch `micro` × `acc`, dropout on.
fn packed_trainer(runs: &Path, micro: u32, acc: u32, steps: u64) -> Trainer {
    let mut t = Trainer::new(fixture(Family::Qwen2).to_str().unwrap())
        .batch_size(BatchSize::Fixed(micro))
        .learning_rate(5e-3)
        .runs_dir(runs);
    let c = t.config_mut();
    c.data = samples_dir().join("alpaca.jsonl");
    c.steps = steps;
    c.packing = true;
    c.max_seq_len = 64;
    c.gradient_accumulation = acc;
    c.lora.dropout = 0.1;
    c.device = "cpu".into();
    t
}

/// What the trainer estimates for the fixture at 64 tokens: f32 on the CPU, the fused
/// path's plan.
fn fixture_estimate() -> backpropagate::gpu::memory::Estimate {
    let config = ModelConfig::load(&fixture(Family::Qwen2).join("config.json")).unwrap();
    estimate_fused(
        &Shape::of(&config),
        64,
        16,
        weight_bits(BaseQuant::F32),
        0,
        false,
    )
}

#[test]
fn out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch() {
    let runs = tempfile::tempdir().unwrap();
    let est = fixture_estimate();
    // Two samples fit, four do not.
    let limit = est.fixed_bytes + 2 * est.per_sample_bytes + est.per_sample_bytes / 2;
    let (backed_off, logs) =
        train_logged(packed_trainer(runs.path(), 8, 1, 6).simulate_memory_limit(limit));
    let backed_off = backed_off.unwrap();
    assert_eq!(backed_off.status, RunStatus::Finished);
    let oom: Vec<_> = logs
        .iter()
        .filter(|l| l.starts_with("out of memory"))
        .collect();
    assert_eq!(oom.len(), 2, "{logs:#?}");
    assert!(
        oom[0]
            .contains("step 1 with micro-batch 8: continuing with micro-batch 4 × accumulation 2"),
        "{}",
        oom[0]
    );
    assert!(
        oom[1].contains("micro-batch 4: continuing with micro-batch 2 × accumulation 4"),
        "{}",
        oom[1]
    );

    // The same run planned as 2 × 4 from the start: the same rows, the same dropout
    // draws, the same losses.
    let (planned, _) = train_logged(packed_trainer(runs.path(), 2, 4, 6));
    let planned = planned.unwrap();
    assert_eq!(losses(&backed_off.run_dir), losses(&planned.run_dir));

    // The checkpoint remembers the size that fits.
    let ckpt = backed_off.run_dir.join("checkpoints/step-6/state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ckpt).unwrap()).unwrap();
    assert_eq!(state["micro_batch"], 2, "{state}");
}

#[test]
fn out_of_memory_at_micro_batch_one_fails_clearly_and_keeps_the_run() {
    let runs = tempfile::tempdir().unwrap();
    let est = fixture_estimate();
    let (result, _) =
        train_logged(packed_trainer(runs.path(), 2, 1, 3).simulate_memory_limit(est.fixed_bytes));
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("out of memory at step 1 even with micro-batch 1")
            && err.contains("max_seq_len")
            && err.contains("q4_k"),
        "{err}"
    );
    let run = std::fs::read_dir(runs.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let info = RunDir::open(&run).unwrap().info().unwrap();
    assert_eq!(info.status, RunStatus::Failed);
    assert!(run.join("run.toml").is_file());
}

#[test]
fn auto_device_on_a_cpu_build_trains_on_the_cpu_and_says_so() {
    if candle_core::utils::cuda_is_available() {
        return;
    }
    let runs = tempfile::tempdir().unwrap();
    let mut t = packed_trainer(runs.path(), 2, 1, 1);
    t.config_mut().device = "auto".into();
    let (result, logs) = train_logged(t);
    assert_eq!(result.unwrap().steps, 1);
    assert!(
        logs.iter().any(|l| l.starts_with("training on the CPU")),
        "{logs:#?}"
    );
}

/// A fixture 256 wide, so q4_K blocks (256 values) tile every linear.
fn wide_fixture() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let spec = FixtureSpec {
            hidden_size: 256,
            intermediate_size: 512,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            ..FixtureSpec::new(Family::Llama)
        };
        write_fixture_model(dir.path(), &spec).unwrap();
        dir
    })
    .path()
}

/// A copy of `src` whose linears are replaced by their q4_k round trip, in f32.
fn dequantized_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        let values = if name.ends_with("proj.weight") {
            FrozenWeight::from_f32(values, shape[0], shape[1], BaseQuant::Q4K, &Device::Cpu)
                .unwrap()
                .to_dense()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        } else {
            values
        };
        tensors.push((name, shape, values));
    }
    backpropagate::fsx::write_f32_safetensors(&dst.join("model.safetensors"), &tensors).unwrap();
}

/// A trained adapter (B no longer zero) and a batch of real rows for probes.
/// (input_ids, labels) rows, as `probe` takes them.
type Rows = Vec<(Vec<u32>, Vec<i32>)>;

fn adapter_and_rows(model: &Path, runs: &Path) -> (PathBuf, Rows) {
    let mut t = Trainer::new(model.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .learning_rate(1e-2)
        .runs_dir(runs);
    t.config_mut().max_seq_len = 48;
    t.config_mut().device = "cpu".into();
    let summary = t.train(samples_dir().join("alpaca.jsonl"), 3).unwrap();
    let prepared = backpropagate::data::prepare(
        &samples_dir().join("alpaca.jsonl"),
        model,
        &backpropagate::data::PrepareOptions {
            encode: backpropagate::data::EncodeOptions {
                max_seq_len: 48,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let rows = prepared
        .encoded
        .iter()
        .take(3)
        .map(|e| (e.input_ids.clone(), e.labels.clone()))
        .collect();
    (summary.run_dir.join("adapter"), rows)
}

fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// QLoRA's loss and every LoRA gradient agree with the full-precision model whose
/// weights are the dequantized q4_k ones: the frozen quantized matmul and its backward
/// compute what they stand for (up to the activation rounding of the quantized kernel).
#[test]
fn qlora_forward_and_backward_match_the_dequantized_model() {
    let work = tempfile::tempdir().unwrap();
    let (adapter, rows) = adapter_and_rows(wide_fixture(), &work.path().join("runs"));
    let reference = work.path().join("dequantized");
    dequantized_copy(wide_fixture(), &reference);
    let q = probe_with(wide_fixture(), &adapter, &rows, BaseQuant::Q4K, DType::F32).unwrap();
    let f = probe_with(&reference, &adapter, &rows, BaseQuant::F32, DType::F32).unwrap();
    assert!(
        (q.loss - f.loss).abs() < 1e-2 * f.loss,
        "loss {} vs {}",
        q.loss,
        f.loss
    );
    for ((name, gq), (_, gf)) in q.grads.iter().zip(&f.grads) {
        let diff = max_abs(&(gq - gf).unwrap());
        let scale = max_abs(gf);
        assert!(diff <= 0.05 * scale + 1e-6, "{name}: {diff} vs {scale}");
    }
    // And the full-precision original differs from both by the quantization error: the
    // check above is not comparing a model with itself.
    let original = probe_with(wide_fixture(), &adapter, &rows, BaseQuant::F32, DType::F32).unwrap();
    assert_ne!(original.loss, f.loss);
}

#[test]
fn qlora_training_holds_the_base_in_4_bit_and_the_loss_falls() {
    let runs = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(wide_fixture().to_str().unwrap())
        .batch_size(BatchSize::Fixed(4))
        .learning_rate(1e-2)
        .runs_dir(runs.path());
    t.config_mut().base_quant = BaseQuant::Q4K;
    t.config_mut().max_seq_len = 64;
    t.config_mut().device = "cpu".into();
    t.config_mut().schedule.warmup_steps = 2;
    t.config_mut().data = samples_dir().join("alpaca.jsonl");
    t.config_mut().steps = 20;
    let (summary, logs) = train_logged(t);
    let summary = summary.unwrap();
    let held = logs
        .iter()
        .find(|l| l.starts_with("frozen linears held as q4_k:"))
        .unwrap_or_else(|| panic!("{logs:#?}"));
    // 2 layers × (4 × 256² + 3 × 256 × 512) weights at 4.5 bits: 0.6 MiB (f32: 4.5 MiB).
    assert!(held.ends_with("0.6 MiB"), "{held}");
    let l = losses(&summary.run_dir);
    let tail = l[15..].iter().sum::<f64>() / 5.0;
    assert!(tail < l[0] - 0.3, "first {} → last-5 mean {tail}", l[0]);
}

/// A bitsandbytes NF4 checkpoint (plain and double-quantized scales) loads as the
/// values its layout encodes, close to the original weights, and trains.
#[test]
fn bitsandbytes_4bit_checkpoints_load_and_train() {
    let work = tempfile::tempdir().unwrap();
    let src = fixture(Family::Qwen2);
    for double_quant in [false, true] {
        let dst = work.path().join(format!("bnb-{double_quant}"));
        write_bnb_4bit(src, &dst, double_quant).unwrap();
        let cfg = ModelConfig::load(&dst.join("config.json")).unwrap();
        CausalLm::validate(&dst, &cfg).unwrap();
        let w = backpropagate::model::Weights::open(&dst, candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        assert!(w.has_nf4());
        let name = "model.layers.1.mlp.down_proj.weight";
        let got = w.get(name, &[64, 128]).unwrap();
        let st_bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        let want: Vec<f32> = st
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        // NF4's widest gap is 0.30 of the block maximum, so the nearest code is within 0.15.
        assert!(
            err <= 0.16 * scale,
            "double_quant {double_quant}: {err} vs {scale}"
        );
        assert!(err > 0.0);
        drop(w);

        let runs = work.path().join(format!("runs-{double_quant}"));
        let mut t = Trainer::new(dst.to_str().unwrap())
            .batch_size(BatchSize::Fixed(2))
            .runs_dir(&runs);
        t.config_mut().device = "cpu".into();
        t.config_mut().max_seq_len = 64;
        t.config_mut().data = samples_dir().join("alpaca.jsonl");
        t.config_mut().steps = 2;
        let (summary, logs) = train_logged(t);
        assert_eq!(summary.unwrap().steps, 2);
        assert!(
            logs.iter()
                .any(|l| l.starts_with("bitsandbytes 4-bit checkpoint")),
            "{logs:#?}"
        );
    }
}

#[test]
fn a_bad_device_is_refused_before_a_run_exists() {
    let runs = tempfile::tempdir().unwrap();
    let mut t = packed_trainer(runs.path(), 2, 1, 1);
    t.config_mut().device = "tpu".into();
    let (result, _) = train_logged(t);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("auto, cpu, cuda"), "{err}");
    assert_eq!(
        std::fs::read_dir(runs.path())
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// A run on a bitsandbytes base exports: the merged model is the dequantized base
/// plus the LoRA delta (same logits as base + adapter), with no quantization_config
/// left behind, and GGUF export works from the same base.
#[test]
fn runs_on_a_4bit_base_export_merged_and_gguf() {
    use backpropagate::export::{export, ExportFormat, ExportOptions, WeightDtype};
    let work = tempfile::tempdir().unwrap();
    let bnb = work.path().join("bnb");
    write_bnb_4bit(fixture(Family::Llama), &bnb, true).unwrap();
    let mut t = Trainer::new(bnb.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .learning_rate(1e-2)
        .runs_dir(work.path().join("runs"));
    t.config_mut().device = "cpu".into();
    t.config_mut().max_seq_len = 48;
    let summary = t.train(samples_dir().join("alpaca.jsonl"), 3).unwrap();

    let merged = export(
        &summary.run_dir,
        &ExportOptions {
            format: ExportFormat::Merged,
            dtype: WeightDtype::F32,
            ..ExportOptions::default()
        },
        &backpropagate::event::Silent,
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    let rows = vec![(vec![3u32, 14, 15, 92, 65, 35], vec![-100i32; 6])];
    let adapter = summary.run_dir.join("adapter");
    let with_adapter = probe_with(&bnb, &adapter, &rows, BaseQuant::F32, DType::F32).unwrap();
    let config = ModelConfig::load(&merged.join("config.json")).unwrap();
    let model = CausalLm::load(&merged, config, None, 8, &Device::Cpu).unwrap();
    let row = backpropagate::train::batch::Row {
        input_ids: rows[0].0.clone(),
        labels: rows[0].1.clone(),
        position_ids: (0..6).collect(),
        starts: vec![0],
    };
    let merged_logits = model
        .logits(&backpropagate::train::batch::build(&[&row], 0, &Device::Cpu).unwrap())
        .unwrap();
    let diff = max_abs(&(merged_logits - &with_adapter.logits).unwrap());
    assert!(diff < 1e-4, "merged vs base + adapter: {diff}");

    let gguf = export(
        &summary.run_dir,
        &ExportOptions::parse("gguf", "q8_0").unwrap(),
        &backpropagate::event::Silent,
    )
    .unwrap();
    assert!(gguf.is_file() || gguf.is_dir(), "{}", gguf.display());
}

/// Mixed precision, checked on the CPU in f16 (candle's CPU matmul has no bf16 kernel;
/// the graph — 16-bit activations and frozen weights, f32 norms, softmax and loss, f32
/// master LoRA weights — is the same one bf16 runs on a GPU): the loss and every LoRA
/// gradient follow the f32 ones to 16-bit precision, gradients arrive in f32, and the
/// frozen weights take half the memory. (bf16 on the CPU is another path: bf16
/// products with f32 activations, `tests/cpu_bf16.rs`.)
#[test]
fn mixed_precision_tracks_f32_with_f32_master_weights() {
    let work = tempfile::tempdir().unwrap();
    let (adapter, rows) = adapter_and_rows(wide_fixture(), &work.path().join("runs"));
    let h = probe_with(wide_fixture(), &adapter, &rows, BaseQuant::F32, DType::F16).unwrap();
    let f = probe_with(wide_fixture(), &adapter, &rows, BaseQuant::F32, DType::F32).unwrap();
    assert!(
        (h.loss - f.loss).abs() < 1e-2 * f.loss,
        "loss {} vs {}",
        h.loss,
        f.loss
    );
    assert_ne!(h.loss, f.loss);
    for ((name, gh), (_, gf)) in h.grads.iter().zip(&f.grads) {
        assert_eq!(gh.dtype(), DType::F32, "{name}");
        let diff = max_abs(&(gh - gf).unwrap());
        let scale = max_abs(gf);
        assert!(diff <= 0.05 * scale + 1e-6, "{name}: {diff} vs {scale}");
    }
    let config = ModelConfig::load(&wide_fixture().join("config.json")).unwrap();
    let bytes = |dtype| {
        CausalLm::load_with(
            wide_fixture(),
            config.clone(),
            None,
            8,
            &Device::Cpu,
            BaseQuant::F32,
            dtype,
        )
        .unwrap()
        .linear_bytes()
    };
    assert_eq!(bytes(DType::F16) * 2, bytes(DType::F32));
}

/// On an NVIDIA GPU (a `--features cuda` build; skipped elsewhere, as in CI): the same
/// first steps as on the CPU within float tolerance, in f32, and in bf16 with a q4_k
/// base; the run says which device it used. `scripts/gpu-check.sh` runs these.
#[test]
fn on_a_cuda_gpu_training_matches_the_cpu() {
    if !candle_core::utils::cuda_is_available() || Device::new_cuda(0).is_err() {
        eprintln!("skipped: no CUDA build or no NVIDIA GPU");
        return;
    }
    let runs = tempfile::tempdir().unwrap();
    let run = |device: &str, precision, quant| {
        let mut t = Trainer::new(wide_fixture().to_str().unwrap())
            .batch_size(BatchSize::Fixed(4))
            .learning_rate(1e-2)
            .runs_dir(runs.path());
        let c = t.config_mut();
        c.device = device.into();
        c.precision = precision;
        c.base_quant = quant;
        c.lora.dropout = 0.0;
        c.max_seq_len = 64;
        c.data = samples_dir().join("alpaca.jsonl");
        c.steps = 5;
        let (summary, logs) = train_logged(t);
        (losses(&summary.unwrap().run_dir), logs)
    };
    use backpropagate::Precision;
    let (cpu, _) = run("cpu", Precision::F32, BaseQuant::F32);
    let (gpu, logs) = run("cuda", Precision::F32, BaseQuant::F32);
    assert!(logs.iter().any(|l| l == "training on cuda:0"), "{logs:#?}");
    for (g, c) in gpu.iter().zip(&cpu) {
        assert!((g - c).abs() < 1e-3 * c, "cuda f32 {gpu:?} vs cpu {cpu:?}");
    }
    let (mixed, logs) = run("cuda", Precision::Auto, BaseQuant::Q4K);
    assert!(
        logs.iter().any(|l| l.starts_with("mixed precision: bf16")),
        "{logs:#?}"
    );
    assert!(
        (mixed[0] - cpu[0]).abs() < 3e-2 * cpu[0],
        "bf16+q4_k {mixed:?} vs {cpu:?}"
    );
    assert!(mixed[4] < mixed[0], "{mixed:?}");
}
