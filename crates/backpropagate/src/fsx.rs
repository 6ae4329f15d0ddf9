//! Durable file writes: a crash or a full disk never leaves a half-written file under
//! the final name.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// A suffix no other temporary name of this machine uses at the same time: the
/// process id alone is shared by the threads of one process (two pulls of one model,
/// two jobs of `serve`), which would write into and rename each other's temp files.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, then renames it over
/// `path` (atomic on the same filesystem). On failure the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| out.write_all(bytes))
}

/// [`write_atomic`] with the content written by `fill` (through a buffer), for files
/// too large to hold in memory whole.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let (dir, name) = folder_and_name(path);
    let tmp = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let result = (|| {
        let mut out = std::io::BufWriter::new(File::create(&tmp)?);
        fill(&mut out)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes named f32 tensors (name, shape, row-major values) as a safetensors file,
/// atomically, with the `format: pt` metadata transformers expects.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), data) in tensors.iter().zip(&bytes) {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map_err(|e| Error::model(path, format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let out = safetensors::serialize(views, metadata)
        .map_err(|e| Error::model(path, format!("cannot serialize tensors: {e}")))?;
    write_atomic(path, &out)
}

/// One tensor of a safetensors file written by [`write_safetensors_streamed`]: its
/// name, safetensors dtype (`"F32"`, `"F16"`, `"BF16"`, `"U8"`), shape and byte size.
pub struct TensorSlot {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// Writes a safetensors file one tensor at a time: `fill(i, out)` writes tensor `i`'s
/// bytes, so only one tensor is in memory however large the file (a 7B model read
/// from a GGUF). Each tensor must write exactly its `bytes`; the file is written to a
/// temporary name, fsynced and renamed, with the `format: pt` metadata.
pub fn write_safetensors_streamed(
    path: &Path,
    slots: &[TensorSlot],
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for s in slots {
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, offset + s.bytes]}),
        );
        offset += s.bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    // Data starts 8-aligned, as the safetensors library writes it.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    write_atomic_with(path, |out| {
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(&text)?;
        for (i, s) in slots.iter().enumerate() {
            let mut counted = Counted {
                inner: &mut *out,
                written: 0,
            };
            fill(i, &mut counted).map_err(std::io::Error::other)?;
            if counted.written != s.bytes {
                return Err(std::io::Error::other(format!(
                    "tensor `{}` wrote {} bytes of {}",
                    s.name, counted.written, s.bytes
                )));
            }
        }
        Ok(())
    })
}

struct Counted<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Puts the complete folder `tmp` in place of `dest` (absent or a finished earlier
/// copy): `dest` is moved aside, `tmp` renamed onto it, then the old copy removed. A
/// crash at any point leaves either the old folder, the new one, or none under `dest`,
/// never a mix; a failed rename puts the old one back; a leftover `.tmp-old-*` is
/// cleaned by the next writer of the run.
pub fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    let (dir, name) = folder_and_name(dest);
    sync_dir(tmp);
    let old = dir.join(format!(".tmp-old-{name}-{}", unique_suffix()));
    let moved_aside = match std::fs::rename(dest, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dest, e)),
    };
    if let Err(e) = std::fs::rename(tmp, dest) {
        // Put the finished earlier copy back: the caller removes `tmp`, and a leftover
        // `.tmp-old-*` would be cleaned by the next writer, losing both.
        if moved_aside {
            let _ = std::fs::rename(&old, dest);
        }
        return Err(Error::io(dest, e));
    }
    sync_dir(dir);
    // The new folder is in place: a copy that cannot be removed now is only litter,
    // which the next writer of the run cleans.
    if moved_aside {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Writes the folder `dest` whole: `fill` writes into a fresh `.tmp-<name>-<pid>-<n>`
/// folder beside it, which then replaces `dest` ([`replace_dir`]). On any failure the
/// temporary folder is removed and `dest` is left as it was.
pub fn write_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (dir, name) = folder_and_name(dest);
    let tmp = dir.join(format!(".tmp-{name}-{}", unique_suffix()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let written = std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| fill(&tmp))
        .and_then(|()| replace_dir(&tmp, dest));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// The folder a temporary sibling of `path` goes in, and `path`'s own name.
fn folder_and_name(path: &Path) -> (&Path, std::borrow::Cow<'_, str>) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    (dir, name)
}

/// Opens `path` for reading only if it is a regular file: reading a device such as
/// `/dev/zero` never ends, and opening a FIFO blocks until a writer appears. The path
/// is checked before opening, then the opened file again, so a swap in between is
/// caught too. The refusal is an `InvalidInput` error saying what the path is.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never block in open(2) on a FIFO swapped in after the check above.
        open.custom_flags(libc::O_NONBLOCK);
    }
    let file = open.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok(file)
}

fn not_regular(meta: &std::fs::Metadata) -> std::io::Error {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "a directory"
    } else {
        kind_of_special(&ft)
    };
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("must be a regular file, but this is {kind}"),
    )
}

#[cfg(unix)]
fn kind_of_special(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a named pipe (FIFO)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn kind_of_special(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// The most [`read_capped`] reads of a model folder's text files: real ones are at
/// most a few MB (the largest, tokenizer configs with every added token, ~10 MB).
pub const MAX_MODEL_TEXT: u64 = 64 << 20;

/// Reads a small text file from a model folder (config, tokenizer config, chat
/// template, index): a regular file of at most `max` bytes, never more read into
/// memory, so a hostile or broken folder cannot hang or exhaust a reader.
pub fn read_capped(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let file = open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > max {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "larger than {} MiB, far more than such a file ever holds; this is not a model file",
                    max >> 20
                ),
            ),
        ));
    }
    Ok(text)
}

/// Makes a rename durable. Directories cannot be opened for sync on Windows, where
/// NTFS journals the rename itself, so failure here is not an error.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_writing_one_file_at_once_all_succeed() {
        // Two pulls of one model both write refs/main: with a per-process temp name
        // one thread renamed the other's file away and failed with NotFound.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        write_atomic(&path, format!("{t}-{i}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_replace_dir_keeps_the_finished_folder() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("adapter");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("a"), "finished").unwrap();
        // The new copy vanished (a full disk, a cleaner): the rename onto `dest` fails.
        let err = replace_dir(&dir.path().join(".tmp-gone"), &dest).unwrap_err();
        assert!(err.to_string().contains("adapter"), "{err}");
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "finished");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_dir_swaps_whole_folders_and_leaves_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("adapter");
        for round in ["one", "two"] {
            let tmp = dir.path().join(format!(".tmp-adapter-{round}"));
            std::fs::create_dir(&tmp).unwrap();
            std::fs::write(tmp.join("a"), round).unwrap();
            replace_dir(&tmp, &dest).unwrap();
            assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), round);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["adapter"]);
    }

    #[test]
    fn failure_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("a.json");
        let err = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("missing-dir"), "{err}");
    }
}
