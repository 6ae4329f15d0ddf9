//! Dataset pipeline throughput: 100k synthetic chat lines read, validated, rendered
//! through the chat template and tokenized, against Hugging Face transformers
//! (`apply_chat_template` + fast tokenizer) on the same file in the same run.
//!
//! `cargo bench -p backpropagate --bench data_pipeline` (set BACKPROP_PYTHON to a
//! Python with transformers to measure the peer; scripts/bench.sh does).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use backpropagate::data::{prepare, PrepareOptions};
use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};

const LINES: usize = 100_000;
const RUNS: usize = 3;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model");
    write_fixture_model(&model, &FixtureSpec::new(Family::Qwen2)).expect("fixture");
    let data = dir.path().join("synthetic.jsonl");
    write_synthetic(&data);

    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let p = prepare(&data, &model, &PrepareOptions::default()).expect("prepare");
        times.push(t.elapsed().as_secs_f64());
        tokens = p.stats.total_tokens;
    }
    let ours = median(&mut times);
    println!(
        "data pipeline (ours): {LINES} lines, {tokens} tokens, median {ours:.3}s of {RUNS} → {:.0} samples/s, {:.0} tokens/s",
        LINES as f64 / ours,
        tokens as f64 / ours
    );

    let Some(python) = std::env::var_os("BACKPROP_PYTHON") else {
        println!("peer skipped: set BACKPROP_PYTHON to a Python with transformers");
        return;
    };
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peers/hf_data_pipeline.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&data)
        .arg(&model)
        .arg(RUNS.to_string())
        .output()
        .expect("run the Python peer");
    if !out.status.success() {
        println!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    let peer: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the peer prints its median seconds");
    println!(
        "data pipeline (transformers): median {peer:.3}s → {:.0} samples/s",
        LINES as f64 / peer
    );
    println!(
        "ratio: ours is {:.1}x the samples/s of transformers",
        peer / ours
    );
    let report = format!(
        "# Data pipeline: backprop vs transformers\n\n{LINES} synthetic multi-turn chat lines \
         ({tokens} tokens) read, validated, rendered through the qwen2 fixture's chat template \
         and tokenized; medians of {RUNS} runs each, same file, same machine, same run.\n\n\
         | | median s | samples/s |\n| --- | ---: | ---: |\n\
         | ours (backprop) | {ours:.3} | {:.0} |\n\
         | transformers (`apply_chat_template` + fast tokenizer) | {peer:.3} | {:.0} |\n\
         | **ours / peer** | | **{:.2}×** |\n",
        LINES as f64 / ours,
        LINES as f64 / peer,
        peer / ours
    );
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("bench");
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(dir.join("data_pipeline.md"), report).is_ok()
    {
        println!("written to {}", dir.join("data_pipeline.md").display());
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Multi-turn conversations of varied length, deterministic.
fn write_synthetic(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let words = [
        "bicycle", "chain", "tyre", "pressure", "brake", "garden", "soil", "recipe", "oven",
        "budget", "river", "mountain", "gear", "lever", "spoke", "wheel", "saddle", "light",
    ];
    for i in 0..LINES {
        let sentence = |n: usize, salt: usize| {
            (0..n)
                .map(|k| words[(i * 7 + k * 13 + salt) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        let turns = 1 + i % 3;
        let mut msgs = Vec::new();
        for t in 0..turns {
            msgs.push(serde_json::json!({"role": "user", "content": format!("How do I fix the {}?", sentence(4 + i % 9, t))}));
            msgs.push(serde_json::json!({"role": "assistant", "content": format!("First, check the {}.", sentence(10 + i % 23, t + 5))}));
        }
        writeln!(f, "{}", serde_json::json!({ "messages": msgs })).expect("write");
    }
    f.flush().expect("flush");
}
