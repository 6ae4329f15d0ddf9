//! Reading a JSONL file into samples: line splitting with a length cap (a 4 GB
//! one-line file must not take 4 GB of RAM), BOM / CRLF / UTF-8 handling, per-file
//! format detection and validation that reports every bad line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::diagnostic::{Collector, DataError, Diagnostic};
use super::record::{self, Format, Sample};

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Lines longer than this are rejected without being held in memory.
    pub max_line_bytes: usize,
    /// How many errors to keep; the rest are counted.
    pub max_problems: usize,
    /// Text one record may hold. Tokenizing takes ~100× the text in memory, and
    /// training keeps only the first `max_seq_len` tokens anyway.
    pub max_record_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_line_bytes: 16 << 20,
            max_problems: 100,
            max_record_bytes: 2 << 20,
        }
    }
}

/// A valid dataset file: its samples in file order, the format they share, and
/// warnings about things that were fixed on the fly.
#[derive(Debug, Clone, Serialize)]
pub struct RawDataset {
    pub path: PathBuf,
    pub format: Format,
    pub samples: Vec<Sample>,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates a JSONL dataset. Either every record is usable, or the error
/// lists the problems (line, what was expected, how to fix it).
pub fn read_jsonl(path: &Path, options: &ReadOptions) -> Result<RawDataset, DataError> {
    let file = open_regular(path)?;
    read_from(BufReader::with_capacity(1 << 16, file), path, options)
}

/// Opens a dataset only if it is a regular file: `/dev/zero` would be read forever,
/// and opening a FIFO blocks until a writer appears. The path is checked before
/// opening, then the opened file again, so a swap in between is caught too.
pub(crate) fn open_regular(path: &Path) -> Result<File, DataError> {
    crate::fsx::open_regular(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source: if source.kind() == std::io::ErrorKind::InvalidInput {
            // Every face reports an I/O error as a file it cannot read, with this text.
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the dataset {source}; save the data to a .jsonl file and pass that"),
            )
        } else {
            source
        },
    })
}

/// Format of the file, fixed by its first well-formed record.
struct FirstFormat {
    format: Format,
    line: usize,
}

pub(crate) fn read_from<R: Read>(
    reader: BufReader<R>,
    path: &Path,
    options: &ReadOptions,
) -> Result<RawDataset, DataError> {
    let mut lines = CappedLines::new(reader, options.max_line_bytes);
    let mut found = Collector::new(options.max_problems);
    let mut samples = Vec::new();
    let mut first: Option<FirstFormat> = None;
    let mut mixed: Option<(usize, Format)> = None;
    let mut mixed_more = 0usize;
    let mut crlf_lines = 0usize;
    let mut first_crlf = 0usize;
    let mut any_content = false;

    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(source) => {
                return Err(DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let n = line.number;
        if line.too_long {
            any_content = true;
            found.push(Diagnostic::error(
                n,
                format!(
                    "line is longer than the {} MiB limit ({} bytes)",
                    options.max_line_bytes >> 20,
                    line.len
                ),
                "JSONL needs one record per line; if this is a JSON array, convert it with `jq -c '.[]' data.json > data.jsonl`",
            ));
            continue;
        }
        let mut bytes: &[u8] = &line.bytes;
        if let Some(rest) = bytes.strip_suffix(b"\r") {
            bytes = rest;
            crlf_lines += 1;
            if first_crlf == 0 {
                first_crlf = n;
            }
        }
        if let Some(rest) = bytes.strip_prefix(BOM) {
            bytes = rest;
            found.push(Diagnostic::warning(
                n,
                if n == 1 {
                    "file starts with a UTF-8 byte-order mark (BOM); it was ignored".to_string()
                } else {
                    "line starts with a byte-order mark (were files concatenated?); it was ignored"
                        .to_string()
                },
            ));
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                any_content = true;
                found.push(Diagnostic::error(
                    n,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`, or \"Save as… UTF-8\" in your editor)",
                ));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        any_content = true;
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                found.push(json_error(n, text, &e));
                continue;
            }
        };
        if let Some(key) = first_duplicate_key(text) {
            found.push(Diagnostic::warning(
                n,
                format!(
                    "key `{}` appears more than once in this record; only its last value is used",
                    key.chars().take(80).collect::<String>()
                ),
            ));
        }
        let Value::Object(obj) = value else {
            found.push(Diagnostic::error(
                n,
                format!("expected a JSON object, found {}", json_kind(&value)),
                "each line must be one object such as {\"instruction\": \"...\", \"output\": \"...\"}",
            ));
            continue;
        };
        let Some(format) = Format::detect(&obj) else {
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.truncate(8);
            found.push(Diagnostic::error(
                n,
                format!("no known fields (found: {})", keys.join(", ")),
                "use one of the formats: messages, conversations (ShareGPT), instruction/input/output (alpaca), prompt/completion, text",
            ));
            continue;
        };
        match &first {
            None => {
                first = Some(FirstFormat { format, line: n });
            }
            Some(f) if f.format != format => {
                if mixed.is_none() {
                    mixed = Some((n, format));
                } else {
                    mixed_more += 1;
                }
                continue;
            }
            Some(_) => {}
        }
        match record::parse(format, &obj, n) {
            Ok(content) if content_bytes(&content) > options.max_record_bytes => {
                found.push(Diagnostic::error(
                    n,
                    format!(
                        "this record holds {} bytes of text, above the limit of {} KiB per record",
                        content_bytes(&content),
                        options.max_record_bytes >> 10
                    ),
                    "training keeps only the first max_seq_len tokens of a record; split long documents into several records (e.g. by section or paragraph)",
                ));
            }
            Ok(content) => samples.push(Sample { line: n, content }),
            Err(problems) => problems.into_iter().for_each(|p| found.push(p)),
        }
    }

    if let (Some((n, format)), Some(f)) = (&mixed, &first) {
        let others = if mixed_more > 0 {
            format!(" ({mixed_more} more lines after it differ too)")
        } else {
            String::new()
        };
        found.push(Diagnostic::error(
            *n,
            format!(
                "this record is {format} but the file started as {} on line {}; one file must use one format{others}",
                f.format, f.line
            ),
            "split the file by format, or convert these records to the first format",
        ));
    }
    if crlf_lines > 0 {
        found.push(Diagnostic::warning(
            first_crlf,
            format!(
                "{crlf_lines} lines end with Windows line endings (CRLF); they were read as LF"
            ),
        ));
    }
    if !any_content {
        found.push(Diagnostic::error(
            0,
            "the file is empty: no records found",
            "add one JSON object per line, e.g. {\"instruction\": \"Say hi\", \"output\": \"Hi!\"}",
        ));
    }

    let path = path.to_path_buf();
    if found.has_errors() {
        found.errors.sort_by_key(|d| d.line);
        return Err(found.into_error(path));
    }
    let format = first.map(|f| f.format).unwrap_or(Format::Text);
    Ok(RawDataset {
        path,
        format,
        samples,
        warnings: found.warnings,
    })
}

/// Bytes of text in a record, which is what tokenizing costs memory for.
pub(crate) fn content_bytes(content: &record::Content) -> usize {
    match content {
        record::Content::Text(t) => t.len(),
        record::Content::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
    }
}

/// The first key repeated within one object of a JSON text, at any depth. Parsers
/// keep the last value silently; a record with `"output"` twice is almost always a
/// merge or export bug the user wants to hear about.
fn first_duplicate_key(text: &str) -> Option<String> {
    serde_json::from_str::<DuplicateKey>(text).ok()?.0
}

struct DuplicateKey(Option<String>);

impl<'de> serde::Deserialize<'de> for DuplicateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DuplicateKeyVisitor)
    }
}

struct DuplicateKeyVisitor;

impl<'de> serde::de::Visitor<'de> for DuplicateKeyVisitor {
    type Value = DuplicateKey;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<DuplicateKey, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            let inner: DuplicateKey = map.next_value()?;
            if found.is_none() {
                found = inner.0;
                if seen.contains(&key) {
                    found = Some(key);
                } else {
                    seen.insert(key);
                }
            }
        }
        Ok(DuplicateKey(found))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DuplicateKey, A::Error> {
        let mut found = None;
        while let Some(inner) = seq.next_element::<DuplicateKey>()? {
            found = found.or(inner.0);
        }
        Ok(DuplicateKey(found))
    }

    fn visit_bool<E>(self, _: bool) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
    fn visit_unit<E>(self) -> Result<DuplicateKey, E> {
        Ok(DuplicateKey(None))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "an object",
    }
}

fn json_error(line: usize, text: &str, e: &serde_json::Error) -> Diagnostic {
    let trimmed = text.trim_start();
    let hint = if line == 1 && trimmed.starts_with('[') {
        "this looks like a JSON array; JSONL needs one object per line: `jq -c '.[]' data.json > data.jsonl`"
    } else if e.is_eof() {
        "the record ends early; a record split over several lines must be joined onto one line"
    } else if trimmed.starts_with('{') || trimmed.starts_with('[') {
        "check for a missing comma, a trailing comma, or an unescaped quote (write \\\" inside strings)"
    } else {
        "each line must be one JSON object starting with `{`"
    };
    Diagnostic::error(line, format!("not valid JSON: {e}"), hint)
}

/// One physical line, without its `\n`.
struct Line {
    number: usize,
    bytes: Vec<u8>,
    /// Length of the line in bytes, counted even when it was too long to keep.
    len: usize,
    too_long: bool,
}

/// Splits on `\n`, keeping at most `cap` bytes of any line.
struct CappedLines<R: Read> {
    reader: BufReader<R>,
    cap: usize,
    number: usize,
}

impl<R: Read> CappedLines<R> {
    fn new(reader: BufReader<R>, cap: usize) -> Self {
        CappedLines {
            reader,
            cap,
            number: 0,
        }
    }

    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        let mut len = 0usize;
        let mut too_long = false;
        let mut saw_any = false;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                if !saw_any {
                    return Ok(None);
                }
                break;
            }
            saw_any = true;
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            len += chunk.len();
            if !too_long {
                if len > self.cap {
                    too_long = true;
                    bytes = Vec::new();
                } else {
                    bytes.extend_from_slice(chunk);
                }
            }
            let consumed = done.unwrap_or(buf.len());
            self.reader.consume(consumed);
            if done.is_some() {
                break;
            }
        }
        self.number += 1;
        Ok(Some(Line {
            number: self.number,
            bytes,
            len,
            too_long,
        }))
    }
}
