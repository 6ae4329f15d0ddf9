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
        err.contains("unknown GGUF quantization `q3_k_xl`; use auto, f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0"),
        "{err}"
    );
}

/// Reads every tensor of a GGUF file: a truncated or torn file fails here.
fn read_whole_gguf(path: &Path) -> usize {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for name in content.tensor_infos.keys() {
        content
            .tensor(&mut f, name, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", path.display()));
    }
    content.tensor_infos.len()
}

#[test]
fn exports_of_one_format_at_once_never_expose_a_truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let dir = Path::new(&run).join("exports/gguf-q8_0");
    let mut refused = 0;
    for _round in 0..3 {
        let children: Vec<_> = (0..2)
            .map(|_| {
                Command::new(bin())
                    .args(["export", &run, "--format", "gguf", "--quant", "q8_0"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for out in &outs {
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                // The only acceptable failure: refused at once, naming the holder.
                assert!(
                    err.contains("is in use by process") && err.contains("(export, started"),
                    "{err}"
                );
                refused += 1;
            }
        }
        assert!(outs.iter().any(|o| o.status.success()));
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(read_whole_gguf(&files[0]) > 0);
        let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "gguf-q8_0")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    eprintln!("{refused} of 6 exports refused as concurrent");
}
