//! The part of Go's `text/template` parser that Ollama's create runs on a TEMPLATE:
//! actions must close, blocks (`if`, `range`, `with`, `define`, `block`) must end, and
//! `else`/`end` must have a block to belong to. Errors read as Go prints them
//! (`template: :LINE: …`), which Ollama passes on as the create error.

const OPENERS: [&str; 5] = ["if", "range", "with", "define", "block"];

/// Checks `text` as Go's parser would, for the errors a hand-written TEMPLATE makes.
pub fn check(text: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = text;
    let line_of = |at: &str| text[..text.len() - at.len()].matches('\n').count() + 1;
    while let Some(start) = rest.find("{{") {
        let action = &rest[start + 2..];
        let line = line_of(action);
        let trimmed = action.strip_prefix("- ").unwrap_or(action);
        if let Some(comment) = trimmed.strip_prefix("/*") {
            let Some(c) = comment.find("*/") else {
                return Err(format!("template: :{line}: unclosed comment"));
            };
            let tail = &comment[c + 2..];
            let Some(after) = tail.strip_prefix(" -").unwrap_or(tail).strip_prefix("}}") else {
                return Err(format!(
                    "template: :{line}: comment ends before closing delimiter"
                ));
            };
            rest = after;
            continue;
        }
        let Some(end) = find_close(action) else {
            return Err(format!("template: :{line}: unclosed action"));
        };
        let body = action[..end]
            .trim_start_matches('-')
            .trim_end_matches('-')
            .trim();
        rest = &action[end + 2..];
        let word = body.split_whitespace().next().unwrap_or("");
        match word {
            w if OPENERS.contains(&w) => open.push(w),
            "else" if !matches!(open.last(), Some(&("if" | "range" | "with"))) => {
                return Err(format!("template: :{line}: unexpected {{{{else}}}}"));
            }
            "end" if open.pop().is_none() => {
                return Err(format!("template: :{line}: unexpected {{{{end}}}}"));
            }
            "" => return Err(format!("template: :{line}: missing value for command")),
            _ => {}
        }
    }
    if !open.is_empty() {
        return Err(format!("template: :{}: unexpected EOF", line_of("")));
    }
    Ok(())
}

/// Where the action's closing `}}` is, skipping quoted strings (which may hold `}}`).
fn find_close(action: &str) -> Option<usize> {
    let bytes = action.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn parses_ollamas_own_templates_and_refuses_broken_ones() {
        let chatml = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
        assert_eq!(check(chatml), Ok(()));
        assert_eq!(
            check("{{ if .System }}{{ .System }}{{ else }}x{{ end }}{{/* c }} */}}"),
            Ok(())
        );
        assert_eq!(check(r#"{{ "}}" }}"#), Ok(()));
        assert_eq!(
            check("a\n{{ range .Messages }}"),
            Err("template: :2: unexpected EOF".into())
        );
        assert_eq!(
            check("{{ end }}"),
            Err("template: :1: unexpected {{end}}".into())
        );
        assert_eq!(
            check("x\n\n{{ .Prompt"),
            Err("template: :3: unclosed action".into())
        );
        assert_eq!(
            check("{{ else }}"),
            Err("template: :1: unexpected {{else}}".into())
        );
        assert_eq!(
            check("{{ }}"),
            Err("template: :1: missing value for command".into())
        );
        assert_eq!(
            check("{{/* c"),
            Err("template: :1: unclosed comment".into())
        );
    }
}
