//! `backprop doctor`: what this machine offers for training, and what to fix — the GPU
//! and driver, CPU threads, where runs and the Hugging Face cache live (and that they
//! are writable), Ollama, and the real demo model.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use backpropagate::gpu::{probe, GpuStatus};
use backpropagate::ollama::OllamaClient;

fn writable(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(".backprop-doctor");
    std::fs::write(&probe, b"ok").map_err(|e| e.to_string())?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}

pub fn run() -> Result<ExitCode> {
    let mut problems = 0;
    let mut line = |ok: bool, what: &str, detail: String| {
        if !ok {
            problems += 1;
        }
        println!("{} {what:<12} {detail}", if ok { "ok  " } else { "FIX " });
    };

    match probe() {
        GpuStatus::Found { gpus } => {
            for g in gpus {
                line(
                    true,
                    "gpu",
                    format!(
                        "cuda:{} {} · {} MB · driver {}",
                        g.index, g.name, g.total_mb, g.driver
                    ),
                );
            }
            if !cfg!(feature = "cuda") {
                line(false, "cuda build", "this build has no CUDA support: install the CUDA build of Backpropagate to train on the GPU".into());
            }
        }
        // Not a failure: CPU training works, just slower.
        GpuStatus::Absent { reason } => println!("info gpu          no NVIDIA GPU found: {reason}"),
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let bf16 = if backpropagate::model::blas_bf16::supported() {
        "AVX512-BF16: --precision bf16 trains ~1.5× faster on this CPU"
    } else {
        "no AVX512-BF16: f32 only on this CPU"
    };
    line(true, "cpu", format!("{threads} threads · {bf16}"));

    let runs = backpropagate::run::default_runs_dir();
    match writable(&runs) {
        Ok(()) => line(true, "runs", runs.display().to_string()),
        Err(e) => line(
            false,
            "runs",
            format!(
                "{}: {e} (set BACKPROP_HOME to a writable folder)",
                runs.display()
            ),
        ),
    }
    let cache = backpropagate::hub::cache_dir();
    match writable(&cache) {
        Ok(()) => line(true, "hf cache", cache.display().to_string()),
        Err(e) => line(
            false,
            "hf cache",
            format!(
                "{}: {e} (set HF_HUB_CACHE to a writable folder)",
                cache.display()
            ),
        ),
    }

    match OllamaClient::from_env() {
        Ok(client) => {
            let client = client.with_timeout(std::time::Duration::from_secs(3));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(client.check_version()) {
                Ok(v) => line(true, "ollama", format!("{v} at {}", client.host())),
                Err(e) => line(
                    false,
                    "ollama",
                    format!(
                        "{e}{}",
                        e.hint().map(|h| format!(" — {h}")).unwrap_or_default()
                    ),
                ),
            }
        }
        Err(e) => line(false, "ollama", e.to_string()),
    }

    println!();
    if problems == 0 {
        println!("Everything needed is in place.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{problems} thing(s) to fix above; training works without Ollama, pushing does not."
        );
        Ok(ExitCode::FAILURE)
    }
}
