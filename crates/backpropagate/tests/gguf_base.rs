//! GGUF files as bases: our own GGUF of every fixture family reads back into a model
//! folder with the same weights (f32: exactly; q/k permutation undone), the same
//! tokenization and a config that loads as the original; training from the GGUF
//! path works; truncated and hostile files are refused with the file named, never a
//! panic or a huge allocation. (The real SmolLM2 GGUF from llama.cpp's converter is
//! checked against transformers and llama.cpp in tests/python/test_gguf_base.py.)

mod common;

use std::path::Path;

use backpropagate::config::BatchSize;
use backpropagate::event::Silent;
use backpropagate::export::{export, ExportFormat, ExportOptions, GgufQuant};
use backpropagate::fixture::Family;
use backpropagate::gguf_base;
use backpropagate::model::ModelConfig;
use backpropagate::train::Trainer;
use common::{fixture, samples_dir};

fn tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, view.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Our GGUF of `family`'s fixture (the base of a one-step run, exported as `quant`).
fn our_gguf(family: Family, quant: GgufQuant, runs: &Path) -> std::path::PathBuf {
    let run = Trainer::new(fixture(family).to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs)
        .train(samples_dir().join("alpaca.jsonl"), 1)
        .unwrap()
        .run_dir;
    let options = ExportOptions {
        format: ExportFormat::GgufBase,
        quant,
        ..Default::default()
    };
    let out = export(&run, &options, &Silent).unwrap();
    std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap()
}

#[test]
fn our_gguf_of_every_family_reads_back_into_the_same_model() {
    for family in Family::ALL {
        let runs = tempfile::tempdir().unwrap();
        let model = fixture(family);
        let file = our_gguf(family, GgufQuant::F32, runs.path());
        let bases = tempfile::tempdir().unwrap();
        let dir = gguf_base::import(&file, bases.path(), &Silent).unwrap();

        let want = ModelConfig::load(&model.join("config.json")).unwrap();
        let got = ModelConfig::load(&dir.join("config.json")).unwrap();
        // Mistral checkpoints are the llama architecture in GGUF.
        let arch = |c: &ModelConfig| match c.arch.as_str() {
            "mistral" => "llama".to_string(),
            a => a.to_string(),
        };
        assert_eq!(arch(&got), arch(&want), "{family:?}");
        assert_eq!(
            (
                got.hidden_size,
                got.num_layers,
                got.num_heads,
                got.num_kv_heads,
                got.head_dim
            ),
            (
                want.hidden_size,
                want.num_layers,
                want.num_heads,
                want.num_kv_heads,
                want.head_dim
            ),
            "{family:?}"
        );
        assert_eq!(got.vocab_size, want.vocab_size, "{family:?}");

        let (ours, theirs) = (tensors(&dir), tensors(model));
        let names = |t: &[(String, Vec<usize>, Vec<f32>)]| {
            t.iter().map(|x| x.0.clone()).collect::<Vec<_>>()
        };
        let mut want_names = names(&theirs);
        if got.tie_word_embeddings {
            want_names.retain(|n| n != "lm_head.weight");
        }
        assert_eq!(names(&ours), want_names, "{family:?}");
        for (a, b) in ours
            .iter()
            .zip(theirs.iter().filter(|t| want_names.contains(&t.0)))
        {
            assert_eq!(a.1, b.1, "{family:?} {}", a.0);
            assert!(a.2 == b.2, "{family:?}: {} differs", a.0);
        }

        let hf = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
        let rebuilt = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        for text in [
            "Hello, world!",
            "def f(x):\n    return x * 2\r\n",
            "12345 numbers ١٢٣ and émojis 🚀",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            assert_eq!(
                rebuilt.encode(text, true).unwrap().get_ids(),
                hf.encode(text, true).unwrap().get_ids(),
                "{family:?}: {text:?}"
            );
        }

        // A second import of the unchanged file reuses the folder.
        let again = gguf_base::import(&file, bases.path(), &Silent).unwrap();
        assert_eq!(again, dir);
    }
}

#[test]
fn training_from_a_gguf_path_works() {
    let runs = tempfile::tempdir().unwrap();
    let file = our_gguf(Family::Qwen2, GgufQuant::Q8_0, runs.path());
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("BACKPROP_HOME", home.path());
    let summary = Trainer::new(file.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs.path())
        .train(samples_dir().join("alpaca.jsonl"), 2)
        .unwrap();
    assert!(summary.final_loss.is_some_and(f64::is_finite));
    let info = backpropagate::run::RunDir::open(&summary.run_dir)
        .unwrap()
        .info()
        .unwrap();
    assert!(info.model_dir.starts_with(home.path().join("bases")));

    // The folder is a cache: deleted, it is read again from the file for an export.
    std::fs::remove_dir_all(home.path().join("bases")).unwrap();
    let adapter = ExportOptions {
        format: ExportFormat::Merged,
        ..Default::default()
    };
    export(&summary.run_dir, &adapter, &Silent).unwrap();
    assert!(info.model_dir.join("config.json").is_file());
    // A file that changed since would give other weights: refused.
    std::fs::remove_dir_all(home.path().join("bases")).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&file, &bytes).unwrap();
    let err = export(&summary.run_dir, &adapter, &Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has changed since the run started"), "{err}");
}

#[test]
fn truncated_and_hostile_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bases = dir.path().join("bases");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let header = |tensors: u64, keys: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(keys.to_le_bytes());
        b
    };
    let mut huge_string = header(0, 1);
    huge_string.extend(u64::MAX.to_le_bytes());
    let mut huge_array = header(0, 1);
    huge_array.extend(4u64.to_le_bytes());
    huge_array.extend(b"keys");
    huge_array.extend(9u32.to_le_bytes());
    huge_array.extend(8u32.to_le_bytes());
    huge_array.extend((1u64 << 60).to_le_bytes());
    let mut past_end = header(1, 0);
    past_end.extend(1u64.to_le_bytes());
    past_end.extend(b"t");
    past_end.extend(2u32.to_le_bytes());
    past_end.extend(4096u64.to_le_bytes());
    past_end.extend(4096u64.to_le_bytes());
    past_end.extend(0u32.to_le_bytes());
    past_end.extend(0u64.to_le_bytes());
    let cases = [
        (
            "not.gguf",
            b"PK\x03\x04 not a gguf".to_vec(),
            "does not start with `GGUF`",
        ),
        ("short.gguf", b"GGUF\x03\x00".to_vec(), "ends early"),
        ("string.gguf", huge_string, "a string of"),
        ("array.gguf", huge_array, "an array of"),
        ("past-end.gguf", past_end, "past the end of the file"),
        ("too-many.gguf", header(u64::MAX, 0), "tensors"),
    ];
    for (name, bytes, want) in cases {
        let path = write(name, &bytes);
        let err = gguf_base::import(&path, &bases, &Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    assert!(!bases.join("x").exists());
}

/// A fake Ollama store laid out as Ollama writes it: manifests per host/namespace/
/// model/tag naming blobs by digest.
fn ollama_store(root: &Path, gguf: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(gguf).unwrap();
    let hex = format!("{:x}", Sha256::digest(&bytes));
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("sha256-{hex}")), &bytes).unwrap();
    let template = b"{{ .Prompt }}";
    let thex = format!("{:x}", Sha256::digest(template));
    std::fs::write(blobs.join(format!("sha256-{thex}")), template).unwrap();
    let params = br#"{"stop":["<|im_end|>","<|user|>"],"temperature":0.7}"#;
    let phex = format!("{:x}", Sha256::digest(params));
    std::fs::write(blobs.join(format!("sha256-{phex}")), params).unwrap();
    let manifest = |layers: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{thex}","size":1}},"layers":[{layers}]}}"#
        )
    };
    let model = format!(
        r#"{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{hex}","size":{}}}"#,
        bytes.len()
    );
    let tmpl = format!(
        r#"{{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:{thex}","size":13}},{{"mediaType":"application/vnd.ollama.image.params","digest":"sha256:{phex}","size":{}}}"#,
        params.len()
    );
    let other = |kind: &str| {
        format!(
            r#"{{"mediaType":"application/vnd.ollama.image.{kind}","digest":"sha256:{thex}","size":13}}"#
        )
    };
    let lib = root.join("manifests/registry.ollama.ai/library");
    for (name, layers) in [
        ("tiny", format!("{model},{tmpl}")),
        ("seeing", format!("{model},{},{tmpl}", other("projector"))),
        ("adapted", format!("{model},{},{tmpl}", other("adapter"))),
        ("gone", model.replace(&hex, &"0".repeat(64))),
    ] {
        std::fs::create_dir_all(lib.join(name)).unwrap();
        std::fs::write(lib.join(name).join("latest"), manifest(&layers)).unwrap();
    }
    hex
}

#[test]
fn ollama_models_resolve_through_the_store_with_clear_errors() {
    let runs = tempfile::tempdir().unwrap();
    let file = our_gguf(Family::Qwen2, GgufQuant::F32, runs.path());
    let store = tempfile::tempdir().unwrap();
    ollama_store(store.path(), &file);
    let stores = vec![store.path().to_path_buf()];
    let bases = tempfile::tempdir().unwrap();

    // Names resolve as Ollama's do: default tag, case-insensitive.
    let dir = gguf_base::import_ollama("TINY", &stores, bases.path(), &Silent).unwrap();
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(config.arch.as_str(), "qwen2");
    let again = gguf_base::import_ollama("tiny:latest", &stores, bases.path(), &Silent).unwrap();
    assert_eq!(again, dir);
    // Ollama's own template and stops for the model are what a push sends.
    let t = backpropagate::ollama::template_for_model(&dir).unwrap();
    assert_eq!(t.template, "{{ .Prompt }}");
    assert_eq!(t.stop, ["<|im_end|>", "<|user|>"]);
    // Ollama's files are only read.
    assert!(
        std::fs::read_dir(store.path().join("blobs"))
            .unwrap()
            .count()
            == 3
    );

    let err = |name: &str, stores: &[std::path::PathBuf]| {
        gguf_base::import_ollama(name, stores, bases.path(), &Silent)
            .unwrap_err()
            .to_string()
    };
    let e = err("seeing", &stores);
    assert!(e.contains("vision model"), "{e}");
    let e = err("adapted", &stores);
    assert!(e.contains("LoRA adapter"), "{e}");
    let e = err("gone", &stores);
    assert!(
        e.contains("does not have it") && e.contains("ollama pull gone:latest"),
        "{e}"
    );
    let e = err("absent:7b", &stores);
    assert!(
        e.contains("has no model `absent:7b`") && e.contains("tiny:latest"),
        "{e}"
    );
    let e = err("../../etc:passwd", &stores);
    assert!(e.contains("not an Ollama model name"), "{e}");
    let nowhere = vec![store.path().join("missing")];
    let e = err("tiny", &nowhere);
    assert!(
        e.contains("no Ollama model store") && e.contains("OLLAMA_MODELS"),
        "{e}"
    );
}

/// The raw tensors of a folder's model.safetensors: (dtype, shape, bytes) by name.
fn stored(
    dir: &Path,
) -> std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

#[test]
fn a_quantized_gguf_base_keeps_its_blocks_and_trains_on_them_with_a_bit_identical_resume() {
    use backpropagate::event::Event;
    use backpropagate::quant::{encode, GgmlType};
    use backpropagate::run::RunStatus;

    // Llama: q and k rows are un-permuted as whole rows of blocks.
    for (family, quant, ty) in [
        (Family::Llama, GgufQuant::Q8_0, GgmlType::Q8_0),
        (Family::Qwen2, GgufQuant::Q4_0, GgmlType::Q4_0),
    ] {
        let runs = tempfile::tempdir().unwrap();
        let file = our_gguf(family, quant, runs.path());
        let bases = tempfile::tempdir().unwrap();
        let dir = gguf_base::import(&file, bases.path(), &Silent).unwrap();

        // Each quantized matrix is the file's blocks, which are our quantizer's blocks
        // of the original weights: byte for byte.
        let original: std::collections::HashMap<_, _> = tensors(fixture(family))
            .into_iter()
            .map(|(n, _, v)| (n, v))
            .collect();
        let folder = stored(&dir);
        let mut blocks = 0;
        for (name, (dtype, shape, bytes)) in &folder {
            let Some(weight) = name.strip_suffix(".ggml_type") else {
                continue;
            };
            assert_eq!(
                (*dtype, shape.as_slice()),
                (safetensors::Dtype::U8, &[1][..])
            );
            let got = GgmlType::from_id(bytes[0] as u32).unwrap();
            let (_, _, data) = &folder[weight];
            assert_eq!(data, &encode(&original[weight], got), "{family:?} {weight}");
            if weight.contains("_proj.") {
                assert_eq!(got, ty, "{family:?} {weight}");
                blocks += 1;
            }
        }
        let config = ModelConfig::load(&dir.join("config.json")).unwrap();
        assert_eq!(blocks, 7 * config.num_layers, "{family:?}");

        // Trained on as stored (QLoRA on the file's blocks); a run stopped at step 3
        // and resumed gives the uninterrupted run's losses bit for bit.
        let trainer = |runs: &Path| {
            Trainer::new(dir.to_str().unwrap())
                .batch_size(BatchSize::Fixed(2))
                .runs_dir(runs)
        };
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = logs.clone();
        let whole = trainer(runs.path())
            .on_event(move |e: Event| {
                if let Event::Log { message, .. } = e {
                    seen.lock().unwrap().push(message);
                }
            })
            .train(samples_dir().join("alpaca.jsonl"), 6)
            .unwrap();
        let want = format!("frozen linears held as the GGUF's own {} blocks", ty.name());
        assert!(
            logs.lock().unwrap().iter().any(|m| m.contains(&want)),
            "{:?}",
            logs.lock().unwrap()
        );
        let other = tempfile::tempdir().unwrap();
        let t = trainer(other.path());
        let cancel = t.cancel_token();
        let stopped = t
            .on_event(move |e: Event| {
                if let Event::Step { step: 3, .. } = e {
                    cancel.cancel();
                }
            })
            .train(samples_dir().join("alpaca.jsonl"), 6)
            .unwrap();
        assert_eq!(stopped.status, RunStatus::Stopped);
        let done = Trainer::resume(&stopped.run_dir, &Silent, &Default::default()).unwrap();
        assert_eq!(done.steps, 6);
        let bits =
            |run: &Path| -> Vec<u64> { common::losses(run).iter().map(|l| l.to_bits()).collect() };
        assert_eq!(bits(&done.run_dir), bits(&whole.run_dir), "{family:?}");

        // A merged GGUF is written in the base's own type unless told otherwise; a
        // Hugging Face base gets the caller's default.
        let merged = ExportOptions {
            format: ExportFormat::Gguf,
            ..Default::default()
        };
        let out = export(&whole.run_dir, &merged, &Silent).unwrap();
        assert!(out.ends_with(format!("gguf-{}", quant.name())), "{out:?}");
        assert_eq!(GgufQuant::Auto.resolve(&dir, GgufQuant::Q6K), quant);
        assert_eq!(
            GgufQuant::Auto.resolve(fixture(family), GgufQuant::Q6K),
            GgufQuant::Q6K
        );
    }
}
