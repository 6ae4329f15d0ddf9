//! What the CLI prints from outside (dataset text, JSON keys, Ollama replies, model
//! files, engine messages that quote them) goes through [`safe`], so a hostile string
//! cannot drive the user's terminal: no clearing the screen, retitling the window,
//! rewriting earlier lines or hiding text.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every control character shown as an escape (`\x1b`, `\r`, `\u{9b}`) instead
/// of sent raw: C0 and DEL except newline and tab, all of C1, and the Unicode bidi
/// overrides that reorder what is displayed. ESC is always escaped.
pub fn safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if c == '\r' {
            out.push_str("\\r");
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        // Bidi embeddings, overrides and isolates (the "Trojan Source" characters).
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::safe;

    #[test]
    fn control_characters_are_shown_escaped_and_text_is_kept() {
        assert_eq!(safe("plain\ttext\nline"), "plain\ttext\nline");
        assert_eq!(safe("é ✓ 日本"), "é ✓ 日本");
        assert_eq!(safe("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(safe("\u{1b}]0;title\u{7}"), "\\x1b]0;title\\x07");
        assert_eq!(safe("over\rwrite"), "over\\rwrite");
        assert_eq!(safe("csi\u{9b}2J del\u{7f}"), "csi\\u{9b}2J del\\x7f");
        assert_eq!(safe("rtl\u{202e}txt"), "rtl\\u{202e}txt");
        assert!(!safe("\u{1b}\u{1b}").contains('\u{1b}'));
    }
}
