//! `backprop push` and `backprop ollama` against the Ollama stand-in: the round trip as
//! a user types it, the message when Ollama is not running, a stuck Ollama ending within
//! --timeout, and escape sequences from Ollama printed escaped.

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

fn no_raw_escapes(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "raw control bytes in {what}: {text:?}"
    );
}

#[test]
fn a_push_to_an_ollama_that_never_answers_the_upload_ends_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let hung = StandIn::start(Faults {
        hang_after_upload: true,
        ..Faults::default()
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let (ok, _, err) = backprop(
        &hung.url(),
        &[
            "push",
            &run,
            "--name",
            "m",
            "--quant",
            "q8_0",
            "--timeout",
            "2",
        ],
    );
    let elapsed = t0.elapsed();
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "Ollama at {} did not answer the upload of",
            hung.url()
        )) && err.contains("no reply) within 2 s"),
        "{err}"
    );
    assert!(err.contains("fix: "), "{err}");
    assert!(elapsed < std::time::Duration::from_secs(30), "{elapsed:?}");

    // Nothing holds the run afterwards: the same push to a working Ollama completes.
    let good = StandIn::start(Faults::default()).unwrap();
    let (ok, out, err) = backprop(
        &good.url(),
        &["push", &run, "--name", "m", "--quant", "q8_0"],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().next(), Some("m"));
}

#[test]
fn escape_sequences_in_ollama_replies_are_printed_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}reply";
    let server = StandIn::start(Faults {
        chat_reply: Some(hostile.into()),
        ..Faults::default()
    })
    .unwrap();
    let host = server.url();
    let template = tmp.path().join("template.txt");
    std::fs::write(&template, "\u{1b}[31m{{ .Prompt }}\u{1b}[0m").unwrap();

    let (ok, out, err) = backprop(
        &host,
        &[
            "push",
            &run,
            "--name",
            "esc",
            "--quant",
            "q8_0",
            "--template",
            template.to_str().unwrap(),
            "--system",
            "be \u{1b}[8mhidden",
            "--try-prompt",
            "hi",
        ],
    );
    assert!(ok, "{err}");
    no_raw_escapes("push stdout", &out);
    no_raw_escapes("push stderr", &err);
    assert!(out.contains("\\x1b[2J\\x1b]0;owned\\x07reply"), "{out}");

    let (ok, out, err) = backprop(&host, &["ollama", "chat", "esc", "hi"]);
    assert!(ok, "{err}");
    no_raw_escapes("chat", &out);
    assert!(out.contains("\\x1b[2J"), "{out}");

    let (ok, out, err) = backprop(&host, &["ollama", "show", "esc"]);
    assert!(ok, "{err}");
    no_raw_escapes("show", &out);
    assert!(
        out.contains("\\x1b[31m{{ .Prompt }}\\x1b[0m") && out.contains("be \\x1b[8mhidden"),
        "{out}"
    );

    // An error message from Ollama is printed escaped too.
    let failing = StandIn::start(Faults {
        create_error: Some("disk \u{1b}[2Jfull".into()),
        ..Faults::default()
    })
    .unwrap();
    let (ok, _, err) = backprop(
        &failing.url(),
        &["push", &run, "--name", "esc", "--quant", "q8_0"],
    );
    assert!(!ok);
    no_raw_escapes("error", &err);
    assert!(err.contains("disk \\x1b[2Jfull"), "{err}");
}

#[test]
fn an_endless_template_file_is_refused_without_reading_it_all() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let server = StandIn::start(Faults::default()).unwrap();
    let (ok, _, err) = backprop(
        &server.url(),
        &["push", &run, "--name", "m", "--template", "/dev/zero"],
    );
    assert!(!ok);
    assert!(
        err.contains("the template /dev/zero is over 1024 KiB"),
        "{err}"
    );
}
