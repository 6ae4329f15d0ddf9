//! The Hugging Face cache layout, as huggingface_hub writes it, so a model downloaded
//! here is found by transformers (and the other way round):
//! `models--org--name/{refs/<revision>, blobs/<etag>, snapshots/<commit>/<file>}` with
//! snapshot files linking to their blob.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsx::write_atomic;
use crate::safe_path::confined_join;

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub` (on every OS, as
/// huggingface_hub does).
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(c);
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join("hub");
    }
    dirs::home_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

pub struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    pub fn new(cache: &Path, repo_id: &str) -> Self {
        RepoCache {
            root: cache.join(format!("models--{}", repo_id.replace('/', "--"))),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `etag` must be a plain name (see `is_etag`).
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// The lock a writer of blob `etag` holds, where huggingface_hub keeps it
    /// (`<cache>/.locks/models--org--name/<etag>.lock`, flock on Unix): a download in
    /// Python and one here never write the same blob at once either.
    pub fn lock_path(&self, etag: &str) -> PathBuf {
        let cache = self.root.parent().unwrap_or(Path::new("."));
        let name = self.root.file_name().unwrap_or_default();
        cache.join(".locks").join(name).join(format!("{etag}.lock"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// `snapshots/<commit>/<file>`, or why that name cannot be one: the commit must be
    /// 40 hex digits and the file a plain relative name, since both come from the hub.
    pub fn entry(&self, commit: &str, file: &str) -> Result<PathBuf, &'static str> {
        if !is_commit(commit) {
            return Err("is not a 40-hex commit id");
        }
        confined_join(&self.snapshot(commit), file)
    }

    /// The commit a branch or tag name points to, as last downloaded (a ref file that
    /// does not hold a commit id counts as absent).
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let path = confined_join(&self.root.join("refs"), revision).ok()?;
        let text = std::fs::read_to_string(path).ok()?;
        Some(text.trim().to_string()).filter(|c| is_commit(c))
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if is_commit(revision) {
            return Ok(());
        }
        let path = confined_join(&self.root.join("refs"), revision).map_err(|why| {
            Error::InvalidOption(format!(
                "revision `{revision}` {why}; give a branch, tag or commit id"
            ))
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic(&path, commit.as_bytes())
    }

    /// Puts `snapshots/<commit>/<file>` in place: a relative symlink to the blob, or a
    /// copy where symlinks are not allowed (Windows without developer mode) or not
    /// wanted (`symlinks` false), as huggingface_hub does. Refuses names that would
    /// land outside the snapshot, whichever way the file is placed.
    pub fn link(&self, commit: &str, file: &str, etag: &str, symlinks: bool) -> Result<PathBuf> {
        let target = self.entry(commit, file).map_err(|why| {
            Error::InvalidOption(format!(
                "snapshot entry `{commit}/{file}` {why}; refusing to write outside {}",
                self.root.display()
            ))
        })?;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let blob = self.blob(etag);
        if target.symlink_metadata().is_ok() {
            std::fs::remove_file(&target).map_err(|e| Error::io(&target, e))?;
        }
        let depth = file.matches('/').count() + 2;
        let relative: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(etag);
        if !symlinks || symlink(&relative, &target).is_err() {
            // Copied beside the entry and renamed over it: never a half copy under the
            // final name, and never a copy through a link that appeared meanwhile
            // (which would truncate the blob it points to).
            let name = target.file_name().unwrap_or_default().to_string_lossy();
            let tmp = target.with_file_name(format!(".{name}.tmp-{}", crate::fsx::unique_suffix()));
            let copied = std::fs::copy(&blob, &tmp)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &target));
            if let Err(e) = copied {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(&target, e));
            }
        }
        Ok(target)
    }
}

pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// ETags name blobs: the hub's are sha256 (LFS) or git sha1 hex; mirrors may add `-`
/// and `.` (S3 multipart). Anything else could name a path.
pub fn is_etag(etag: &str) -> bool {
    (1..=128).contains(&etag.len())
        && !etag.starts_with('.')
        && etag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(unix)]
fn symlink(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(src, dst)
}

#[cfg(windows)]
fn symlink(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(src, dst)
}

#[cfg(not(any(unix, windows)))]
fn symlink(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("no symlinks"))
}
