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
