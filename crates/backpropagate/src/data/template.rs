//! Chat templates: the model's own Jinja `chat_template` (from `chat_template.jinja` or
//! `tokenizer_config.json`), rendered the way Hugging Face `apply_chat_template` does
//! (trim_blocks, lstrip_blocks, `raise_exception`, python string methods), with a
//! ChatML fallback for models that ship none. Also finds which byte ranges of the
//! rendered text are assistant replies, for completion-only loss masks.

use std::ops::Range;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use super::record::{Message, Role};
use crate::error::{Error, Result};

/// ChatML, as Qwen2 ships it minus the default system prompt; used when a model has
/// no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

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
        let mut env = Environment::new();
        // Hugging Face renders with jinja2's trim_blocks + lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let text = strip_generation_tags(text);
        env.add_template_owned(TEMPLATE_NAME, text.clone())
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
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
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
            let text =
                std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
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
        template.render(ctx).map_err(|e| TemplateError {
            message: describe(&e),
        })
    }

    /// Renders the whole conversation and locates each assistant reply. A reply spans
    /// from the end of the prompt the template would produce before it (with the
    /// generation prompt) to the end of the rendering that includes it. Templates that
    /// rewrite earlier turns (and so are not prefix-stable) fall back to finding the
    /// reply text itself.
    pub fn render_with_spans(
        &self,
        messages: &[Message],
    ) -> std::result::Result<Rendered, TemplateError> {
        let text = self.render(messages, false)?;
        let mut assistant = Vec::new();
        let mut cursor = 0usize;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let prefix = self.render(&messages[..i], true).ok();
            let upto = if i + 1 == messages.len() {
                Some(text.clone())
            } else {
                self.render(&messages[..=i], false).ok()
            };
            let span = match (prefix, upto) {
                (Some(p), Some(u))
                    if p.len() >= cursor
                        && p.len() < u.len()
                        && text.starts_with(u.as_str())
                        && u.starts_with(p.as_str()) =>
                {
                    p.len()..u.len()
                }
                _ => {
                    let content = m.content.trim();
                    let start = text[cursor..]
                        .find(content)
                        .map(|off| cursor + off)
                        .ok_or_else(|| TemplateError {
                            message: format!(
                                "cannot find assistant turn {} in the rendered conversation (the template changes its text)",
                                i + 1
                            ),
                        })?;
                    start..start + content.len()
                }
            };
            cursor = span.end;
            assistant.push(span);
        }
        Ok(Rendered { text, assistant })
    }
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
        let Some(end) = tag.find("%}") else {
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
