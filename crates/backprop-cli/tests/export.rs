//! `backprop export` failure modes: a full disk (simulated with a file-size limit)
//! gives a clear error and leaves no partial export under the final name.

use std::path::Path;
use std::process::Command;

mod common;

use common::{bin, trained_run};

#[cfg(unix)]
#[test]
fn a_full_disk_leaves_no_partial_export() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    // 64 KiB file-size limit; SIGXFSZ ignored so writes fail with EFBIG like ENOSPC.
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' export '{run}' --format gguf --quant f32",
        bin()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".gguf") && err.contains("File too large"),
        "{err}"
    );
    let exports = Path::new(&run).join("exports");
    let left: Vec<_> = std::fs::read_dir(&exports)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // With room, the same export succeeds.
    let out = Command::new(bin())
        .args(["export", &run, "--format", "gguf", "--quant", "f32"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(exports.join("gguf-f32").is_dir());
}

#[test]
fn unknown_quant_names_say_what_exists() {
    let out = Command::new(bin())
        .args(["export", "any", "--quant", "q3_k_xl"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("unknown GGUF quantization `q3_k_xl`; use f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0"),
        "{err}"
    );
}
