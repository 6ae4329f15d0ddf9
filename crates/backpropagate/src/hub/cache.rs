//! The Hugging Face cache layout, as huggingface_hub writes it, so a model downloaded
//! here is found by transformers (and the other way round):
//! `models--org--name/{refs/<revision>, blobs/<etag>, snapshots/<commit>/<file>}` with
//! snapshot files linking to their blob.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsx::write_atomic;

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

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// The commit a branch or tag name points to, as last downloaded.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| !c.is_empty())
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if is_commit(revision) {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic(&path, commit.as_bytes())
    }

    /// Puts `snapshots/<commit>/<file>` in place: a relative symlink to the blob, or a
    /// copy where symlinks are not allowed (Windows without developer mode), as
    /// huggingface_hub does.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let target = self.snapshot(commit).join(file);
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
        if symlink(&relative, &target).is_err() {
            std::fs::copy(&blob, &target).map_err(|e| Error::io(&target, e))?;
        }
        Ok(target)
    }
}

pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
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
