//! `backprop push` and `backprop ollama` against the Ollama stand-in: the round trip as
//! a user types it, and the message when Ollama is not running.

use std::process::Command;

mod common;

use common::{bin, trained_run};
use ollama_standin::{Faults, StandIn};

fn backprop(host: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("OLLAMA_HOST", host)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn push_then_list_show_chat_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let server = StandIn::start(Faults::default()).unwrap();
    let host = server.url();

    let (ok, out, err) = backprop(
        &host,
        &[
            "push",
            &run,
            "--name",
            "cli-model:v1",
            "--quant",
            "q8_0",
            "--try-prompt",
            "Hello",
        ],
    );
    assert!(ok, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("cli-model:v1"));
    assert!(lines
        .next()
        .unwrap()
        .starts_with("stand-in reply from cli-model:v1"));
    assert!(err.contains("checked with /api/show"), "{err}");

    let (ok, out, _) = backprop(&host, &["ollama", "list"]);
    assert!(ok);
    assert!(out.starts_with("cli-model:v1"), "{out}");
    let (ok, out, _) = backprop(&host, &["ollama", "show", "cli-model:v1"]);
    assert!(ok);
    assert!(
        out.contains("<|im_start|>{{ .Role }}") && out.contains("\"<|im_end|>\""),
        "{out}"
    );
    let (ok, _, err) = backprop(&host, &["push", &run, "--name", "cli-model:v1"]);
    assert!(!ok);
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    let (ok, out, _) = backprop(&host, &["ollama", "rm", "cli-model:v1"]);
    assert!(ok, "{out}");
    let (ok, _, err) = backprop(&host, &["ollama", "rm", "cli-model:v1"]);
    assert!(!ok && err.contains("no model named"), "{err}");
}

#[test]
fn ollama_not_running_tells_how_to_start_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let (ok, _, err) = backprop(&host, &["push", &run, "--name", "m"]);
    assert!(!ok);
    assert!(
        err.contains("Ollama is not running at http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("fix: ") && err.contains("ollama serve"),
        "{err}"
    );
    let (ok, _, err) = backprop(&host, &["ollama", "status"]);
    assert!(!ok && err.contains("not running"), "{err}");
    let (ok, _, err) = backprop(&host, &["push", &run, "--name", "bad name"]);
    assert!(
        !ok && err.contains("not a valid Ollama model name"),
        "{err}"
    );
}
