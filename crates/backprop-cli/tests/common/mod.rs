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
