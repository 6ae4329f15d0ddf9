//! Ollama model names: `[host/][namespace/]model[:tag]`, checked before anything slow
//! happens so a typo does not cost an export.

use super::OllamaError;

/// Checks `name` the way Ollama's name parser does: every part starts with a letter,
/// digit or `_` and goes on with those, `-` and `.` (no `.` in the namespace), 1–80
/// bytes; the host part takes host characters and a port. Tags Ollama re-reads as a
/// place rather than a version (`cloud`, `local`, `*-cloud`) are refused: `show`,
/// `chat` and `delete` would not find the model under them.
pub fn validate_name(name: &str) -> Result<(), OllamaError> {
    let bad = |reason: &str| OllamaError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    let (path, tag) = match name.rsplit_once(':') {
        // A colon inside the host part (host:port/...) is not a tag separator.
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (name, None),
    };
    if let Some(tag) = tag {
        check_part(tag, true).map_err(|r| bad(&format!("tag `{tag}` {r}")))?;
        let lower = tag.to_ascii_lowercase();
        if lower == "cloud" || lower == "local" || lower.ends_with("-cloud") {
            return Err(bad(&format!(
                "tag `{tag}` names where Ollama runs a model, not a version: pick another tag"
            )));
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 3 {
        return Err(bad("it has more than three `/`-separated parts"));
    }
    let model = parts[parts.len() - 1];
    check_part(model, true).map_err(|r| bad(&format!("model part `{model}` {r}")))?;
    if parts.len() >= 2 {
        let ns = parts[parts.len() - 2];
        check_part(ns, false).map_err(|r| bad(&format!("namespace `{ns}` {r}")))?;
    }
    if parts.len() == 3 {
        let host = parts[0];
        if host.is_empty() || host.len() > 350 {
            return Err(bad("the host part is empty or too long"));
        }
        if let Some(c) = host
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
        {
            return Err(bad(&format!("the host part contains `{c}`")));
        }
    }
    Ok(())
}

/// A model, namespace or tag part: 1–80 bytes, a letter, digit or `_` first, then
/// those, `-` and (`dots`) `.`.
fn check_part(part: &str, dots: bool) -> Result<(), String> {
    if part.is_empty() {
        return Err("is empty".into());
    }
    if part.len() > 80 {
        return Err("is longer than 80 bytes".into());
    }
    let first = part.chars().next().unwrap_or('-');
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Err("must start with a letter, a digit or `_`".into());
    }
    if let Some(c) = part
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || (dots && c == '.')))
    {
        return Err(if c == '.' {
            "contains `.`, which Ollama does not allow in a namespace".into()
        } else {
            format!("contains `{c}`")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ollama_style_names() {
        for ok in [
            "my-model",
            "my-model:v1",
            "me/my_model:latest",
            "registry.local/me/m:1.0",
            "localhost:5000/me/m:1",
            "qwen2.5:0.5b",
            "_private/_model:_tag",
        ] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_what_ollama_rejects() {
        for bad in [
            "",
            "-x",
            "my model",
            "a/b/c/d",
            "m:",
            "m:bad tag",
            "é",
            ":tag",
            "my.ns/model",
            "m:cloud",
            "m:LOCAL",
            "m:gpt-oss-cloud",
            "bad host!/me/m",
            &"x".repeat(81),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
