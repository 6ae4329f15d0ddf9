//! Ollama's Go template for a model, derived from its Jinja chat template.
//!
//! Ollama guesses a template when none is given and falls back to a bare prompt, so
//! fine-tunes babble or never stop (the most common import complaint). We always send
//! an explicit template, the stop tokens and the template's default system prompt.
//! With `.Messages` templates Ollama puts the system prompt into `.Messages` itself
//! (and into `$.System`), so the ChatML and Llama 3 forms just walk the messages.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateFamily {
    /// `<|im_start|>role ... <|im_end|>` (Qwen2, Qwen2.5, SmolLM, many fine-tunes).
    ChatMl,
    /// ChatML with Qwen3's `<think>` blocks.
    Qwen3,
    /// `<|start_header_id|>role<|end_header_id|>` ... `<|eot_id|>`.
    Llama3,
    /// Llama 3.1+: Llama 3 whose template always writes a system header with
    /// "Cutting Knowledge Date" and "Today Date" lines.
    Llama31,
    /// `[INST] ... [/INST]` with no system role (Mistral Instruct v0.1–v0.3).
    Mistral,
    /// Mistral's tekken form: `[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]`, then `[INST]…[/INST]`
    /// without spaces (Mistral Small 3 and later).
    MistralTekken,
    /// Not recognised: a plain transcript template, with a warning.
    Generic,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OllamaTemplate {
    pub family: TemplateFamily,
    /// Go `text/template` source for the Modelfile's TEMPLATE.
    pub template: String,
    /// The template's built-in system prompt, sent as SYSTEM.
    pub system: Option<String>,
    /// Every end-of-turn / end-of-text marker, sent as `stop` parameters.
    pub stop: Vec<String>,
    pub warning: Option<String>,
}

const CHATML: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";

// Qwen3's Jinja gives the last assistant turn of every training sample an empty think
// block, so a fine-tune without reasoning data learns to open each reply with one; the
// prompt ends with it, as the Jinja renders with thinking off, or replies show it.
const QWEN3: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n<think>\n\n</think>\n\n";

const LLAMA3: &str = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n";

// Mistral has no system role: the system prompt goes before the first user turn.
const MISTRAL: &str = "{{- range $i, $m := .Messages }}\n{{- if eq $m.Role \"user\" }}[INST] {{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]\n{{- else if eq $m.Role \"assistant\" }}{{ $m.Content }}</s>\n{{- end }}\n{{- end }}";

/// Llama 3.1+: the system header is always written, with the lines the Jinja puts
/// before the system prompt (`preamble`, found by rendering it).
fn llama31(preamble: &str) -> String {
    format!(
        "<|start_header_id|>system<|end_header_id|>\n\n{preamble}{{{{ .System }}}}<|eot_id|>\
         {{{{- range .Messages }}}}{{{{ if ne .Role \"system\" }}}}<|start_header_id|>{{{{ .Role }}}}<|end_header_id|>\n\n\
         {{{{ .Content }}}}<|eot_id|>{{{{ end }}}}{{{{ end }}}}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
}

/// Mistral tekken: the system prompt (a conversation's own, else SYSTEM) in its own
/// block, turns without spaces, each reply closed by the EOS token.
fn mistral_tekken(eos: &str) -> String {
    format!(
        "[SYSTEM_PROMPT]{{{{ $.System }}}}[/SYSTEM_PROMPT]{{{{- range .Messages }}}}\
         {{{{- if eq .Role \"user\" }}}}[INST]{{{{ .Content }}}}[/INST]\
         {{{{- else if eq .Role \"assistant\" }}}}{{{{ .Content }}}}{eos}{{{{- end }}}}{{{{- end }}}}"
    )
}

const GENERIC: &str = "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ .Content }}\n\n{{ else if eq .Role \"user\" }}### User:\n{{ .Content }}\n\n{{ else }}### Assistant:\n{{ .Content }}\n\n{{ end }}{{ end }}### Assistant:\n";

impl OllamaTemplate {
    /// A Modelfile for `ollama create -f` with this template, its system prompt and
    /// stops, `num_ctx` when given, and `FROM from` (a GGUF path).
    pub fn modelfile(&self, from: &str, num_ctx: Option<usize>) -> String {
        // Modelfile strings in """ cannot hold """; Ollama's own templates never do.
        let mut out = format!("FROM {from}\nTEMPLATE \"\"\"{}\"\"\"\n", self.template);
        if let Some(system) = &self.system {
            out.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
        }
        for stop in &self.stop {
            let quoted = serde_json::to_string(stop).unwrap_or_default();
            out.push_str(&format!("PARAMETER stop {quoted}\n"));
        }
        if let Some(n) = num_ctx {
            out.push_str(&format!("PARAMETER num_ctx {n}\n"));
        }
        out
    }
}

/// Recognises the chat template's family by its markers and returns the Ollama form.
/// `eos` is the tokenizer's end-of-sequence token, always a stop.
pub fn ollama_template(chat_template: &str, eos: Option<&str>) -> OllamaTemplate {
    let has = |m: &str| chat_template.contains(m);
    let eos_text = eos
        .filter(|e| !e.is_empty() && !e.contains("{{"))
        .unwrap_or("</s>");
    let (family, template, mut stop, system) =
        if has("<|start_header_id|>") && has("Cutting Knowledge Date") {
            (
                TemplateFamily::Llama31,
                // Completed with the rendered preamble by `with_rendered_defaults`.
                LLAMA3.to_string(),
                vec!["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                None,
            )
        } else if has("<|start_header_id|>") {
            (
                TemplateFamily::Llama3,
                LLAMA3.to_string(),
                vec!["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                None,
            )
        } else if has("<|im_start|>") && has("<think>") {
            (
                TemplateFamily::Qwen3,
                QWEN3.to_string(),
                vec!["<|im_end|>", "<|im_start|>"],
                chatml_default_system(chat_template),
            )
        } else if has("<|im_start|>") {
            (
                TemplateFamily::ChatMl,
                CHATML.to_string(),
                vec!["<|im_end|>", "<|im_start|>"],
                chatml_default_system(chat_template),
            )
        } else if has("[SYSTEM_PROMPT]") && has("[INST]") {
            (
                TemplateFamily::MistralTekken,
                mistral_tekken(eos_text),
                vec!["[INST]", "[/INST]"],
                None,
            )
        } else if has("[INST]") {
            (
                TemplateFamily::Mistral,
                MISTRAL.to_string(),
                vec!["[INST]", "[/INST]"],
                None,
            )
        } else {
            (
                TemplateFamily::Generic,
                GENERIC.to_string(),
                vec!["### User:"],
                None,
            )
        };
    let mut stop: Vec<String> = stop.drain(..).map(String::from).collect();
    if let Some(eos) = eos.filter(|e| !e.is_empty()) {
        if !stop.iter().any(|s| s == eos) {
            stop.push(eos.to_string());
        }
    }
    let warning = (family == TemplateFamily::Generic).then(|| {
        "the model's chat template is not one Backpropagate recognises (ChatML, Qwen3, \
         Llama 3, Mistral): it was pushed with a generic `### User:` template, so replies \
         may not match how the model was trained; pass --template FILE with a Go template \
         written for this model"
            .to_string()
    });
    OllamaTemplate {
        family,
        template,
        system,
        stop,
        warning,
    }
}

impl OllamaTemplate {
    /// Fills in what only rendering the model's Jinja tells: the system prompt it writes
    /// when a conversation has none (ChatML, Qwen3, tekken), and Llama 3.1's header
    /// lines. A Llama 3.1 template that does not render falls back to plain Llama 3,
    /// with a warning.
    pub fn with_rendered_defaults(mut self, chat: &crate::data::ChatTemplate) -> Self {
        match self.family {
            TemplateFamily::ChatMl | TemplateFamily::Qwen3 => {
                if let Some(system) = rendered_default_system(chat) {
                    self.system = Some(system);
                }
            }
            TemplateFamily::MistralTekken => {
                self.system = rendered_between(chat, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
                    .filter(|s| !s.is_empty());
            }
            TemplateFamily::Llama31 => {
                let header = "<|start_header_id|>system<|end_header_id|>\n\n";
                match rendered_between(chat, header, "<|eot_id|>") {
                    Some(preamble) if !preamble.contains("{{") => {
                        self.template = llama31(&preamble);
                    }
                    _ => {
                        self.family = TemplateFamily::Llama3;
                        self.warning = Some(
                            "the model's Llama 3.1 chat template did not render its system \
                             header (knowledge and date lines), so it was pushed with the plain \
                             Llama 3 template: replies may differ slightly from training; pass \
                             --template FILE to set the header yourself"
                                .into(),
                        );
                    }
                }
            }
            _ => {}
        }
        self
    }
}

/// The text the Jinja writes between `open` and `close` for a conversation of one user
/// turn with no system message (what training saw there), if the template renders.
fn rendered_between(chat: &crate::data::ChatTemplate, open: &str, close: &str) -> Option<String> {
    use crate::data::{Message, Role};
    let marker = "\u{1}user turn\u{1}";
    let text = chat
        .render(&[Message::new(Role::User, marker)], false)
        .ok()?;
    let start = text.find(open)? + open.len();
    let end = start + text[start..].find(close)?;
    let between = &text[start..end];
    (!between.contains(marker)).then(|| between.to_string())
}

/// `'<|im_start|>system\nYou are a helpful assistant.<|im_end|>'` inside the Jinja
/// source is the default system prompt (Qwen2's template inserts it when none is given).
/// The system prompt a ChatML template writes when the conversation has none, found by
/// rendering it (Jinja) with one user turn: what training saw. Qwen2.5's default ("You
/// are Qwen, created by Alibaba Cloud…") sits in a branch of the template that reading
/// its first `<|im_start|>system` does not find.
pub fn rendered_default_system(chat: &crate::data::ChatTemplate) -> Option<String> {
    rendered_between(chat, "<|im_start|>system\n", "<|im_end|>").filter(|s| !s.is_empty())
}

fn chatml_default_system(src: &str) -> Option<String> {
    let start = src
        .find("<|im_start|>system\\n")
        .map(|i| i + "<|im_start|>system\\n".len())
        .or_else(|| {
            src.find("<|im_start|>system\n")
                .map(|i| i + "<|im_start|>system\n".len())
        })?;
    let end = start + src[start..].find("<|im_end|>")?;
    let text = &src[start..end];
    // Only a literal sentence counts, not template code that inserts a variable.
    if text.is_empty() || text.contains("{{") || text.contains('\'') || text.contains('+') {
        return None;
    }
    Some(text.replace("\\n", "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, QWEN2_TEMPLATE};

    /// Qwen2.5's structure: the default system prompt only in the branch without tools
    /// and without a system message. Reading the template text finds the branch that
    /// inserts the user's system message; rendering finds the default.
    #[test]
    fn the_default_system_prompt_is_the_one_the_template_renders() {
        let qwen25 = "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}{{- '<|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
        assert_eq!(
            chatml_default_system(qwen25),
            None,
            "reading the text misses it"
        );
        let chat = crate::data::ChatTemplate::new(
            qwen25,
            crate::data::TemplateSource::FallbackChatml,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            rendered_default_system(&chat).as_deref(),
            Some("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        );
        // A template without a default system prompt has none.
        let plain = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}";
        let chat = crate::data::ChatTemplate::new(
            plain,
            crate::data::TemplateSource::FallbackChatml,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(rendered_default_system(&chat), None);
    }

    #[test]
    fn chatml_keeps_qwen2_default_system_prompt() {
        let t = ollama_template(QWEN2_TEMPLATE, Some("<|endoftext|>"));
        assert_eq!(t.family, TemplateFamily::ChatMl);
        assert_eq!(t.system.as_deref(), Some("You are a helpful assistant."));
        assert_eq!(t.stop, vec!["<|im_end|>", "<|im_start|>", "<|endoftext|>"]);
        assert!(t.warning.is_none());
    }

    #[test]
    fn llama3_and_mistral_are_recognised() {
        let l = ollama_template(LLAMA3_TEMPLATE, Some("<|eot_id|>"));
        assert_eq!(l.family, TemplateFamily::Llama3);
        assert_eq!(l.stop.iter().filter(|s| *s == "<|eot_id|>").count(), 1);
        let m = ollama_template(MISTRAL_TEMPLATE, Some("</s>"));
        assert_eq!(m.family, TemplateFamily::Mistral);
        assert!(m.stop.contains(&"</s>".to_string()));
    }

    #[test]
    fn qwen3_thinking_template_is_its_own_family() {
        let src = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if '<think>' in m.content %}{% endif %}{{ m.content }}<|im_end|>\n{%- endfor %}";
        assert_eq!(ollama_template(src, None).family, TemplateFamily::Qwen3);
    }

    fn chat(src: &str) -> crate::data::ChatTemplate {
        crate::data::ChatTemplate::new(src, crate::data::TemplateSource::FallbackChatml, Vec::new())
            .unwrap()
    }

    /// Llama 3.1's header lines and tekken's default system prompt come from rendering
    /// the real templates (tests/python checks the prompts against transformers).
    #[test]
    fn llama31_header_and_tekken_system_come_from_rendering() {
        let src = include_str!("../../../../tests/python/chat_templates/llama3.1.jinja");
        let t = ollama_template(src, Some("<|eot_id|>")).with_rendered_defaults(&chat(src));
        assert_eq!(t.family, TemplateFamily::Llama31);
        assert!(t.template.starts_with("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>"), "{}", t.template);
        assert!(t.warning.is_none());

        let src = include_str!("../../../../tests/python/chat_templates/mistral-small-3.1.jinja");
        let t = ollama_template(src, Some("</s>")).with_rendered_defaults(&chat(src));
        assert_eq!(t.family, TemplateFamily::MistralTekken);
        assert!(t.system.unwrap().starts_with("You are Mistral Small 3"));
        assert!(t.template.contains("{{ .Content }}</s>"));

        // A 3.1 template that cannot render its header falls back to Llama 3, saying so.
        let broken = "<|start_header_id|>{{ raise_exception('no') }}Cutting Knowledge Date";
        let t = ollama_template(broken, None).with_rendered_defaults(&chat(broken));
        assert_eq!(t.family, TemplateFamily::Llama3);
        assert!(t.warning.unwrap().contains("--template"));
    }

    #[test]
    fn unknown_templates_warn_and_still_stop() {
        let t = ollama_template("{{ messages[0].content }}<END>", Some("<END>"));
        assert_eq!(t.family, TemplateFamily::Generic);
        assert!(t.warning.as_deref().unwrap().contains("--template"));
        assert!(t.stop.contains(&"<END>".to_string()));
    }
}
