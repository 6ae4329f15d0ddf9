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
    /// `[INST] ... [/INST]` with no system role (Mistral Instruct v0.1–v0.3).
    Mistral,
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

// Qwen3 without tools runs on plain ChatML; what differs is recognising it.
const QWEN3: &str = CHATML;

const LLAMA3: &str = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n";

// Mistral has no system role: the system prompt goes before the first user turn.
const MISTRAL: &str = "{{- range $i, $m := .Messages }}\n{{- if eq $m.Role \"user\" }}[INST] {{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]\n{{- else if eq $m.Role \"assistant\" }}{{ $m.Content }}</s>\n{{- end }}\n{{- end }}";

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
    let (family, template, mut stop, system) = if has("<|start_header_id|>") {
        (
            TemplateFamily::Llama3,
            LLAMA3,
            vec!["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
            None,
        )
    } else if has("<|im_start|>") && has("<think>") {
        (
            TemplateFamily::Qwen3,
            QWEN3,
            vec!["<|im_end|>", "<|im_start|>"],
            chatml_default_system(chat_template),
        )
    } else if has("<|im_start|>") {
        (
            TemplateFamily::ChatMl,
            CHATML,
            vec!["<|im_end|>", "<|im_start|>"],
            chatml_default_system(chat_template),
        )
    } else if has("[INST]") {
        (
            TemplateFamily::Mistral,
            MISTRAL,
            vec!["[INST]", "[/INST]"],
            None,
        )
    } else {
        (TemplateFamily::Generic, GENERIC, vec!["### User:"], None)
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
        template: template.to_string(),
        system,
        stop,
        warning,
    }
}

/// `'<|im_start|>system\nYou are a helpful assistant.<|im_end|>'` inside the Jinja
/// source is the default system prompt (Qwen2's template inserts it when none is given).
/// The system prompt a ChatML template writes when the conversation has none, found by
/// rendering it (Jinja) with one user turn: what training saw. Qwen2.5's default ("You
/// are Qwen, created by Alibaba Cloud…") sits in a branch of the template that reading
/// its first `<|im_start|>system` does not find.
pub fn rendered_default_system(chat: &crate::data::ChatTemplate) -> Option<String> {
    use crate::data::{Message, Role};
    let marker = "\u{1}user turn\u{1}";
    let text = chat
        .render(&[Message::new(Role::User, marker)], false)
        .ok()?;
    let rest = text.trim_start().strip_prefix("<|im_start|>system\n")?;
    let end = rest.find("<|im_end|>")?;
    let system = &rest[..end];
    (!system.is_empty() && !system.contains(marker)).then(|| system.to_string())
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

    #[test]
    fn unknown_templates_warn_and_still_stop() {
        let t = ollama_template("{{ messages[0].content }}<END>", Some("<END>"));
        assert_eq!(t.family, TemplateFamily::Generic);
        assert!(t.warning.as_deref().unwrap().contains("--template"));
        assert!(t.stop.contains(&"<END>".to_string()));
    }
}
