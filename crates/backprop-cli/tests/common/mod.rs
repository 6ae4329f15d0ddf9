//! Helpers shared by the CLI's end-to-end tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_backprop")
}

pub fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples")
}

/// Writes a tiny fixture model of `family` into `dir/model`.
pub fn fixture(dir: &Path, family: &str) -> PathBuf {
    let model = dir.join("model");
    let ok = Command::new(bin())
        .args(["fixture", model.to_str().unwrap(), "--family", family])
        .status()
        .unwrap();
    assert!(ok.success());
    model
}

/// Trains the qwen2 fixture for two steps in `dir/runs` and returns the run folder.
pub fn trained_run(dir: &Path) -> String {
    let model = fixture(dir, "qwen2");
    let runs = dir.join("runs");
    let data = samples().join("alpaca.jsonl");
    let out = Command::new(bin())
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "2",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    run.to_str().unwrap().to_string()
}
