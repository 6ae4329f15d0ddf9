//! Send to Ollama against the local stand-in: the round trip (train → GGUF → blob →
//! create → tags → show has our template and stops), blob reuse, and the faults users
//! hit (not running, server dying mid-upload, an error in the stream, a slow server, a
//! taken or invalid name, adapters refused), and hostile servers (endless replies and
//! status lines, an upload or create never answered): each ends within its cap or
//! timeout with an error naming host and phase. Every failure leaves the run intact.
//!
//! Every test that pushes a model runs against each of the stand-in's profiles (one per
//! Ollama release line: legacy ≤0.29, llama-server 0.30–0.33, no-adapters ≥0.34.1).
//! Tests of transport faults (timeouts, caps, a dead port) and of checks made before
//! any request run once: the eras do not differ there.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backpropagate::config::BatchSize;
use backpropagate::event::{Event, Silent};
use backpropagate::fixture::Family;
use backpropagate::ollama::{
    push_run, CreateRequest, OllamaClient, OllamaError, PushOptions, TemplateFamily,
};
use backpropagate::train::Trainer;
use backpropagate::Error;
use common::{fixture, samples_dir};
use ollama_standin::{Faults, Profile, StandIn};

/// Runs `test` once per Ollama era, saying which on stderr (shown when a test fails).
fn each_profile(mut test: impl FnMut(Profile)) {
    for profile in Profile::ALL {
        eprintln!("--- stand-in profile {}", profile.name());
        test(profile);
    }
}

fn era(profile: Profile) -> Faults {
    Faults {
        profile,
        ..Faults::default()
    }
}

fn trained_run(family: Family, runs: &Path) -> PathBuf {
    Trainer::new(fixture(family).to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs)
        .train(samples_dir().join("alpaca.jsonl"), 2)
        .unwrap()
        .run_dir
}

fn options(name: &str, server: &StandIn) -> PushOptions {
    let mut o = PushOptions::new(name);
    o.quant = "q8_0".parse().unwrap();
    o.host = Some(server.url());
    o
}

/// A sink that keeps every event, and the events it kept.
fn recorder() -> (Arc<Mutex<Vec<Event>>>, impl Fn(Event) + Send + Sync) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let kept = events.clone();
    (events, move |e: Event| kept.lock().unwrap().push(e))
}

/// A sink that keeps every log message, and the messages it kept.
fn log_recorder() -> (Arc<Mutex<Vec<String>>>, impl Fn(Event) + Send + Sync) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let kept = logs.clone();
    let sink = move |e: Event| {
        if let Event::Log { message, .. } = e {
            kept.lock().unwrap().push(message);
        }
    };
    (logs, sink)
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Every file of the run outside `exports/` with its size and content hash.
fn snapshot(run: &Path) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("exports") {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push((rel, backpropagate::run::sha256_file(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(run, run, &mut out);
    out.sort();
    out
}

fn no_partial_exports(run: &Path) {
    if let Ok(entries) = std::fs::read_dir(run.join("exports")) {
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".tmp"), "left a partial export {name}");
        }
    }
}

#[test]
fn push_round_trip_sets_template_and_stops_and_reuses_blobs() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    each_profile(|profile| round_trip(&run, profile));
}

fn round_trip(run: &Path, profile: Profile) {
    let run = run.to_path_buf();
    let server = StandIn::start(era(profile)).unwrap();
    let (events, sink) = recorder();
    let report = push_run(&run, &options("fixture-qwen2", &server), &sink).unwrap();
    assert_eq!(report.family, TemplateFamily::ChatMl);
    assert!(report.uploaded_bytes > 0);
    assert_eq!(report.ollama_version, profile.version());

    let events = events.lock().unwrap();
    let uploads: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress { stage, done, total } if stage == "upload" => Some((*done, *total)),
            _ => None,
        })
        .collect();
    let &(done, total) = uploads.last().expect("upload progress events");
    assert_eq!(done, total);
    assert_eq!(total, report.uploaded_bytes);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Log { message, .. } if message.contains("writing manifest"))));
    drop(events);

    let client = OllamaClient::new(&server.url()).unwrap();
    let tags = block(client.tags()).unwrap();
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].name, "fixture-qwen2:latest");
    let show = block(client.show("fixture-qwen2"))
        .unwrap()
        .expect("model exists");
    assert!(show
        .template
        .starts_with("{{- range .Messages }}<|im_start|>"));
    assert_eq!(show.system, "You are a helpful assistant.");
    assert_eq!(show.stops(), vec!["<|im_end|>", "<|im_start|>"]);
    // The context trained for, not Ollama's default.
    let trained = backpropagate::run::RunDir::open(&run)
        .unwrap()
        .config()
        .unwrap()
        .max_seq_len;
    assert!(
        show.parameters
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["num_ctx", &trained.to_string()]),
        "{}",
        show.parameters
    );
    // Ollama's model_info is the GGUF metadata our exporter wrote.
    assert_eq!(show.model_info["general.architecture"], "qwen2");
    assert_eq!(show.model_info["tokenizer.ggml.model"], "gpt2");

    // The same name again, in any case (Ollama's names are case-insensitive):
    // refused unless overwriting; the blob is not sent twice.
    let again = push_run(&run, &options("Fixture-QWEN2", &server), &Silent).unwrap_err();
    assert!(
        matches!(again, Error::Ollama(OllamaError::NameTaken { .. })),
        "{again}"
    );
    assert!(again.hint().unwrap().contains("--overwrite"));
    let mut o = options("fixture-qwen2", &server);
    o.overwrite = true;
    let second = push_run(&run, &o, &Silent).unwrap();
    assert_eq!(second.uploaded_bytes, 0);

    let reply = block(client.chat(
        "fixture-qwen2",
        &[backpropagate::ollama::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        16,
    ))
    .unwrap();
    assert_eq!(reply.role, "assistant");
    assert!(block(client.delete("fixture-qwen2")).unwrap());
    assert!(!block(client.delete("fixture-qwen2")).unwrap());
    assert!(block(client.tags()).unwrap().is_empty());
}

#[test]
fn every_family_gets_its_own_template() {
    let runs = tempfile::tempdir().unwrap();
    let families = [
        (Family::Llama, TemplateFamily::Llama3, "<|eot_id|>"),
        (Family::Mistral, TemplateFamily::Mistral, "[INST]"),
        (Family::Qwen3, TemplateFamily::ChatMl, "<|im_end|>"),
    ]
    .map(|(family, want, stop)| (family, want, stop, trained_run(family, runs.path())));
    each_profile(|profile| {
        let server = StandIn::start(era(profile)).unwrap();
        let client = OllamaClient::new(&server.url()).unwrap();
        for (family, want, stop, run) in &families {
            let (family, want, stop, run) = (*family, *want, *stop, run.as_path());
            let name = format!("fixture-{family:?}").to_lowercase();
            let report = push_run(run, &options(&name, &server), &Silent).unwrap();
            assert_eq!(report.family, want, "{family:?}");
            let show = block(client.show(&name)).unwrap().unwrap();
            assert!(
                show.stops().iter().any(|s| s == stop),
                "{family:?}: {:?}",
                show.stops()
            );
        }
    });
}

#[test]
fn ollama_not_running_is_said_plainly_and_nothing_is_exported() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let before = snapshot(&run);
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = PushOptions::new("m");
    o.host = Some(format!("127.0.0.1:{port}"));
    let err = push_run(&run, &o, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Ollama(OllamaError::NotRunning { .. })),
        "{err}"
    );
    let hint = err.hint().unwrap();
    assert!(
        hint.contains("ollama serve") && hint.contains("OLLAMA_HOST"),
        "{hint}"
    );
    assert_eq!(snapshot(&run), before);
    assert!(
        !run.join("exports").exists(),
        "no export before Ollama answers"
    );
}

#[test]
fn invalid_names_fail_before_any_work() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let mut o = PushOptions::new("my model!");
    o.host = Some("127.0.0.1:1".into());
    let err = push_run(&run, &o, &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Ollama(OllamaError::InvalidName { .. })),
        "{err}"
    );
}

#[test]
fn server_dying_mid_upload_then_coming_back_resumes_the_push() {
    each_profile(|profile| {
        let runs = tempfile::tempdir().unwrap();
        let run = trained_run(Family::Qwen2, runs.path());
        let before = snapshot(&run);
        let blobs = tempfile::tempdir().unwrap();
        let faults = Faults {
            die_after_upload_bytes: Some(64 * 1024),
            ..era(profile)
        };
        let server =
            StandIn::start_at("127.0.0.1:0".parse().unwrap(), blobs.path().into(), faults).unwrap();
        let addr = server.addr;
        let mut o = options("resumed", &server);
        o.upload_attempts = 1;
        let err = push_run(&run, &o, &Silent).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Ollama(OllamaError::Connection { .. } | OllamaError::NotRunning { .. })
            ),
            "{err}"
        );
        assert!(err.hint().is_some());
        assert_eq!(snapshot(&run), before);
        no_partial_exports(&run);
        // Wait for the server thread to finish dying before reusing its port.
        let t0 = Instant::now();
        while !server.is_dead() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(server.is_dead());

        // Ollama restarts; pushing again reuses the export and completes.
        let _back = StandIn::start_at(addr, blobs.path().into(), era(profile)).unwrap();
        let (events, sink) = recorder();
        let report = push_run(&run, &o, &sink).unwrap();
        assert!(report.uploaded_bytes > 64 * 1024);
        assert!(events.lock().unwrap().iter().any(
            |e| matches!(e, Event::Log { message, .. } if message.starts_with("reusing the export"))
        ));
    });
}

#[test]
fn an_error_line_in_the_create_stream_is_reported() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let before = snapshot(&run);
    each_profile(|profile| {
        let server = StandIn::start(Faults {
            create_error: Some("write manifest: no space left on device".into()),
            ..era(profile)
        })
        .unwrap();
        let err = push_run(&run, &options("m", &server), &Silent).unwrap_err();
        match &err {
            Error::Ollama(OllamaError::Stream { message }) => {
                assert!(message.contains("no space left"))
            }
            other => panic!("{other}"),
        }
        // The hint says how much room Ollama needs, and where.
        let hint = err.hint().unwrap();
        assert!(
            hint.contains("twice") && hint.contains("OLLAMA_MODELS"),
            "{hint}"
        );
        assert_eq!(snapshot(&run), before);
        no_partial_exports(&run);
    });
}

/// Ollama parses a TEMPLATE as a Go template at create: a broken `--template` fails
/// the push with Go's message and a hint that names the option.
#[test]
fn a_broken_go_template_is_refused_at_create_with_a_hint() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    each_profile(|profile| {
        let server = StandIn::start(era(profile)).unwrap();
        let mut o = options("broken-template", &server);
        o.template = Some("{{ range .Messages }}{{ .Content }}".into());
        let err = push_run(&run, &o, &Silent).unwrap_err();
        assert!(
            err.to_string().contains("template: :1: unexpected EOF"),
            "{err}"
        );
        let hint = err.hint().unwrap();
        assert!(hint.contains("--template"), "{hint}");
        let client = OllamaClient::new(&server.url()).unwrap();
        assert!(block(client.show("broken-template")).unwrap().is_none());
    });
}

#[test]
fn a_slow_server_times_out_with_a_clear_error() {
    let server = StandIn::start(Faults {
        delay: Some(Duration::from_secs(5)),
        ..Faults::default()
    })
    .unwrap();
    let client = OllamaClient::new(&server.url())
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let err = block(client.version()).unwrap_err();
    assert!(matches!(err, OllamaError::Timeout { .. }), "{err}");
    assert!(err.hint().unwrap().contains("busy"));
}

#[test]
fn unknown_digests_and_corrupt_uploads_are_refused_like_ollama_does() {
    let server = StandIn::start(Faults::default()).unwrap();
    let client = OllamaClient::new(&server.url()).unwrap();
    let mut req = CreateRequest {
        model: "m".into(),
        stream: true,
        ..Default::default()
    };
    req.files
        .insert("model.gguf".into(), format!("sha256:{}", "ab".repeat(32)));
    // A blob Ollama does not have fails while parsing: an error line after HTTP 200.
    let err = block(client.create(&req, |_| {})).unwrap_err();
    match err {
        OllamaError::Stream { message } => {
            assert!(message.contains("no such file or directory"), "{message}")
        }
        other => panic!("{other}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.gguf");
    std::fs::write(&file, b"GGUF not really").unwrap();
    let wrong = format!("sha256:{}", "cd".repeat(32));
    let err = block(client.upload_blob(&file, &wrong, |_, _| {})).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(!block(client.has_blob(&wrong)).unwrap());
}

/// `--as-adapter` per era: 0.34.1+ refuses the adapter at create, with advice; earlier
/// servers take it, and legacy ones then fail to load a qwen3 adapter (their Go
/// engine has no LoRA), which the push reports with advice instead of a success.
#[test]
fn adapters_per_era_accepted_refused_or_failing_at_load_with_advice() {
    let runs = tempfile::tempdir().unwrap();
    let qwen2 = trained_run(Family::Qwen2, runs.path());
    let qwen3 = trained_run(Family::Qwen3, runs.path());
    each_profile(|profile| {
        let server = StandIn::start(era(profile)).unwrap();
        let mut o = options("with-adapter", &server);
        o.as_adapter = true;
        let (logs, sink) = log_recorder();
        let result = push_run(&qwen2, &o, &sink);
        if profile.accepts_adapters() {
            let report = result.unwrap();
            assert_eq!(report.files.len(), 2, "base and adapter");
            let client = OllamaClient::new(&server.url()).unwrap();
            let show = block(client.show("with-adapter")).unwrap().unwrap();
            assert!(show.modelfile.contains("ADAPTER "), "{}", show.modelfile);
        } else {
            let err = result.unwrap_err();
            assert!(
                err.to_string()
                    .contains("LoRA adapters are no longer supported"),
                "{err}"
            );
            assert!(logs
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.contains("without --as-adapter")));
        }

        let mut o = options("qwen3-adapter", &server);
        o.as_adapter = true;
        let result = push_run(&qwen3, &o, &Silent);
        match profile {
            Profile::Legacy => {
                let text = result.unwrap_err().to_string();
                assert!(
                    text.contains("cannot load it")
                        && text.contains("loras are not yet implemented")
                        && text.contains("without --as-adapter"),
                    "{text}"
                );
            }
            Profile::LlamaServer => {
                result.unwrap();
            }
            Profile::NoAdapters => {
                assert!(result.is_err());
            }
        }
    });
}

#[test]
fn an_old_ollama_is_refused_before_any_work() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let server = StandIn::start(Faults {
        version: Some("0.5.4".into()),
        ..Faults::default()
    })
    .unwrap();
    let err = push_run(&run, &options("m", &server), &Silent).unwrap_err();
    assert!(
        matches!(err, Error::Ollama(OllamaError::TooOld { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("0.5.4") && err.to_string().contains("0.5.7"));
    assert!(!run.join("exports").exists());

    // qwen3 needs 0.6.6: a newer-than-minimum Ollama that predates it is refused too.
    let run = trained_run(Family::Qwen3, runs.path());
    let server = StandIn::start(Faults {
        version: Some("0.6.5".into()),
        ..Faults::default()
    })
    .unwrap();
    let err = push_run(&run, &options("m", &server), &Silent).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("qwen3") && text.contains("0.6.6"), "{text}");
    assert!(!run.join("exports").exists());
}

#[test]
fn the_library_call_pushes_a_summary() {
    let runs = tempfile::tempdir().unwrap();
    let server = StandIn::start(Faults::default()).unwrap();
    let summary = Trainer::new(fixture(Family::Llama).to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs.path())
        .train(samples_dir().join("alpaca.jsonl"), 1)
        .unwrap();
    // The library reads OLLAMA_HOST like Ollama's own CLI; this test binary sets it
    // only here, and no other test in it reads the variable.
    std::env::set_var("OLLAMA_HOST", server.url());
    let report = summary.push_to_ollama("from-library").unwrap();
    assert_eq!(report.family, TemplateFamily::Llama3);
    assert_eq!(report.host, server.url());
}

/// Peak resident memory of this test process, in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// An error about a hostile server says which server and which call, in a sentence,
/// not in a pasted body.
fn names_host_and_phase(err: &OllamaError, server: &StandIn, phase: &str) {
    let text = err.to_string();
    assert!(text.contains(&server.url()), "no host in: {text}");
    assert!(text.contains(phase), "`{phase}` not in: {text}");
    assert!(text.len() < 400, "{} bytes of message", text.len());
    assert!(err.hint().is_some());
}

#[test]
fn endless_replies_are_cut_at_the_cap_with_memory_bounded() {
    let server = StandIn::start(Faults {
        endless_replies: true,
        ..Faults::default()
    })
    .unwrap();
    // A timeout long enough that only the byte cap can end these calls quickly.
    let client = OllamaClient::new(&server.url())
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let t0 = Instant::now();
    let err = block(client.tags()).unwrap_err();
    assert!(matches!(err, OllamaError::TooLarge { .. }), "{err}");
    names_host_and_phase(&err, &server, "listing models: a reply over 32 MiB");
    let err = block(client.show("m")).unwrap_err();
    assert!(matches!(err, OllamaError::TooLarge { .. }), "{err}");
    names_host_and_phase(&err, &server, "showing the model");
    let hello = [backpropagate::ollama::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    let err = block(client.chat("m", &hello, 8)).unwrap_err();
    assert!(matches!(err, OllamaError::TooLarge { .. }), "{err}");
    names_host_and_phase(&err, &server, "the chat request");
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    // Three capped reads of 32 MiB; reading to the end would have needed gigabytes.
    if let Some(peak) = peak_rss_mib() {
        eprintln!("three endless replies refused in {elapsed:?}, peak RSS {peak} MiB");
        assert!(peak < 512, "peak RSS {peak} MiB");
    }
}

#[test]
fn an_endless_status_line_is_refused_past_one_mib() {
    let server = StandIn::start(Faults {
        endless_status_line: true,
        ..Faults::default()
    })
    .unwrap();
    let client = OllamaClient::new(&server.url())
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let t0 = Instant::now();
    let err = block(client.create(&CreateRequest::default(), |_| {})).unwrap_err();
    assert!(matches!(err, OllamaError::TooLarge { .. }), "{err}");
    names_host_and_phase(&err, &server, "a status line over 1 MiB");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn a_status_stream_that_never_succeeds_ends_at_the_total_deadline() {
    let server = StandIn::start(Faults {
        endless_status: true,
        ..Faults::default()
    })
    .unwrap();
    // Lines come every 20 ms, well within the per-line timeout; only the total ends it.
    let timeout = Duration::from_millis(300);
    let client = OllamaClient::new(&server.url())
        .unwrap()
        .with_timeout(timeout);
    let mut lines = 0;
    let t0 = Instant::now();
    let err = block(client.create(&CreateRequest::default(), |_| lines += 1)).unwrap_err();
    let elapsed = t0.elapsed();
    assert!(matches!(err, OllamaError::Timeout { .. }), "{err}");
    names_host_and_phase(&err, &server, "no `success`");
    let total = timeout * backpropagate::ollama::STREAM_TIMEOUTS;
    assert!(
        elapsed >= total && elapsed < total + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(lines > 20, "{lines} status lines seen");
}

#[test]
fn a_stalled_upload_times_out_saying_how_far_it_got() {
    let server = StandIn::start(Faults {
        hang_upload: true,
        ..Faults::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.gguf");
    // Bigger than every socket buffer between us and the server, so sending stalls.
    std::fs::write(&file, vec![7u8; 64 << 20]).unwrap();
    let client = OllamaClient::new(&server.url())
        .unwrap()
        .with_timeout(Duration::from_secs(1));
    let t0 = Instant::now();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let err = block(client.upload_blob(&file, &digest, |_, _| {})).unwrap_err();
    let elapsed = t0.elapsed();
    assert!(matches!(err, OllamaError::Timeout { .. }), "{err}");
    names_host_and_phase(&err, &server, "the upload of big.gguf (stuck after ");
    assert!(err.to_string().contains("of 64.0 MiB)"), "{err}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn push_times_out_when_ollama_takes_the_upload_and_never_answers() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let before = snapshot(&run);
    let blobs = tempfile::tempdir().unwrap();
    let hung = StandIn::start_at(
        "127.0.0.1:0".parse().unwrap(),
        blobs.path().into(),
        Faults {
            hang_after_upload: true,
            ..Faults::default()
        },
    )
    .unwrap();
    let mut o = options("stuck", &hung);
    o.timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = push_run(&run, &o, &Silent).unwrap_err();
    let elapsed = t0.elapsed();
    let Error::Ollama(e @ OllamaError::Timeout { .. }) = &err else {
        panic!("{err}")
    };
    names_host_and_phase(e, &hung, "the upload of ");
    assert!(err.to_string().contains("sent; no reply)"), "{err}");
    // Export and hashing of the tiny fixture take well under a second; the timeout
    // is not multiplied by retries.
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    assert_eq!(snapshot(&run), before);
    no_partial_exports(&run);

    // The run is not held by the failed push: the next one completes.
    let good = StandIn::start(Faults::default()).unwrap();
    let report = push_run(&run, &options("stuck", &good), &Silent).unwrap();
    assert!(report.uploaded_bytes > 0);
}

#[test]
fn push_times_out_when_ollama_never_answers_create() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let before = snapshot(&run);
    let server = StandIn::start(Faults {
        hang_create: true,
        ..Faults::default()
    })
    .unwrap();
    let mut o = options("never-created", &server);
    o.timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = push_run(&run, &o, &Silent).unwrap_err();
    let Error::Ollama(e @ OllamaError::Timeout { .. }) = &err else {
        panic!("{err}")
    };
    names_host_and_phase(e, &server, "creating the model (no reply to the request)");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert_eq!(snapshot(&run), before);
    no_partial_exports(&run);
}

#[test]
fn a_hung_blob_check_or_check_after_creating_times_out_naming_the_phase() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let before = snapshot(&run);
    let blob_check = Faults {
        hang_blob_check: true,
        ..Faults::default()
    };
    let show_after = Faults {
        hang_show_of_existing: true,
        ..Faults::default()
    };
    for (faults, phase) in [
        (blob_check, "did not answer the blob check within 1 s"),
        (show_after, "the check after creating `m`, which exists now"),
    ] {
        let server = StandIn::start(faults).unwrap();
        let mut o = options("m", &server);
        o.timeout = Duration::from_secs(1);
        let t0 = Instant::now();
        let err = push_run(&run, &o, &Silent).unwrap_err();
        let Error::Ollama(e @ OllamaError::Timeout { .. }) = &err else {
            panic!("{err}")
        };
        names_host_and_phase(e, &server, phase);
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
        assert_eq!(snapshot(&run), before);
    }
}

#[test]
fn a_cancelled_push_stops_at_once_while_ollama_hangs() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let server = StandIn::start(Faults {
        hang_after_upload: true,
        ..Faults::default()
    })
    .unwrap();
    // The timeout alone would take a minute; the stop button must not.
    let mut o = options("m", &server);
    o.timeout = Duration::from_secs(60);
    let cancel = backpropagate::train::CancelToken::default();
    o.cancel = Some(cancel.clone());
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        cancel.cancel();
        Instant::now()
    });
    let err = push_run(&run, &o, &Silent).unwrap_err();
    let stopped_after = stopper.join().unwrap().elapsed();
    assert!(
        matches!(&err, Error::Ollama(OllamaError::Cancelled { what }) if what == "the upload"),
        "{err}"
    );
    assert!(stopped_after < Duration::from_secs(1), "{stopped_after:?}");
    no_partial_exports(&run);
}

#[test]
fn a_push_of_a_run_another_job_is_writing_is_refused_before_any_upload() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    let server = StandIn::start(Faults::default()).unwrap();
    let held = backpropagate::run::RunLock::acquire(&run, "train").unwrap();
    let before = snapshot(&run);
    let err = push_run(&run, &options("locked", &server), &Silent).unwrap_err();
    assert!(matches!(err, Error::RunInUse { .. }), "{err}");
    assert!(err.to_string().contains("in use by"), "{err}");
    let uploaded = std::fs::read_dir(server.blobs_dir()).map_or(0, |d| d.count());
    assert_eq!(
        uploaded, 0,
        "nothing may be uploaded while the run is in use"
    );
    assert!(
        !run.join("exports").exists(),
        "no export while the run is in use"
    );
    assert_eq!(snapshot(&run), before);
    // Once the other job lets go, the same push goes through.
    drop(held);
    push_run(&run, &options("locked", &server), &Silent).unwrap();
}

/// Ollama 0.30+ validates the GGUF before creating: hundreds of identical status lines
/// with byte counts, then a silent hash longer than one timeout. The push logs the
/// status once, turns the counts into create progress, and waits the hash out. A
/// legacy server sends no counted lines, and the push needs none.
#[test]
fn validation_lines_fold_into_one_log_and_progress_and_a_silent_hash_is_waited_out() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    each_profile(|profile| {
        let server = StandIn::start(Faults {
            silent_hash: Some(Duration::from_millis(2500)),
            ..era(profile)
        })
        .unwrap();
        let mut o = options("validated", &server);
        o.timeout = Duration::from_secs(1);
        let (events, sink) = recorder();
        push_run(&run, &o, &sink).unwrap();
        let events = events.lock().unwrap();
        let said = |text: &str| {
            events
                .iter()
                .filter(|e| matches!(e, Event::Log { message, .. } if message.contains(text)))
                .count()
        };
        let lines = if profile.llama_server() {
            ollama_standin::VALIDATING_LINES as usize
        } else {
            0
        };
        assert_eq!(said("validating GGUF model"), lines.min(1));
        assert_eq!(said("verifying conversion"), lines.min(1));
        let progress: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Progress { stage, done, total } if stage == "create" => {
                    Some((*done, *total))
                }
                _ => None,
            })
            .collect();
        let counted: Vec<_> = progress.iter().filter(|(_, t)| *t > 1).collect();
        assert_eq!(counted.len(), lines, "one progress event per counted line");
        assert!(counted.windows(2).all(|w| w[0].0 <= w[1].0));
        if let Some(&&(done, total)) = counted.last() {
            assert_eq!(done, total);
        }
        assert_eq!(progress.last(), Some(&(1, 1)), "create ends complete");
    });
}

/// A create whose stream goes quiet after the model was written: the timeout is
/// checked against `/api/show`, and the model that is there counts as created.
#[test]
fn a_create_that_goes_silent_after_writing_the_model_still_succeeds() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    each_profile(|profile| {
        let server = StandIn::start(Faults {
            create_goes_silent: true,
            ..era(profile)
        })
        .unwrap();
        let mut o = options("quiet", &server);
        o.timeout = Duration::from_millis(300);
        let (logs, sink) = log_recorder();
        let report = push_run(&run, &o, &sink).unwrap();
        assert_eq!(report.name, "quiet");
        assert!(logs
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("stopped reporting") && m.contains("the model is there")));
    });
}

/// Ollama 0.30+ renders a model whose chat template mentions thinking or tools with
/// that Jinja and `/api/show` returns it: the push counts that as success and says so
/// once; a custom `--template` is warned to apply only with OLLAMA_GO_TEMPLATE=1. A
/// legacy server uses our Go template, and the push checks that instead.
#[test]
fn a_server_that_renders_the_models_own_template_is_a_success_said_once() {
    // A Qwen3 fixture with a thinking-aware chat template, as Qwen3's own.
    let model = tempfile::tempdir().unwrap();
    backpropagate::fixture::write_fixture_model(
        model.path(),
        &backpropagate::fixture::FixtureSpec::new(Family::Qwen3),
    )
    .unwrap();
    let config_path = model.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let runs = tempfile::tempdir().unwrap();
    let run = Trainer::new(model.path().to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs.path())
        .train(samples_dir().join("alpaca.jsonl"), 2)
        .unwrap()
        .run_dir;
    each_profile(|profile| {
        let server = StandIn::start(era(profile)).unwrap();
        let native = profile.llama_server();
        let (logs, sink) = log_recorder();
        push_run(&run, &options("thinker", &server), &sink).unwrap();
        let count = |logs: &[String], text: &str| logs.iter().filter(|m| m.contains(text)).count();
        {
            let logs = logs.lock().unwrap();
            assert_eq!(
                count(&logs, "with the model's own chat template"),
                usize::from(native),
                "{logs:?}"
            );
            assert_eq!(count(&logs, "differs"), 0, "{logs:?}");
        }
        let client = OllamaClient::new(&server.url()).unwrap();
        let show = block(client.show("thinker")).unwrap().unwrap();
        if native {
            assert!(show.template.contains("<think>") && show.template.contains("{%"));
        } else {
            assert!(show.template.contains("<|im_start|>") && !show.template.contains("{%"));
        }
        // Ollama's model_info: no chat template, no name, long arrays emptied.
        assert!(show.model_info.get("tokenizer.chat_template").is_none());
        assert!(show.model_info.get("general.name").is_none());
        assert_eq!(
            show.model_info["tokenizer.ggml.tokens"],
            serde_json::json!([])
        );

        logs.lock().unwrap().clear();
        let mut o = options("thinker2", &server);
        o.template = Some("{{ .Prompt }}".into());
        push_run(&run, &o, &sink).unwrap();
        let logs = logs.lock().unwrap();
        assert_eq!(
            count(&logs, "OLLAMA_GO_TEMPLATE=1"),
            2 * usize::from(native),
            "{logs:?}"
        );
    });
}

#[test]
fn only_0_30_and_later_prefer_the_models_own_template() {
    use backpropagate::ollama::prefers_own_template;
    let thinking = "{% if '<think>' in content %}{% endif %}";
    assert!(prefers_own_template("0.30.0", thinking));
    assert!(prefers_own_template("0.33.2", "{% if tools %}{% endif %}"));
    assert!(!prefers_own_template("0.29.9", thinking));
    assert!(!prefers_own_template("0.33.0", "{{ messages }}"));
}

/// A model Ollama creates but cannot load fails the push with Ollama's reason; one
/// that loads says so.
#[test]
fn a_created_model_that_does_not_load_fails_the_push_with_the_reason() {
    let runs = tempfile::tempdir().unwrap();
    let run = trained_run(Family::Qwen2, runs.path());
    each_profile(|profile| {
        let server = StandIn::start(Faults {
            load_error: Some("loras are not yet implemented".into()),
            ..era(profile)
        })
        .unwrap();
        let err = push_run(&run, &options("unloadable", &server), &Silent).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot load it") && text.contains("loras are not yet implemented"),
            "{text}"
        );
        let good = StandIn::start(era(profile)).unwrap();
        let (logs, sink) = log_recorder();
        push_run(&run, &options("loads", &good), &sink).unwrap();
        assert!(logs
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("loaded:")));
    });
}

/// A run on a GGUF file is an adapter for that very file: `--as-adapter` sends the
/// original file as the base (skipped by a server that has the blob, as one that
/// pulled the model would), never a base re-exported from the run's folder.
#[test]
fn a_gguf_based_run_pushes_its_adapter_on_the_original_file() {
    use backpropagate::export::{export, ExportFormat, ExportOptions, GgufQuant};
    let runs = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("BACKPROP_HOME", home.path());
    let fixture_run = trained_run(Family::Qwen2, runs.path());
    let base_export = ExportOptions {
        format: ExportFormat::GgufBase,
        quant: GgufQuant::Q8_0,
        ..Default::default()
    };
    let out = export(&fixture_run, &base_export, &Silent).unwrap();
    let original = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap();
    let run = Trainer::new(original.to_str().unwrap())
        .batch_size(BatchSize::Fixed(2))
        .runs_dir(runs.path())
        .train(samples_dir().join("alpaca.jsonl"), 2)
        .unwrap()
        .run_dir;

    let server = StandIn::start(era(Profile::Legacy)).unwrap();
    let mut o = options("on-the-file", &server);
    o.as_adapter = true;
    let (logs, sink) = log_recorder();
    let report = push_run(&run, &o, &sink).unwrap();
    assert_eq!(report.files[0], original, "{:?}", report.files);
    let digest = backpropagate::run::sha256_file(&original).unwrap();
    assert!(server
        .blobs_dir()
        .join(format!("sha256-{digest}"))
        .is_file());
    assert!(logs
        .lock()
        .unwrap()
        .iter()
        .any(|m| m.contains("the adapter goes on the run's own base file")));
    let exported: Vec<String> = std::fs::read_dir(run.join("exports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !exported.iter().any(|n| n.starts_with("gguf-base")),
        "{exported:?}"
    );
    let client = OllamaClient::new(&server.url()).unwrap();
    let show = block(client.show("on-the-file")).unwrap().unwrap();
    assert!(show.modelfile.contains("ADAPTER "), "{}", show.modelfile);

    // A second push finds the base on the server: only the adapter travels.
    let mut again = options("on-the-file-2", &server);
    again.as_adapter = true;
    let second = push_run(&run, &again, &Silent).unwrap();
    let base_bytes = std::fs::metadata(&original).unwrap().len();
    assert!(
        second.uploaded_bytes < base_bytes,
        "{}",
        second.uploaded_bytes
    );
}
