//! Ollama model names: `[host/][namespace/]model[:tag]`, checked before anything slow
//! happens so a typo does not cost an export.

use super::OllamaError;

/// Checks `name` the way Ollama's name parser does (parts, lengths, characters).
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
        check_part(tag, 80, true).map_err(|r| bad(&format!("tag `{tag}` {r}")))?;
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 3 {
        return Err(bad("it has more than three `/`-separated parts"));
    }
    let model = parts[parts.len() - 1];
    check_part(model, 80, false).map_err(|r| bad(&format!("model part `{model}` {r}")))?;
    if parts.len() >= 2 {
        let ns = parts[parts.len() - 2];
        check_part(ns, 80, false).map_err(|r| bad(&format!("namespace `{ns}` {r}")))?;
    }
    if parts.len() == 3 {
        let host = parts[0];
        if host.is_empty() || host.len() > 350 {
            return Err(bad("the host part is empty or too long"));
        }
    }
    Ok(())
}

fn check_part(part: &str, max: usize, is_tag: bool) -> Result<(), String> {
    if part.is_empty() {
        return Err("is empty".into());
    }
    if part.len() > max {
        return Err(format!("is longer than {max} characters"));
    }
    let first = part.chars().next().unwrap_or('-');
    if !(first.is_ascii_alphanumeric() || (is_tag && first == '_')) {
        return Err("must start with a letter or digit".into());
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("contains `{c}`"));
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
            "qwen2.5:0.5b",
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
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
