//! "Send to Ollama": export the run as GGUF (or reuse a fresh export), upload the blob
//! unless Ollama has it, create the model with an explicit template, stops and system
//! prompt, then read it back with `/api/show` to prove Ollama will chat with it right.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::{
    ollama_template, parse_version, validate_name, CreateRequest, OllamaClient, OllamaError,
    TemplateFamily,
};
use crate::cancel::CancelToken;
use crate::data::ChatTemplate;
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::export::{self, ExportFormat, ExportOptions, GgufQuant};
use crate::run::{RunDir, RunLock};

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Ollama model name (`my-model`, `me/my-model:v2`).
    pub name: String,
    /// Weight type of the merged GGUF (q4_k_m unless told otherwise).
    pub quant: GgufQuant,
    /// Push base + GGUF LoRA as an Ollama ADAPTER instead of one merged file.
    pub as_adapter: bool,
    /// Replace an existing model of that name.
    pub overwrite: bool,
    /// Replace the system prompt found in the chat template.
    pub system: Option<String>,
    /// A Go template to use instead of the derived one.
    pub template: Option<String>,
    /// OLLAMA_HOST-style address; `None` reads OLLAMA_HOST.
    pub host: Option<String>,
    pub timeout: Duration,
    /// Upload attempts before giving up (each starts by asking whether the blob arrived).
    pub upload_attempts: u32,
    /// Stops the push between or during its network phases (a job's stop button).
    pub cancel: Option<CancelToken>,
}

impl PushOptions {
    pub fn new(name: impl Into<String>) -> Self {
        PushOptions {
            name: name.into(),
            quant: GgufQuant::Auto,
            as_adapter: false,
            overwrite: false,
            system: None,
            template: None,
            host: None,
            timeout: Duration::from_secs(60),
            upload_attempts: 3,
            cancel: None,
        }
    }

    pub fn client(&self) -> std::result::Result<OllamaClient, OllamaError> {
        let client = match &self.host {
            Some(h) => OllamaClient::new(h)?,
            None => OllamaClient::from_env()?,
        };
        Ok(client.with_timeout(self.timeout))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub name: String,
    pub host: String,
    pub ollama_version: String,
    pub files: Vec<PathBuf>,
    /// Bytes sent; 0 when Ollama already had every blob.
    pub uploaded_bytes: u64,
    pub family: TemplateFamily,
    pub stop: Vec<String>,
}

/// Pushes the run in `run_dir` to Ollama. Blocking: it runs its own small tokio
/// runtime, so call it from a worker thread, not from inside async code.
pub fn push_run(run_dir: &Path, options: &PushOptions, sink: &dyn EventSink) -> Result<PushReport> {
    validate_name(&options.name)?;
    // A folder that is not a run gets no lock file (taking the lock cleans temp files).
    let run = RunDir::open(run_dir)?;
    // One writer per run: the exports a push makes must not race a training or export
    // job on the same run, and the run must not change under the upload.
    let lock = RunLock::acquire(run_dir, "push")?;
    let info = run.info()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(run_dir, e))?;
    let client = options.client()?;

    crate::gguf_base::ensure_base(&info.model_dir, &run.config()?.model, sink)?;
    // Cheap checks first: a stopped Ollama or a taken name must not cost an export.
    let cancel = options.cancel.as_ref();
    let arch = crate::model::ModelConfig::load(&info.model_dir.join("config.json"))?.arch;
    let need = super::client::min_version_for(arch);
    let what = format!("a {} model", arch.as_str());
    let version = net(
        &runtime,
        cancel,
        "the version check",
        client.check_version_for(need, &what),
    )?;
    sink.emit(log(format!("Ollama {version} at {}", client.host())));
    if !options.overwrite
        && net(
            &runtime,
            cancel,
            "the name check",
            client.show(&options.name),
        )?
        .is_some()
    {
        return Err(OllamaError::NameTaken {
            name: options.name.clone(),
        }
        .into());
    }

    let template = derive_template(&info.model_dir, options, sink)?;
    let jinja = ChatTemplate::from_model_dir(&info.model_dir)?
        .text()
        .to_string();
    let native = prefers_own_template(&version, &jinja);
    if native && options.template.is_some() {
        sink.emit(Event::Log {
            level: LogLevel::Warn,
            message: format!(
                "Ollama {version} renders a model whose chat template mentions tools or thinking with that template itself and ignores TEMPLATE: your --template applies only where the server runs with OLLAMA_GO_TEMPLATE=1"
            ),
        });
    }

    // `auto`: a GGUF base's own type, else q4_k_m (small and good for chatting).
    let quant = options.quant.resolve(&info.model_dir, GgufQuant::Q4KM);
    let (files, adapters) = if options.as_adapter {
        // A run on a GGUF file or an Ollama model is an adapter for that very file:
        // it is sent as it is (Ollama skips the upload when it has the blob already,
        // as it does for a model pulled into it), not re-exported from its weights.
        let base = match crate::gguf_base::source_file(&run.config()?.model)? {
            Some(original) => {
                sink.emit(log(format!(
                    "the adapter goes on the run's own base file {}",
                    original.display()
                )));
                original
            }
            None => gguf_export(&lock, ExportFormat::GgufBase, quant, sink)?,
        };
        let lora = gguf_export(&lock, ExportFormat::GgufLora, GgufQuant::F16, sink)?;
        (vec![base], vec![lora])
    } else {
        (
            vec![gguf_export(&lock, ExportFormat::Gguf, quant, sink)?],
            vec![],
        )
    };

    let mut request = CreateRequest {
        model: options.name.clone(),
        template: Some(template.template.clone()),
        system: options.system.clone().or(template.system.clone()),
        stream: true,
        ..Default::default()
    };
    request.parameters.insert(
        "stop".into(),
        Value::Array(template.stop.iter().cloned().map(Value::String).collect()),
    );
    // The context the model was trained for, not Ollama's default (2048 or 4096).
    request.parameters.insert(
        "num_ctx".into(),
        Value::from(run.config()?.max_seq_len as u64),
    );
    let mut uploaded = 0;
    for (file, is_adapter) in files
        .iter()
        .map(|f| (f, false))
        .chain(adapters.iter().map(|f| (f, true)))
    {
        let upload = send_blob(&client, file, options.upload_attempts, sink);
        let (digest, sent) = net(&runtime, cancel, "the upload", upload)?;
        uploaded += sent;
        let key = file_name(file);
        if is_adapter {
            request.adapters.insert(key, digest);
        } else {
            request.files.insert(key, digest);
        }
    }

    sink.emit(Event::Progress {
        stage: "create".into(),
        done: 0,
        total: 1,
    });
    // Ollama 0.30+ sends hundreds of identical `validating GGUF model` lines with a
    // byte count: each distinct status is logged once, the counts become progress.
    let mut last = String::new();
    let create = client.create(&request, |s| {
        if s.status != last {
            sink.emit(log(format!("ollama: {}", s.status)));
            last = s.status.clone();
        }
        if let (Some(done), Some(total)) = (s.completed, s.total) {
            sink.emit(Event::Progress {
                stage: "create".into(),
                done: done.min(total),
                total: total.max(1),
            });
        }
    });
    let mut result = net(&runtime, cancel, "creating the model", create);
    if let Err(OllamaError::Timeout { .. }) = &result {
        // The model may be complete although the stream never said so: ask before
        // calling the push a failure.
        if let Ok(Some(_)) = runtime.block_on(client.show(&options.name)) {
            sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!(
                    "Ollama stopped reporting while creating `{}`, but the model is there; checking it",
                    options.name
                ),
            });
            result = Ok(());
        }
    }
    if let Err(e) = result {
        if options.as_adapter {
            if let OllamaError::Stream { message } | OllamaError::Api { message, .. } = &e {
                if message.to_ascii_lowercase().contains("adapter") {
                    sink.emit(Event::Log {
                        level: LogLevel::Warn,
                        message: "this Ollama did not accept the LoRA adapter; push without \
                                  --as-adapter to send one merged GGUF instead"
                            .into(),
                    });
                }
            }
        }
        return Err(e.into());
    }
    sink.emit(Event::Progress {
        stage: "create".into(),
        done: 1,
        total: 1,
    });

    let own = native.then_some(jinja.as_str());
    verify(
        &runtime,
        &client,
        &options.name,
        &request,
        own,
        cancel,
        sink,
    )?;
    // A model can be created and still fail when first loaded (an adapter Ollama's
    // engine cannot apply): one token of chat proves it runs.
    let hello = [super::ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    if let Err(e) = net(
        &runtime,
        cancel,
        "loading the model",
        client.chat(&options.name, &hello, 1),
    ) {
        let why = match &e {
            OllamaError::Api { message, .. } | OllamaError::Stream { message } => message.clone(),
            other => other.to_string(),
        };
        let advice = if options.as_adapter {
            " Ollama accepted the LoRA adapter but cannot apply it to this model (Ollama 0.12–0.29 runs qwen3 on an engine without adapters): push without --as-adapter to send one merged GGUF."
        } else {
            ""
        };
        return Err(OllamaError::Stream {
            message: format!(
                "`{}` was created but Ollama cannot load it: {why}.{advice}",
                options.name
            ),
        }
        .into());
    }
    sink.emit(log("loaded: Ollama answered a one-token chat".into()));
    sink.emit(log(format!(
        "`{}` is in Ollama: try it with `ollama run {}`",
        options.name, options.name
    )));
    Ok(PushReport {
        name: options.name.clone(),
        host: client.host().to_string(),
        ollama_version: version,
        files: files.into_iter().chain(adapters).collect(),
        uploaded_bytes: uploaded,
        family: template.family,
        stop: template.stop,
    })
}

/// Runs one network phase of the push; a cancel ends it within 100 ms.
fn net<T, E: From<OllamaError>>(
    runtime: &tokio::runtime::Runtime,
    cancel: Option<&CancelToken>,
    what: &str,
    phase: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, E> {
    runtime.block_on(async {
        tokio::pin!(phase);
        loop {
            tokio::select! {
                r = &mut phase => return r,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if cancel.is_some_and(CancelToken::is_cancelled) {
                        return Err(OllamaError::Cancelled { what: what.to_string() }.into());
                    }
                }
            }
        }
    })
}

fn log(message: String) -> Event {
    Event::Log {
        level: LogLevel::Info,
        message,
    }
}

/// The name a file goes by in the create request. Ollama tells a GGUF by its `.gguf`
/// suffix (else by opening the blob), so a store blob (`sha256-…`) gets one.
fn file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    if name.to_ascii_lowercase().ends_with(".gguf") {
        name
    } else {
        format!("{name}.gguf")
    }
}

fn derive_template(
    model_dir: &Path,
    options: &PushOptions,
    sink: &dyn EventSink,
) -> Result<super::OllamaTemplate> {
    let mut t = template_for_model(model_dir)?;
    if let Some(custom) = &options.template {
        t.template = custom.clone();
        t.warning = None;
    }
    if let Some(w) = &t.warning {
        sink.emit(Event::Log {
            level: LogLevel::Warn,
            message: w.clone(),
        });
    } else if options.template.is_none()
        && ollama_extras(model_dir).is_some_and(|e| e["template"].is_string())
    {
        sink.emit(log(format!(
            "chat template: Ollama's own for this model (from its manifest), stops {:?}",
            t.stop
        )));
    } else {
        sink.emit(log(format!(
            "chat template: {:?}, stops {:?}",
            t.family, t.stop
        )));
    }
    Ok(t)
}

/// What a push sends Ollama for a model folder: the Go template of its chat template's
/// family, the system prompt that template writes when a conversation has none, and
/// every end-of-turn marker as a stop (`backprop ollama modelfile` prints it).
pub fn template_for_model(model_dir: &Path) -> Result<super::OllamaTemplate> {
    let chat = ChatTemplate::from_model_dir(model_dir)?;
    let mut t =
        ollama_template(chat.text(), chat.special("eos_token")).with_rendered_defaults(&chat);
    for eos in generation_eos_tokens(model_dir) {
        if !t.stop.contains(&eos) {
            t.stop.push(eos);
        }
    }
    // A model read from the local Ollama store: the template, system prompt and stops
    // Ollama itself uses for it (its manifest's layers) replace the derived ones.
    if let Some(extras) = ollama_extras(model_dir) {
        if let Some(own) = extras["template"].as_str() {
            t.template = own.to_string();
            t.warning = None;
        }
        if let Some(system) = extras["system"].as_str() {
            t.system = Some(system.to_string());
        }
        if let Some(stops) = extras["params"]["stop"].as_array() {
            let own: Vec<String> = stops
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            if !own.is_empty() {
                t.stop = own;
            }
        }
    }
    Ok(t)
}

fn ollama_extras(model_dir: &Path) -> Option<Value> {
    let path = model_dir.join(crate::gguf_base::OLLAMA_EXTRAS);
    serde_json::from_str(&crate::fsx::read_capped(&path, 1 << 20).ok()?).ok()
}

/// Every `eos_token_id` of generation_config.json (Qwen2 lists `<|im_end|>` and
/// `<|endoftext|>`, Llama 3 `<|eot_id|>` and `<|end_of_text|>`) as token text, looked
/// up among tokenizer.json's added tokens. Missing files just mean no extra stops.
fn generation_eos_tokens(model_dir: &Path) -> Vec<String> {
    let read = |name: &str| -> Option<Value> {
        serde_json::from_slice(&std::fs::read(model_dir.join(name)).ok()?).ok()
    };
    let Some(generation) = read("generation_config.json") else {
        return Vec::new();
    };
    let ids: Vec<u64> = match generation.get("eos_token_id") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    let Some(tokenizer) = read("tokenizer.json") else {
        return Vec::new();
    };
    let added = tokenizer.get("added_tokens").and_then(Value::as_array);
    ids.iter()
        .filter_map(|id| {
            added?
                .iter()
                .find(|t| t.get("id").and_then(Value::as_u64) == Some(*id))?
                .get("content")?
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// The one `.gguf` file of a fresh export with these options, exporting when needed.
fn gguf_export(
    lock: &RunLock,
    format: ExportFormat,
    quant: GgufQuant,
    sink: &dyn EventSink,
) -> Result<PathBuf> {
    let options = ExportOptions {
        format,
        quant,
        ..ExportOptions::default()
    };
    let dir = match export::fresh_export(lock.run_dir(), &options) {
        Some(dir) => {
            sink.emit(log(format!("reusing the export in {}", dir.display())));
            dir
        }
        None => export::export_locked(lock, &options, sink)?,
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&dir, e))?.path();
        if path.extension().is_some_and(|x| x == "gguf") {
            return Ok(path);
        }
    }
    Err(Error::Run {
        path: dir,
        message: "the export folder has no .gguf file; delete it and push again".into(),
    })
}

/// Hashes and uploads one file unless Ollama has it; retries a broken upload after
/// asking again whether the blob arrived. Returns the digest and bytes sent.
async fn send_blob(
    client: &OllamaClient,
    file: &Path,
    attempts: u32,
    sink: &dyn EventSink,
) -> Result<(String, u64)> {
    let digest = format!("sha256:{}", hash_with_progress(file, sink)?);
    let total = std::fs::metadata(file)
        .map_err(|e| Error::io(file, e))?
        .len();
    let mut last_error = None;
    for attempt in 1..=attempts.max(1) {
        if client.has_blob(&digest).await? {
            sink.emit(log(format!(
                "Ollama already has {} ({digest})",
                file_name(file)
            )));
            return Ok((digest, if attempt == 1 { 0 } else { total }));
        }
        if attempt > 1 {
            sink.emit(Event::Log {
                level: LogLevel::Warn,
                message: format!(
                    "upload broke off; sending {} again (attempt {attempt})",
                    file_name(file)
                ),
            });
        }
        let outcome = {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
            let upload = client.upload_blob(file, &digest, move |d, t| {
                let _ = tx.send((d, t));
            });
            tokio::pin!(upload);
            let outcome = loop {
                tokio::select! {
                    r = &mut upload => break r,
                    Some((done, total)) = rx.recv() => sink.emit(Event::Progress { stage: "upload".into(), done, total }),
                }
            };
            while let Ok((done, total)) = rx.try_recv() {
                sink.emit(Event::Progress {
                    stage: "upload".into(),
                    done,
                    total,
                });
            }
            outcome
        };
        match outcome {
            Ok(()) => return Ok((digest, total)),
            // A broken connection is worth another try; a server that went silent for a
            // whole timeout is stuck, and retrying would multiply the wait the user set.
            Err(e @ OllamaError::Connection { .. }) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(300 * attempt as u64)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_error
        .unwrap_or(OllamaError::Protocol {
            host: client.host().to_string(),
            what: "the upload".into(),
            message: "no attempt was made".into(),
        })
        .into())
}

fn hash_with_progress(file: &Path, sink: &dyn EventSink) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let total = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    let mut last_emit = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(file, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        if done - last_emit >= 64 << 20 || done == total {
            sink.emit(Event::Progress {
                stage: "hash".into(),
                done,
                total,
            });
            last_emit = done;
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Whether Ollama `version` renders a model with the Jinja chat template in its GGUF
/// rather than the Go template it was given: from 0.30 (llama-server) when the
/// template mentions tools or thinking (Ollama's `PreferChatTemplate`).
pub fn prefers_own_template(version: &str, jinja: &str) -> bool {
    let era = parse_version(version).is_some_and(|v| v >= (0, 30, 0) || v == (0, 0, 0));
    era && ["tools", "tool_call", "<think>"]
        .iter()
        .any(|w| jinja.contains(w))
}

/// Reads the model back and checks the template and stops arrived as sent. `own`: the
/// model's Jinja when this Ollama renders with it (then `/api/show` returns it).
fn verify(
    runtime: &tokio::runtime::Runtime,
    client: &OllamaClient,
    name: &str,
    sent: &CreateRequest,
    own: Option<&str>,
    cancel: Option<&CancelToken>,
    sink: &dyn EventSink,
) -> Result<()> {
    let after = "the check after creating";
    let show = net(runtime, cancel, after, client.show(name))
        .map_err(|e| match e {
            // The model exists by now; say so rather than leave the user guessing.
            OllamaError::Timeout { host, what, secs } => OllamaError::Timeout {
                host,
                what: format!("{what} (the check after creating `{name}`, which exists now)"),
                secs,
            },
            e => e,
        })?
        .ok_or_else(|| OllamaError::Protocol {
            host: client.host().to_string(),
            what: after.into(),
            message: format!("Ollama said `success` but does not list `{name}`"),
        })?;
    let mut problems = Vec::new();
    let renders_own = own.is_some_and(|j| j.trim() == show.template.trim());
    if renders_own {
        sink.emit(log(format!(
            "Ollama renders `{name}` with the model's own chat template (the Jinja in the GGUF, the one it was trained with), as Ollama 0.30+ does for templates with tools or thinking; the Go template sent applies only with OLLAMA_GO_TEMPLATE=1"
        )));
    } else if sent.template.as_deref().is_some_and(|t| t != show.template) {
        problems.push("the template Ollama stored differs from the one sent".to_string());
    }
    let stops = show.stops();
    if let Some(Value::Array(want)) = sent.parameters.get("stop") {
        for w in want.iter().filter_map(Value::as_str) {
            if !stops.iter().any(|s| s == w) {
                problems.push(format!("stop `{w}` is missing"));
            }
        }
    }
    if problems.is_empty() {
        sink.emit(log(format!(
            "checked with /api/show: template and {} stops are set",
            stops.len()
        )));
    } else {
        sink.emit(Event::Log {
            level: LogLevel::Warn,
            message: format!("`{name}` was created, but {}", problems.join("; ")),
        });
    }
    Ok(())
}

impl crate::train::RunSummary {
    /// Sends this run to Ollama (`OLLAMA_HOST`) as `name`, as a q4_k_m GGUF with the
    /// model's chat template and stop tokens, e.g. `summary.push_to_ollama("my-model")`.
    /// Blocking; see [`push_run`] for the options.
    pub fn push_to_ollama(&self, name: &str) -> crate::error::Result<PushReport> {
        push_run(
            &self.run_dir,
            &PushOptions::new(name),
            &crate::event::Silent,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generation_eos_becomes_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [7, 9]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"added_tokens": [{"id": 7, "content": "<|im_end|>"}, {"id": 8, "content": "x"}, {"id": 9, "content": "<|endoftext|>"}]}"#,
        )
        .unwrap();
        assert_eq!(
            generation_eos_tokens(dir.path()),
            vec!["<|im_end|>", "<|endoftext|>"]
        );
        assert!(generation_eos_tokens(&dir.path().join("missing")).is_empty());
    }
}
