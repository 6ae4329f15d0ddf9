//! Chat templates: the model's own Jinja `chat_template` (from `chat_template.jinja` or
//! `tokenizer_config.json`), rendered the way Hugging Face `apply_chat_template` does
//! (trim_blocks, lstrip_blocks, `raise_exception`, python string methods), with a
//! ChatML fallback for models that ship none. Also finds which byte ranges of the
//! rendered text are assistant replies, for completion-only loss masks.

use std::cell::Cell;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use minijinja::machinery::{tokenize, Token, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use super::record::{Message, Role};
use crate::error::{Error, Result};

/// ChatML, as Qwen2 ships it minus the default system prompt; used when a model has
/// no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Bounds on one render, so a hostile template fails with an error instead of
/// spinning or allocating without end. Real templates use a few hundred
/// instructions per turn and write about as much text as the conversation holds.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Instructions per render: enough for the longest conversation the reader accepts.
const FUEL: u64 = 10_000_000;
/// Text one render may write, and the size any value it stores may reach (bytes of
/// strings plus 16 per list or map item).
const MAX_OUTPUT_BYTES: usize = 64 << 20;
const MAX_VALUE_BYTES: usize = 16 << 20;
const MAX_RENDER_TIME: Duration = Duration::from_secs(5);
/// Conversations with at most this many replies are located by prefix renders alone.
const EXACT_REPLIES: usize = 16;
/// Replies located exactly before the rest are found by the text around them.
const LEARN_REPLIES: usize = 4;
/// Past this, a template that wraps replies unevenly is refused rather than rendered
/// once per reply.
const MAX_EXACT_FALLBACK: usize = 512;
/// The guard the compiler wraps around every `set` / `with` value: fuel counts
/// instructions, not the size of what one `+` builds, so a doubling list is caught
/// here, long before it reaches gigabytes.
const GUARD: &str = "__backprop_bounded";

/// Why a render was stopped, recorded by the guard so the error can say it.
#[derive(Debug, Clone, Copy)]
enum Tripped {
    Output,
    Value,
    Time,
}

#[derive(Clone, Copy)]
struct Budget {
    started: Instant,
    tripped: Option<Tripped>,
}

thread_local! {
    // Renders are synchronous on the calling thread, so the budget of the render in
    // progress lives with the thread.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

fn trip(why: Tripped) -> minijinja::Error {
    BUDGET.with(|b| {
        if let Some(mut budget) = b.get() {
            budget.tripped.get_or_insert(why);
            b.set(Some(budget));
        }
    });
    minijinja::Error::new(ErrorKind::InvalidOperation, "render budget exceeded")
}

fn check_time() -> std::result::Result<(), minijinja::Error> {
    let late = BUDGET.with(|b| {
        b.get()
            .is_some_and(|b| b.started.elapsed() > MAX_RENDER_TIME)
    });
    if late {
        return Err(trip(Tripped::Time));
    }
    Ok(())
}

/// Size of a value, counting up to `limit`; `None` once over it (or out of time).
fn bounded_size(v: &Value, limit: usize) -> std::result::Result<usize, minijinja::Error> {
    let mut seen = 0usize;
    let mut stack = vec![v.clone()];
    let mut steps = 0usize;
    while let Some(v) = stack.pop() {
        steps += 1;
        if steps.is_multiple_of(4096) {
            check_time()?;
        }
        seen += 16;
        match v.kind() {
            minijinja::value::ValueKind::String => seen += v.as_str().map_or(0, str::len),
            minijinja::value::ValueKind::Bytes => seen += v.as_bytes().map_or(0, <[u8]>::len),
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
                // A lazy concatenation knows its length without being walked.
                if v.len()
                    .is_some_and(|n| seen.saturating_add(n.saturating_mul(16)) > limit)
                {
                    return Err(trip(Tripped::Value));
                }
                if let Ok(items) = v.try_iter() {
                    for item in items {
                        seen += 16;
                        if seen > limit {
                            return Err(trip(Tripped::Value));
                        }
                        stack.push(item);
                    }
                }
            }
            minijinja::value::ValueKind::Map => {
                if let Ok(keys) = v.try_iter() {
                    for key in keys {
                        if let Ok(item) = v.get_item(&key) {
                            stack.push(item);
                        }
                        stack.push(key);
                        if seen + 16 * stack.len() > limit {
                            return Err(trip(Tripped::Value));
                        }
                    }
                }
            }
            _ => {}
        }
        if seen > limit {
            return Err(trip(Tripped::Value));
        }
    }
    Ok(seen)
}

fn bounded(v: Value) -> std::result::Result<Value, minijinja::Error> {
    check_time()?;
    bounded_size(&v, MAX_VALUE_BYTES)?;
    Ok(v)
}

/// Collects rendered text, refusing to grow past the output limit.
struct CappedText(Vec<u8>);

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            trip(Tripped::Output);
            return Err(std::io::Error::other("output limit"));
        }
        if check_time().is_err() {
            return Err(std::io::Error::other("time limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Wraps the value of every `{% set ... = value %}` and `{% with a = value %}` in the
/// size guard, working on the template's tokens so strings and comments are never
/// touched. Returns the template unchanged when it does not tokenize (compiling it
/// then reports the syntax error at the user's own line).
fn guard_assignments(text: &str) -> String {
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let mut inserts: Vec<(usize, &str)> = Vec::new();
    // Inside a `set`/`with` tag: nesting depth of brackets, and whether a value is open.
    let mut tag: Option<&str> = None;
    let mut after_block_start = false;
    let mut depth = 0usize;
    let mut open = false;
    for token in tokenize(text, false, SyntaxConfig, ws) {
        let Ok((token, span)) = token else {
            return text.to_string();
        };
        let start = span.start_offset as usize;
        let end = span.end_offset as usize;
        match (&token, tag) {
            (Token::BlockStart, _) => {
                after_block_start = true;
                continue;
            }
            (Token::Ident(name @ ("set" | "with")), None) if after_block_start => {
                tag = Some(name);
                depth = 0;
                open = false;
            }
            (Token::BlockEnd, Some(_)) => {
                if open {
                    inserts.push((start, "))"));
                }
                tag = None;
                open = false;
            }
            (_, Some(kind)) => match token {
                Token::ParenOpen | Token::BracketOpen | Token::BraceOpen => depth += 1,
                Token::ParenClose | Token::BracketClose | Token::BraceClose => {
                    depth = depth.saturating_sub(1)
                }
                Token::Assign if depth == 0 && !open => {
                    // Double parentheses: `set a, b = 1, 2` has a bare tuple value.
                    inserts.push((end, "__backprop_bounded(("));
                    open = true;
                }
                Token::Comma if depth == 0 && open && kind == "with" => {
                    inserts.push((start, "))"));
                    open = false;
                }
                _ => {}
            },
            _ => {}
        }
        after_block_start = false;
    }
    if tag.is_some() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + inserts.len() * 24);
    let mut at = 0;
    for (pos, piece) in inserts {
        out.push_str(&text[at..pos]);
        out.push_str(piece);
        at = pos;
    }
    out.push_str(&text[at..]);
    out
}

/// Where the template came from, shown to users so a fallback is never silent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateSource {
    File(PathBuf),
    FallbackChatml,
}

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: TemplateSource,
    text: String,
    /// Special tokens passed to the template, as HF passes `special_tokens_map`.
    specials: Vec<(&'static str, String)>,
}

/// A rendered conversation and the byte ranges holding assistant replies (each
/// including the end-of-turn marker the template puts after it, so the model learns
/// to stop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
}

impl ChatTemplate {
    /// Compiles a template. `specials` are the `bos_token`, `eos_token`, ... strings.
    pub fn new(
        text: &str,
        source: TemplateSource,
        specials: Vec<(&'static str, String)>,
    ) -> std::result::Result<Self, TemplateError> {
        if text.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError {
                message: format!(
                    "the chat template is {} bytes, above the {} MiB limit; this is not a chat template",
                    text.len(),
                    MAX_TEMPLATE_BYTES >> 20
                ),
            });
        }
        // A template that defines or rebinds the guard's name could switch it off.
        if text.contains(GUARD) {
            return Err(TemplateError {
                message: format!("the chat template uses the reserved name `{GUARD}`"),
            });
        }
        let mut env = Environment::new();
        // Hugging Face renders with jinja2's trim_blocks + lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_function(GUARD, bounded);
        let text = strip_generation_tags(text);
        // Compile the user's text first so syntax errors point at their own columns.
        env.add_template_owned(TEMPLATE_NAME, text.clone())
            .map_err(|e| TemplateError {
                message: format!("the chat template does not compile: {e:#}"),
            })?;
        env.add_template_owned(TEMPLATE_NAME, guard_assignments(&text))
            .map_err(|e| TemplateError {
                message: format!("the chat template does not compile: {e:#}"),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            text,
            specials,
        })
    }

    pub fn chatml(specials: Vec<(&'static str, String)>) -> Self {
        Self::new(CHATML_TEMPLATE, TemplateSource::FallbackChatml, specials)
            .expect("the built-in ChatML template compiles")
    }

    /// Loads the template of a model folder: `chat_template.jinja` first (newer
    /// transformers save it there), then `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of named templates where `default` wins), else ChatML.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.exists() {
            let text = crate::fsx::read_capped(&config_path, crate::fsx::MAX_MODEL_TEXT)?;
            serde_json::from_str(&text)
                .map_err(|e| Error::model(&config_path, format!("not valid JSON: {e}")))?
        } else {
            Json::Null
        };
        let specials = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .filter_map(|key| token_string(config.get(key)?).map(|s| (key, s)))
            .collect::<Vec<_>>();

        let jinja_path = dir.join("chat_template.jinja");
        let (text, path) = if jinja_path.exists() {
            let text = crate::fsx::read_capped(&jinja_path, crate::fsx::MAX_MODEL_TEXT)?;
            (Some(text), jinja_path)
        } else {
            (template_from_config(&config, &config_path)?, config_path)
        };
        match text {
            Some(text) => Self::new(&text, TemplateSource::File(path.clone()), specials)
                .map_err(|e| Error::model(&path, e.message)),
            None => Ok(Self::chatml(specials)),
        }
    }

    pub fn source(&self) -> &TemplateSource {
        &self.source
    }

    pub fn is_fallback(&self) -> bool {
        self.source == TemplateSource::FallbackChatml
    }

    /// The template text (after `{% generation %}` markers are removed).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn special(&self, key: &str) -> Option<&str> {
        self.specials
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Renders like `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=..)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError {
                message: e.to_string(),
            })?;
        let mut ctx: Vec<(&str, Value)> = self
            .specials
            .iter()
            .map(|(k, v)| (*k, Value::from(v.as_str())))
            .collect();
        ctx.push(("messages", Value::from_serialize(messages)));
        ctx.push(("add_generation_prompt", Value::from(add_generation_prompt)));
        let ctx: Value = ctx.into_iter().collect();
        let outer = BUDGET.with(|b| {
            b.replace(Some(Budget {
                started: Instant::now(),
                tripped: None,
            }))
        });
        let mut out = CappedText(Vec::new());
        let result = template.render_captured_to(ctx, &mut out).map(drop);
        let budget = BUDGET.with(|b| b.replace(outer));
        match result {
            Ok(_) => String::from_utf8(out.0).map_err(|_| TemplateError {
                message: self.located("the chat template wrote invalid UTF-8".into()),
            }),
            Err(e) => {
                let tripped = budget.and_then(|b| b.tripped);
                // A template's own raise_exception speaks about the conversation, so
                // it is shown as written; everything else points at the template.
                if tripped.is_none() && e.kind() == ErrorKind::InvalidOperation {
                    return Err(TemplateError {
                        message: describe(&e),
                    });
                }
                Err(TemplateError {
                    message: self.located(match (tripped, e.kind()) {
                        (Some(Tripped::Output), _) => format!(
                            "the chat template wrote more than {} MiB for one conversation; the template loops without end, or the record is far too long",
                            MAX_OUTPUT_BYTES >> 20
                        ),
                        (Some(Tripped::Value), _) => format!(
                            "the chat template built a value larger than {} MiB (a list or string that keeps doubling?); fix the template",
                            MAX_VALUE_BYTES >> 20
                        ),
                        (Some(Tripped::Time), _) => format!(
                            "rendering took longer than {} s for one conversation; fix the template",
                            MAX_RENDER_TIME.as_secs()
                        ),
                        (None, ErrorKind::OutOfFuel) => format!(
                            "the chat template ran more than {FUEL} instructions for one conversation (a loop without end, or nested loops?); fix the template"
                        ),
                        _ => describe(&e),
                    }),
                })
            }
        }
    }

    /// Names the template file in a render error, so a bad template is told apart
    /// from a bad record.
    fn located(&self, message: String) -> String {
        match &self.source {
            TemplateSource::File(path) => {
                format!("{message} (chat template from {})", path.display())
            }
            TemplateSource::FallbackChatml => message,
        }
    }

    /// Renders the whole conversation and locates each assistant reply. A reply spans
    /// from the end of the prompt the template would produce before it (with the
    /// generation prompt) to the end of the rendering that includes it. Templates that
    /// rewrite earlier turns (and so are not prefix-stable) fall back to finding the
    /// reply text itself.
    ///
    /// Rendering every prefix is quadratic in the number of turns, so only short
    /// conversations are located that way. Longer ones are located exactly for their
    /// first replies, which gives the text the template puts around a reply; the rest
    /// are found by that text in one pass, and the result is checked against exact
    /// prefix renders of the middle and last replies.
    pub fn render_with_spans(
        &self,
        messages: &[Message],
    ) -> std::result::Result<Rendered, TemplateError> {
        let text = self.render(messages, false)?;
        let replies: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
            .map(|(i, _)| i)
            .collect();
        if replies.len() > EXACT_REPLIES {
            if let Some(assistant) = self.linear_spans(messages, &text, &replies)? {
                return Ok(Rendered { text, assistant });
            }
            if replies.len() > MAX_EXACT_FALLBACK {
                return Err(TemplateError {
                    message: self.located(format!(
                        "this conversation has {} assistant turns, and the chat template renders turns differently depending on what follows, so each would need its own render; split conversations longer than {MAX_EXACT_FALLBACK} replies",
                        replies.len()
                    )),
                });
            }
        }
        let mut assistant = Vec::with_capacity(replies.len());
        let mut cursor = 0usize;
        for &i in &replies {
            let span = self.exact_span(messages, i, &text, cursor)?;
            cursor = span.range.end;
            assistant.push(span.range);
        }
        Ok(Rendered { text, assistant })
    }

    /// The span of the reply `messages[i]`, from prefix renders when the template is
    /// prefix-stable there, else by finding the reply's text after `cursor`.
    fn exact_span(
        &self,
        messages: &[Message],
        i: usize,
        text: &str,
        cursor: usize,
    ) -> std::result::Result<Span, TemplateError> {
        let prefix = self.render(&messages[..i], true).ok();
        let upto = if i + 1 == messages.len() {
            Some(text.to_string())
        } else {
            self.render(&messages[..=i], false).ok()
        };
        match (prefix, upto) {
            (Some(p), Some(u))
                if p.len() >= cursor
                    && p.len() < u.len()
                    && text.starts_with(u.as_str())
                    && u.starts_with(p.as_str()) =>
            {
                Ok(Span {
                    range: p.len()..u.len(),
                    from_prefixes: true,
                })
            }
            _ => {
                let content = messages[i].content.trim();
                let start = text[cursor..]
                    .find(content)
                    .map(|off| cursor + off)
                    .ok_or_else(|| TemplateError {
                        message: format!(
                            "cannot find assistant turn {} in the rendered conversation (the template changes its text)",
                            i + 1
                        ),
                    })?;
                Ok(Span {
                    range: start..start + content.len(),
                    from_prefixes: false,
                })
            }
        }
    }

    /// Spans of a long conversation in linear time, or `None` when the template does
    /// not wrap every reply the same way (then the caller renders prefixes).
    fn linear_spans(
        &self,
        messages: &[Message],
        text: &str,
        replies: &[usize],
    ) -> std::result::Result<Option<Vec<Range<usize>>>, TemplateError> {
        // What the template writes before and after a reply's (trimmed) text, learnt
        // from the first replies and required to be the same for each of them. The
        // generation prompt is part of what is searched for, so that a user turn
        // ending with the next reply's text (`… say OK` then `OK`) is never taken for
        // the reply; it is not part of the span.
        let mut affixes: Option<(String, String, String)> = None;
        let mut cursor = 0usize;
        let mut spans = Vec::with_capacity(replies.len());
        for &i in &replies[..LEARN_REPLIES] {
            let span = self.exact_span(messages, i, text, cursor)?;
            if !span.from_prefixes {
                return Ok(None);
            }
            let content = messages[i].content.trim();
            let Some(off) = text[span.range.clone()].find(content) else {
                return Ok(None);
            };
            let body = span.range.start + off..span.range.start + off + content.len();
            let Some(gen) = self.generation_prompt(&messages[..i]) else {
                return Ok(None);
            };
            if gen.is_empty() || !text[..span.range.start].ends_with(gen.as_str()) {
                return Ok(None);
            }
            let found = (
                gen,
                text[span.range.start..body.start].to_string(),
                text[body.end..span.range.end].to_string(),
            );
            match &affixes {
                None => affixes = Some(found),
                Some(a) if *a == found => {}
                Some(_) => return Ok(None),
            }
            cursor = span.range.end;
            spans.push(span.range);
        }
        let Some((gen, before, after)) = affixes else {
            return Ok(None);
        };
        let mut needle = String::new();
        for &i in &replies[LEARN_REPLIES..] {
            needle.clear();
            needle.push_str(&gen);
            needle.push_str(&before);
            needle.push_str(messages[i].content.trim());
            needle.push_str(&after);
            let Some(off) = text[cursor..].find(needle.as_str()) else {
                return Ok(None);
            };
            let range = cursor + off + gen.len()..cursor + off + needle.len();
            cursor = range.end;
            spans.push(range);
        }
        // Exact checks where a drift would show: the middle and the last reply.
        for k in [replies.len() / 2, replies.len() - 1] {
            let from = if k == 0 { 0 } else { spans[k - 1].end };
            let exact = self.exact_span(messages, replies[k], text, from)?;
            if !exact.from_prefixes || exact.range != spans[k] {
                return Ok(None);
            }
        }
        Ok(Some(spans))
    }
}

impl ChatTemplate {
    /// What `add_generation_prompt` adds after `messages` (`<|im_start|>assistant\n`
    /// for ChatML); `None` when the template does not simply append it.
    fn generation_prompt(&self, messages: &[Message]) -> Option<String> {
        let with = self.render(messages, true).ok()?;
        let without = self.render(messages, false).ok()?;
        with.strip_prefix(without.as_str()).map(str::to_string)
    }
}

/// A located reply and whether prefix renders proved it.
struct Span {
    range: Range<usize>,
    from_prefixes: bool,
}

fn template_from_config(config: &Json, path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == name)
                        .then(|| t.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").map(Some).ok_or_else(|| {
                Error::model(
                    path,
                    "`chat_template` is a list without a template named `default`",
                )
            })
        }
        Some(_) => Err(Error::model(
            path,
            "`chat_template` must be a string or a list of {name, template}",
        )),
    }
}

/// Special tokens are stored either as a string or as an AddedToken object.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)`: HF exposes the current date to templates (Llama 3.1 prints
/// "Today Date"). Supports the directives those templates use.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let (hh, mm, ss) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Removes `{% generation %}` / `{% endgeneration %}` (HF's assistant-mask markers,
/// which plain Jinja does not know); we find assistant spans ourselves.
fn strip_generation_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%`: in `{%}` they share the `%`.
        let Some(end) = tag[2..].find("%}").map(|i| i + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = tag[2..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&tag[..end + 2]);
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn describe(e: &minijinja::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation => match e.detail() {
            Some(detail) => format!("the chat template raised: {detail}"),
            None => format!("the chat template raised: {e}"),
        },
        _ => format!("the chat template failed: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(turns: &[(Role, &str)]) -> Vec<Message> {
        turns.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    #[test]
    fn chatml_fallback_renders_and_marks_replies_with_end_token() {
        let t = ChatTemplate::chatml(vec![]);
        let msgs = conv(&[
            (Role::System, "Be brief."),
            (Role::User, "Hi"),
            (Role::Assistant, "Hello!"),
        ]);
        let r = t.render_with_spans(&msgs).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(r.assistant.len(), 1);
        assert_eq!(&r.text[r.assistant[0].clone()], "Hello!<|im_end|>\n");
    }

    #[test]
    fn raise_exception_reaches_the_user() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
            TemplateSource::FallbackChatml,
            vec![],
        )
        .unwrap();
        let err = t
            .render(&conv(&[(Role::Assistant, "x")]), false)
            .unwrap_err();
        assert!(
            err.message.contains("Conversation must start with user"),
            "{}",
            err.message
        );
    }

    #[test]
    fn python_string_methods_and_generation_tags_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content.strip() }}{% endgeneration %}{% else %}{{ m.content.upper() }}|{% endif %}{% endfor %}",
            TemplateSource::FallbackChatml,
            vec![],
        )
        .unwrap();
        let r = t
            .render(
                &conv(&[(Role::User, "hi"), (Role::Assistant, "  yo  ")]),
                false,
            )
            .unwrap();
        assert_eq!(r, "HI|yo");
    }

    #[test]
    fn non_prefix_stable_templates_fall_back_to_finding_the_reply() {
        // Prints turns in reverse: no rendering is a prefix of a longer one.
        let t = ChatTemplate::new(
            "{% for m in messages|reverse %}[{{ m.role }}]{{ m.content }}{% endfor %}",
            TemplateSource::FallbackChatml,
            vec![],
        )
        .unwrap();
        let r = t
            .render_with_spans(&conv(&[
                (Role::User, "question"),
                (Role::Assistant, "answer"),
            ]))
            .unwrap();
        assert_eq!(r.text, "[assistant]answer[user]question");
        assert_eq!(&r.text[r.assistant[0].clone()], "answer");
    }

    #[test]
    fn strftime_now_formats_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        let s = strftime_now("%d %b %Y".into());
        assert_eq!(s.len(), 11, "{s}");
    }
}
