//! Every supported format parses into the same conversation shape, and every kind of
//! bad input is reported with its line number, what was expected and a fix.

use std::path::{Path, PathBuf};

use backpropagate::data::{
    read_jsonl, Content, DataError, Format, Message, RawDataset, ReadOptions, Role, Severity,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn read(bytes: &[u8]) -> Result<RawDataset, DataError> {
    read_with(bytes, &ReadOptions::default())
}

fn read_with(bytes: &[u8], options: &ReadOptions) -> Result<RawDataset, DataError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "data.jsonl", bytes);
    let result = read_jsonl(&p, options);
    // Reading never writes anything next to the data.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    result
}

/// The problems of an invalid file as (line, message) pairs.
fn problems(bytes: &[u8]) -> Vec<(usize, String)> {
    match read(bytes) {
        Ok(d) => panic!("expected problems, got {} samples", d.samples.len()),
        Err(e) => {
            for p in e.problems() {
                assert_eq!(p.severity, Severity::Error);
                assert!(p.hint.is_some(), "every error has a fix: {p}");
            }
            e.problems()
                .iter()
                .map(|p| (p.line, p.message.clone()))
                .collect()
        }
    }
}

fn chat(d: &RawDataset, i: usize) -> &[Message] {
    match &d.samples[i].content {
        Content::Chat(m) => m,
        Content::Text(_) => panic!("sample {i} is text"),
    }
}

fn m(role: Role, content: &str) -> Message {
    Message::new(role, content)
}

#[test]
fn alpaca_with_and_without_input_becomes_user_assistant_turns() {
    let d = read(
        br#"{"instruction": "Sort these", "input": "b, a", "output": "a, b"}
{"instruction": "Say hi", "input": "", "output": "Hi!"}
{"instruction": "Greet", "output": "Hello", "system": "Be warm."}
"#,
    )
    .unwrap();
    assert_eq!(d.format, Format::Alpaca);
    assert_eq!(
        chat(&d, 0),
        [
            m(Role::User, "Sort these\n\nb, a"),
            m(Role::Assistant, "a, b")
        ]
    );
    assert_eq!(
        chat(&d, 1),
        [m(Role::User, "Say hi"), m(Role::Assistant, "Hi!")]
    );
    assert_eq!(
        chat(&d, 2),
        [
            m(Role::System, "Be warm."),
            m(Role::User, "Greet"),
            m(Role::Assistant, "Hello")
        ]
    );
    assert_eq!(d.samples[2].line, 3);
}

#[test]
fn messages_multi_turn_and_text_parts() {
    let d = read(br#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": [{"type": "text", "text": "U"}, {"type": "text", "text": "2"}]}, {"role": "assistant", "content": "A2"}]}
"#).unwrap();
    assert_eq!(d.format, Format::Messages);
    assert_eq!(
        chat(&d, 0),
        [
            m(Role::System, "S"),
            m(Role::User, "U1"),
            m(Role::Assistant, "A1"),
            m(Role::User, "U2"),
            m(Role::Assistant, "A2")
        ]
    );
}

#[test]
fn sharegpt_roles_map_to_chat_roles() {
    let d = read(br#"{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
"#).unwrap();
    assert_eq!(d.format, Format::Sharegpt);
    assert_eq!(
        chat(&d, 0),
        [
            m(Role::System, "S"),
            m(Role::User, "Q"),
            m(Role::Assistant, "A")
        ]
    );
}

#[test]
fn prompt_completion_and_text() {
    let d = read(b"{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n").unwrap();
    assert_eq!(d.format, Format::PromptCompletion);
    assert_eq!(
        chat(&d, 0),
        [m(Role::User, "2+2?"), m(Role::Assistant, "4")]
    );
    let d = read(b"{\"text\": \"Once upon a time.\"}\n\n{\"text\": \"The end.\"}\n").unwrap();
    assert_eq!(d.format, Format::Text);
    assert_eq!(d.samples.len(), 2, "blank lines are skipped");
    assert_eq!(d.samples[1].line, 3);
    assert_eq!(d.samples[1].content, Content::Text("The end.".to_string()));
}

#[test]
fn bundled_samples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples");
    for (file, format, n) in [
        ("alpaca.jsonl", Format::Alpaca, 200),
        ("messages.jsonl", Format::Messages, 200),
        ("sharegpt.jsonl", Format::Sharegpt, 20),
        ("prompt_completion.jsonl", Format::PromptCompletion, 20),
        ("text.jsonl", Format::Text, 20),
    ] {
        let d =
            read_jsonl(&root.join(file), &ReadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.format, format, "{file}");
        assert_eq!(d.samples.len(), n, "{file}");
        assert!(d.warnings.is_empty(), "{file}: {:?}", d.warnings);
    }
}

#[test]
fn malformed_json_names_line_and_column() {
    let p = problems(
        b"{\"text\": \"ok\"}\n{\"text\": \"broken}\n{\"text\": \"fine\"}\n{\"text\": \"a\",}\n",
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].0, 2);
    assert!(p[0].1.starts_with("not valid JSON"), "{}", p[0].1);
    assert!(p[0].1.contains("column"), "{}", p[0].1);
    assert_eq!(p[1].0, 4);
}

#[test]
fn a_json_array_file_gets_the_jq_hint() {
    let e = read(b"[{\"text\": \"a\"},\n{\"text\": \"b\"}]\n").unwrap_err();
    let first = &e.problems()[0];
    assert_eq!(first.line, 1);
    assert!(first.hint.as_deref().unwrap().contains("jq -c"), "{first}");
}

#[test]
fn missing_fields_wrong_types_and_empty_content() {
    let p = problems(
        br#"{"instruction": "A", "output": "B"}
{"instruction": "A"}
{"instruction": "A", "output": 42}
{"instruction": "   ", "output": "B"}
{"instruction": "A", "input": ["x"], "output": "B"}
"#,
    );
    assert_eq!(
        p,
        vec![
            (2, "missing field `output`".to_string()),
            (
                3,
                "field `output` must be a string, found a number".to_string()
            ),
            (4, "field `instruction` is empty".to_string()),
            (
                5,
                "field `input` must be a string or absent, found an array".to_string()
            ),
        ]
    );
}

#[test]
fn bad_turns_are_each_reported() {
    let p = problems(
        br#"{"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}
{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}
{"messages": [{"role": "user", "content": "Q"}]}
{"messages": []}
{"messages": "hello"}
{"messages": [{"role": "user"}, {"content": "A"}]}
{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "A"}]}
"#,
    );
    let expect = [
        (1, "turn 2 has unknown role `bot`"),
        (2, "turn 2 has empty `content`"),
        (3, "no assistant turn: nothing for the model to learn from"),
        (4, "`messages` is empty"),
        (
            5,
            "field `messages` must be an array of turns, found a string",
        ),
        (6, "turn 1 is missing `content`"),
        (6, "turn 2 is missing `role`"),
        (7, "turn 1 has a non-text content part"),
    ];
    assert_eq!(
        p,
        expect
            .iter()
            .map(|(l, s)| (*l, s.to_string()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn unknown_sharegpt_role_suggests_sharegpt_names() {
    let e = read(
        br#"{"conversations": [{"from": "human", "value": "Q"}, {"from": "tool", "value": "A"}]}
"#,
    )
    .unwrap_err();
    let p = &e.problems()[0];
    assert_eq!(p.message, "turn 2 has unknown from `tool`");
    assert_eq!(p.hint.as_deref(), Some("use one of: system, human or gpt"));
}

#[test]
fn records_of_no_known_format_list_their_keys() {
    let p = problems(b"{\"question\": \"Q\", \"answer\": \"A\"}\n");
    assert_eq!(p[0].0, 1);
    assert!(p[0].1.contains("question"), "{}", p[0].1);
    let p = problems(b"\"just a string\"\n");
    assert_eq!(
        p,
        vec![(1, "expected a JSON object, found a string".to_string())]
    );
}

#[test]
fn mixed_formats_name_the_first_offending_line() {
    let p = problems(
        br#"{"instruction": "A", "output": "B"}
{"instruction": "C", "output": "D"}
{"text": "plain"}
{"prompt": "p", "completion": "c"}
"#,
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 3);
    assert!(
        p[0].1
            .contains("this record is text but the file started as alpaca on line 1"),
        "{}",
        p[0].1
    );
    assert!(p[0].1.contains("1 more lines"), "{}", p[0].1);
}

#[test]
fn bom_and_crlf_are_handled_with_warnings() {
    let d = read(b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n").unwrap();
    assert_eq!(d.samples.len(), 2);
    assert_eq!(d.samples[1].content, Content::Text("b".into()));
    let w: Vec<_> = d
        .warnings
        .iter()
        .map(|w| (w.line, w.message.as_str()))
        .collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[0].0, 1);
    assert!(w[0].1.contains("byte-order mark"), "{}", w[0].1);
    assert!(
        w[1].1.contains("2 lines end with Windows line endings"),
        "{}",
        w[1].1
    );
    assert!(d.warnings.iter().all(|w| w.severity == Severity::Warning));
}

#[test]
fn invalid_utf8_names_line_and_byte() {
    let p = problems(b"{\"text\": \"ok\"}\n{\"text\": \"caf\xE9\"}\n");
    assert_eq!(
        p,
        vec![(2, "invalid UTF-8 at byte 14 of the line".to_string())]
    );
}

#[test]
fn empty_files_are_refused() {
    for bytes in [&b""[..], b"\n\n   \n", b"\xEF\xBB\xBF"] {
        let p = problems(bytes);
        assert_eq!(
            p,
            vec![(0, "the file is empty: no records found".to_string())]
        );
    }
}

#[test]
fn a_huge_line_is_rejected_without_holding_it() {
    let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 3 << 20));
    bytes.extend(b"\"}\n{\"text\": \"after\"}\n");
    let options = ReadOptions {
        max_line_bytes: 1 << 20,
        ..ReadOptions::default()
    };
    let e = read_with(&bytes, &options).unwrap_err();
    let p = &e.problems()[0];
    assert_eq!(p.line, 2);
    assert!(p.message.contains("longer than the 1 MiB limit"), "{p}");
    assert_eq!(e.problems().len(), 1, "line 3 is still read: {e}");
}

#[test]
fn problems_are_capped_and_counted() {
    let bytes = "{\"text\": 1}\n".repeat(250);
    let options = ReadOptions {
        max_problems: 10,
        ..ReadOptions::default()
    };
    match read_with(bytes.as_bytes(), &options).unwrap_err() {
        DataError::Invalid { problems, more, .. } => {
            assert_eq!(problems.len(), 10);
            assert_eq!(more, 240);
            assert_eq!(problems[9].line, 10);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn the_error_message_lists_lines_and_fixes() {
    let e = read(b"{\"instruction\": \"A\"}\n").unwrap_err().to_string();
    assert!(e.contains("data.jsonl: 1 problem found"), "{e}");
    assert!(e.contains("line 1: missing field `output`"), "{e}");
    assert!(e.contains("fix: add a non-empty string"), "{e}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let e = read_jsonl(Path::new("/no/such/file.jsonl"), &ReadOptions::default()).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }));
    assert!(e.to_string().contains("/no/such/file.jsonl"), "{e}");
}
