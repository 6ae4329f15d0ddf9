//! The five JSONL record formats we accept, how a record's format is recognised, and
//! how each becomes the one shape the rest of the pipeline sees: a conversation of
//! system/user/assistant messages, or plain text.

use std::fmt;
use ts_rs::TS;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::diagnostic::Diagnostic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
#[ts(export)]
pub enum Format {
    /// `{"instruction", "input"?, "output", "system"?}`
    Alpaca,
    /// OpenAI chat: `{"messages": [{"role", "content"}, ..]}`
    Messages,
    /// `{"conversations": [{"from", "value"}, ..]}`
    Sharegpt,
    /// `{"prompt", "completion", "system"?}`
    PromptCompletion,
    /// `{"text"}`: raw text, trained on every token.
    Text,
}

impl Format {
    /// Recognises a record by its keys. Structured formats win over `text` so that a
    /// chat record carrying a `text` preview is still read as chat.
    pub fn detect(obj: &Map<String, Value>) -> Option<Format> {
        if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("conversations") {
            Some(Format::Sharegpt)
        } else if obj.contains_key("instruction") {
            Some(Format::Alpaca)
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if obj.contains_key("output") {
            Some(Format::Alpaca)
        } else if obj.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Messages => "messages",
            Format::Sharegpt => "sharegpt",
            Format::PromptCompletion => "prompt_completion",
            Format::Text => "text",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    Chat(Vec<Message>),
    Text(String),
}

/// One usable record and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub line: usize,
    pub content: Content,
}

/// Turns one JSON object of a known format into content, or the problems that stop it.
pub(crate) fn parse(
    format: Format,
    obj: &Map<String, Value>,
    line: usize,
) -> Result<Content, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let content = match format {
        Format::Alpaca => parse_alpaca(obj, line, &mut problems),
        Format::Messages => parse_turns(obj, line, TurnKeys::MESSAGES, &mut problems),
        Format::Sharegpt => parse_turns(obj, line, TurnKeys::SHAREGPT, &mut problems),
        Format::PromptCompletion => parse_prompt_completion(obj, line, &mut problems),
        Format::Text => text_field(obj, "text", line, &mut problems).map(Content::Text),
    };
    match content {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(problems),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required, non-blank string field.
fn text_field(
    obj: &Map<String, Value>,
    key: &str,
    line: usize,
    problems: &mut Vec<Diagnostic>,
) -> Option<String> {
    match obj.get(key) {
        None => {
            problems.push(Diagnostic::error(
                line,
                format!("missing field `{key}`"),
                format!("add a non-empty string `\"{key}\": \"...\"` to this record"),
            ));
            None
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            problems.push(Diagnostic::error(
                line,
                format!("field `{key}` is empty"),
                format!("write the {key} text, or delete this line"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            problems.push(Diagnostic::error(
                line,
                format!("field `{key}` must be a string, found {}", type_name(other)),
                format!("put the {key} in double quotes as one string"),
            ));
            None
        }
    }
}

/// An optional string field: absent, null and "" all mean "not given".
fn optional_text(
    obj: &Map<String, Value>,
    key: &str,
    line: usize,
    problems: &mut Vec<Diagnostic>,
) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            problems.push(Diagnostic::error(
                line,
                format!(
                    "field `{key}` must be a string or absent, found {}",
                    type_name(other)
                ),
                format!("make `{key}` a string, or remove it"),
            ));
            None
        }
    }
}

fn parse_alpaca(
    obj: &Map<String, Value>,
    line: usize,
    problems: &mut Vec<Diagnostic>,
) -> Option<Content> {
    let instruction = text_field(obj, "instruction", line, problems);
    let input = optional_text(obj, "input", line, problems);
    let output = text_field(obj, "output", line, problems);
    let system = optional_text(obj, "system", line, problems);
    let (instruction, output) = (instruction?, output?);
    // Same joining as the Python package and Stanford Alpaca: instruction, blank line, input.
    let user = match input {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction,
    };
    let mut messages = Vec::with_capacity(3);
    if let Some(system) = system {
        messages.push(Message::new(Role::System, system));
    }
    messages.push(Message::new(Role::User, user));
    messages.push(Message::new(Role::Assistant, output));
    Some(Content::Chat(messages))
}

fn parse_prompt_completion(
    obj: &Map<String, Value>,
    line: usize,
    problems: &mut Vec<Diagnostic>,
) -> Option<Content> {
    let prompt = text_field(obj, "prompt", line, problems);
    let completion = text_field(obj, "completion", line, problems);
    let system = optional_text(obj, "system", line, problems);
    let mut messages = Vec::with_capacity(3);
    if let Some(system) = system {
        messages.push(Message::new(Role::System, system));
    }
    messages.push(Message::new(Role::User, prompt?));
    messages.push(Message::new(Role::Assistant, completion?));
    Some(Content::Chat(messages))
}

/// Turns one record may hold: the chat template renders a record in one pass, but each
/// render's instruction budget is sized for conversations up to this length.
pub const MAX_TURNS: usize = 20_000;

/// Key names of the two list-of-turns formats.
struct TurnKeys {
    list: &'static str,
    role: &'static str,
    content: &'static str,
    roles_hint: &'static str,
}

impl TurnKeys {
    const MESSAGES: TurnKeys = TurnKeys {
        list: "messages",
        role: "role",
        content: "content",
        roles_hint: "system, user or assistant",
    };
    const SHAREGPT: TurnKeys = TurnKeys {
        list: "conversations",
        role: "from",
        content: "value",
        roles_hint: "system, human or gpt",
    };

    fn role(&self, name: &str) -> Option<Role> {
        match (self.list, name) {
            (_, "system") => Some(Role::System),
            (_, "user") => Some(Role::User),
            (_, "assistant") => Some(Role::Assistant),
            ("conversations", "human") => Some(Role::User),
            ("conversations", "gpt") => Some(Role::Assistant),
            _ => None,
        }
    }
}

fn parse_turns(
    obj: &Map<String, Value>,
    line: usize,
    keys: TurnKeys,
    problems: &mut Vec<Diagnostic>,
) -> Option<Content> {
    let list = match obj.get(keys.list) {
        Some(Value::Array(list)) => list,
        Some(other) => {
            problems.push(Diagnostic::error(
                line,
                format!(
                    "field `{}` must be an array of turns, found {}",
                    keys.list,
                    type_name(other)
                ),
                format!(
                    "write `\"{}\": [{{\"{}\": \"user\", \"{}\": \"...\"}}, ...]`",
                    keys.list, keys.role, keys.content
                ),
            ));
            return None;
        }
        None => {
            problems.push(Diagnostic::error(
                line,
                format!("missing field `{}`", keys.list),
                format!(
                    "add `\"{}\": [...]` with the conversation's turns",
                    keys.list
                ),
            ));
            return None;
        }
    };
    if list.is_empty() {
        problems.push(Diagnostic::error(
            line,
            format!("`{}` is empty", keys.list),
            "add at least one user turn and one assistant turn, or delete this line",
        ));
        return None;
    }
    if list.len() > MAX_TURNS {
        problems.push(Diagnostic::error(
            line,
            format!(
                "`{}` has {} turns, above the limit of {MAX_TURNS} per record",
                keys.list,
                list.len()
            ),
            "split this conversation into several records (each with its own assistant replies)",
        ));
        return None;
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, turn) in list.iter().enumerate() {
        let n = i + 1;
        let Value::Object(turn) = turn else {
            problems.push(Diagnostic::error(
                line,
                format!(
                    "turn {n} of `{}` must be an object, found {}",
                    keys.list,
                    type_name(turn)
                ),
                format!(
                    "write each turn as {{\"{}\": ..., \"{}\": ...}}",
                    keys.role, keys.content
                ),
            ));
            continue;
        };
        let role = match turn.get(keys.role) {
            Some(Value::String(name)) => match keys.role(name) {
                Some(role) => Some(role),
                None => {
                    problems.push(Diagnostic::error(
                        line,
                        format!("turn {n} has unknown {} `{name}`", keys.role),
                        format!("use one of: {}", keys.roles_hint),
                    ));
                    None
                }
            },
            Some(other) => {
                problems.push(Diagnostic::error(
                    line,
                    format!(
                        "turn {n}: `{}` must be a string, found {}",
                        keys.role,
                        type_name(other)
                    ),
                    format!("use one of: {}", keys.roles_hint),
                ));
                None
            }
            None => {
                problems.push(Diagnostic::error(
                    line,
                    format!("turn {n} is missing `{}`", keys.role),
                    format!("add `\"{}\": ...` ({})", keys.role, keys.roles_hint),
                ));
                None
            }
        };
        let content = turn_content(turn, keys.content, n, line, problems);
        if let (Some(role), Some(content)) = (role, content) {
            messages.push(Message::new(role, content));
        }
    }
    if problems.is_empty() && !messages.iter().any(|m| m.role == Role::Assistant) {
        problems.push(Diagnostic::error(
            line,
            "no assistant turn: nothing for the model to learn from",
            "end the conversation with the answer you want the model to give",
        ));
    }
    Some(Content::Chat(messages))
}

/// A turn's text. OpenAI-style lists of `{"type": "text", "text": ..}` parts are joined.
fn turn_content(
    turn: &Map<String, Value>,
    key: &str,
    n: usize,
    line: usize,
    problems: &mut Vec<Diagnostic>,
) -> Option<String> {
    let text = match turn.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("text").and_then(Value::as_str) {
                    Some(t) if part.get("type").and_then(Value::as_str) == Some("text") => {
                        text.push_str(t)
                    }
                    _ => {
                        problems.push(Diagnostic::error(
                            line,
                            format!("turn {n} has a non-text content part"),
                            "only text parts ({\"type\": \"text\", \"text\": ...}) can be trained; remove images and tool calls",
                        ));
                        return None;
                    }
                }
            }
            text
        }
        Some(other) => {
            problems.push(Diagnostic::error(
                line,
                format!(
                    "turn {n}: `{key}` must be a string, found {}",
                    type_name(other)
                ),
                format!("put the turn's text in `\"{key}\": \"...\"`"),
            ));
            return None;
        }
        None => {
            problems.push(Diagnostic::error(
                line,
                format!("turn {n} is missing `{key}`"),
                format!("add `\"{key}\": \"...\"` with the turn's text"),
            ));
            return None;
        }
    };
    if text.trim().is_empty() {
        problems.push(Diagnostic::error(
            line,
            format!("turn {n} has empty `{key}`"),
            "write the turn's text, or remove the turn",
        ));
        return None;
    }
    Some(text)
}
