//! Shared test fixtures: one tiny model folder per family, built once per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use backpropagate::fixture::{write_fixture_model, Family, FixtureSpec};

pub fn fixture(family: Family) -> &'static Path {
    static LLAMA: OnceLock<tempfile::TempDir> = OnceLock::new();
    static QWEN2: OnceLock<tempfile::TempDir> = OnceLock::new();
    let cell = match family {
        Family::Llama => &LLAMA,
        Family::Qwen2 => &QWEN2,
    };
    cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_fixture_model(dir.path(), &FixtureSpec::new(family)).unwrap();
        dir
    })
    .path()
}

pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples")
}
