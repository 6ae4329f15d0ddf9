//! `backprop train` end to end, including the guarantee that matters most: a run
//! killed with SIGKILL and resumed logs exactly the losses of an uninterrupted run; and
//! one writer per run when several processes start at once.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

use common::{bin, samples};

fn fixture(dir: &Path) -> PathBuf {
    common::fixture(dir, "llama")
}

fn train_args(model: &Path, runs: &Path) -> Vec<String> {
    let data = samples().join("alpaca.jsonl");
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "20",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "5e-3",
        "--checkpoint-every",
        "5",
        "--val-ratio",
        "0.05",
        "--eval-every",
        "5",
        "--lora-dropout",
        "0.1",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

fn only_run(runs: &Path) -> PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

/// (step, loss, lr, grad_norm, eval_loss) of one metrics line, as logged.
type Metric = (u64, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn metrics(run: &Path) -> Vec<Metric> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64(),
                v["lr"].as_f64(),
                v["grad_norm"].as_f64(),
                v["eval_loss"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn resume_after_kill_continues_identical_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(tmp.path());

    let straight = tmp.path().join("straight");
    let out = Command::new(bin())
        .args(train_args(&model, &straight))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = metrics(&only_run(&straight));
    assert_eq!(expected.iter().filter(|m| m.1.is_some()).count(), 20);

    let killed = tmp.path().join("killed");
    let mut child = Command::new(bin())
        .args(train_args(&model, &killed))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut killed_at = None;
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["type"] == "Step" && v["step"].as_u64().unwrap() >= 11 {
            child.kill().unwrap(); // SIGKILL on unix: no cleanup runs
            killed_at = v["step"].as_u64();
            break;
        }
    }
    child.wait().unwrap();
    let run = only_run(&killed);
    let partial = metrics(&run);
    let last_logged = partial.iter().map(|m| m.0).max().unwrap();
    assert!(
        killed_at.is_some() && last_logged < 20,
        "killed at {killed_at:?}, logged up to {last_logged}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        info["status"], "running",
        "the killed process never marked the run"
    );
    // Its lock file and holder note stay behind; the OS released the lock itself.
    assert!(run.join("run.lock").is_file() && run.join("run.lock.json").is_file());

    let out = Command::new(bin())
        .args(["train", "--resume", run.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = metrics(&run);
    // Bit-identical on CPU: same losses, learning rates, gradient norms and
    // validation losses for every step, including those after the kill.
    assert_eq!(resumed, expected);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "finished");
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn train_refuses_bad_options_with_the_field_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(tmp.path());
    let data = samples().join("alpaca.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = Command::new(bin())
            .args(&args)
            .env("BACKPROP_HOME", tmp.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--steps", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("steps must be at least 1"), "{err}");
    let (_, err) = run(&["--batch-size", "zero"]);
    assert!(
        err.contains("batch size must be `auto` or a whole number"),
        "{err}"
    );
    let (_, err) = run(&["--target-modules", "q_proj,qkv", "--steps", "1"]);
    assert!(err.contains("unknown LoRA target `qkv`"), "{err}");
    let (_, err) = run(&["--resume", "no-such-run"]);
    assert!(err.contains("no such run"), "{err}");
    assert!(
        !tmp.path().join("runs").exists(),
        "no run directory for refused starts"
    );
}

#[test]
fn progress_bar_run_prints_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(tmp.path());
    let data = samples().join("prompt_completion.jsonl");
    let out = Command::new(bin())
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "3",
        ])
        .env("BACKPROP_HOME", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Finished after 3 steps, final loss"),
        "{stdout}"
    );
    assert!(tmp.path().join("runs").is_dir());
}

/// The steps of every training-loss line of a run, in order.
fn loss_steps(run: &Path) -> Vec<u64> {
    metrics(run)
        .into_iter()
        .filter(|m| m.1.is_some())
        .map(|m| m.0)
        .collect()
}

#[test]
fn three_trains_started_at_once_get_three_folders_with_their_own_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(tmp.path());
    let runs = tmp.path().join("runs");
    let data = samples().join("alpaca.jsonl");
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(bin())
                .args(["train", "--model", model.to_str().unwrap()])
                .args(["--data", data.to_str().unwrap(), "--steps", "4"])
                .args(["--batch-size", "2", "--runs-dir", runs.to_str().unwrap()])
                .arg("--json")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    for dir in &dirs {
        assert_eq!(loss_steps(dir), [1, 2, 3, 4], "{}", dir.display());
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
        assert_eq!(info["id"], dir.file_name().unwrap().to_str().unwrap());
        assert_eq!(info["status"], "finished");
    }
}

#[test]
fn a_second_resume_of_a_run_is_refused_naming_the_process_and_the_first_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(tmp.path());
    let runs = tmp.path().join("runs");
    let mut args = train_args(&model, &runs);
    let steps = args.iter().position(|a| a == "--steps").unwrap() + 1;
    args[steps] = "40".into();
    // A run killed early, so that there is something left to resume.
    let mut child = Command::new(bin())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["type"] == "Step" && v["step"].as_u64().unwrap() >= 6 {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    let run = only_run(&runs);

    let resume = |stderr: Stdio| {
        Command::new(bin())
            .args(["train", "--resume", run.to_str().unwrap(), "--json"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap()
    };
    let mut first = resume(Stdio::null());
    let mut first_out = BufReader::new(first.stdout.take().unwrap()).lines();
    // Once the first resume trains, it holds the run.
    for line in first_out.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["type"] == "Step" {
            break;
        }
    }
    let t0 = std::time::Instant::now();
    let second = resume(Stdio::piped()).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "run {} is in use by process {} (resume, started ",
            run.display(),
            first.id()
        )),
        "{err}"
    );
    // Refused at once, not after loading the model and data.
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));

    for _ in first_out {}
    assert!(first.wait().unwrap().success());
    assert_eq!(loss_steps(&run), (1..=40).collect::<Vec<_>>());
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "finished");
}

/// `--dry-run` prints the plan the run would follow and writes nothing: as text, and
/// as one JSON object whose figures agree with the batch settings.
#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture(work.path());
    let runs = work.path().join("runs");
    let mut args = train_args(&model, &runs);
    args.retain(|a| a != "--json");
    args.extend(["--dry-run", "--gradient-checkpointing", "on"].map(String::from));
    let out = Command::new(bin()).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("plan (nothing written)"), "{text}");
    assert!(
        text.contains("20 × 4 rows (micro-batch 2 × accumulation 2)"),
        "{text}"
    );
    assert!(text.contains("2 of 2 layers recomputed"), "{text}");
    assert!(!runs.exists(), "a dry run created {}", runs.display());

    args.push("--json".into());
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("\"Plan\""))
        .expect("a Plan line")
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let p = &v["plan"];
    assert_eq!(p["effective_batch"], 4);
    assert_eq!(p["recomputed_layers"], 2);
    let rows = p["train_rows"].as_f64().unwrap();
    let epochs = p["epochs"].as_f64().unwrap();
    assert!((epochs - 20.0 * 4.0 / rows).abs() < 1e-9, "{p}");
    assert!(p["predicted_peak_bytes"].as_u64().unwrap() > 0);
    assert!(p["trainable_params"].as_u64().unwrap() > 0);
    assert!(!runs.exists());
}
