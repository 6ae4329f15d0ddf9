//! Bounds on request work: how many uploads and data checks may run at once
//! ([`Slots`]), a request's cancel flag and wall-clock budget ([`RequestBudget`]), and
//! the streamed dataset upload ([`DatasetUpload`]) that never holds a file in memory.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::dto::UploadedDataset;
use crate::error::{ErrorKind, Result, ServiceError};

/// A counted pool: `try_take` hands out at most `max` guards at a time.
#[derive(Clone)]
pub(crate) struct Slots {
    used: Arc<AtomicUsize>,
    max: usize,
}

pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    pub(crate) fn new(max: usize) -> Self {
        Slots {
            used: Arc::new(AtomicUsize::new(0)),
            max: max.max(1),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn try_take(&self) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.used.clone()))
    }
}

/// Lets blocking work stop early: the face cancels it when the client goes away (see
/// [`RequestBudget::cancel_on_drop`]), and it gives up by itself past its deadline.
#[derive(Clone)]
pub struct RequestBudget {
    cancelled: Arc<AtomicBool>,
    deadline: Option<Instant>,
    limit: Duration,
}

/// Cancels its budget when dropped: hold one in the request's future, so that dropping
/// the future (the client disconnected) stops the work on the blocking thread.
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl RequestBudget {
    pub fn new(limit: Duration) -> Self {
        RequestBudget {
            cancelled: Arc::new(AtomicBool::new(false)),
            deadline: Instant::now().checked_add(limit),
            limit,
        }
    }

    /// No deadline and no cancel: for a face whose caller waits anyway (the desktop).
    pub fn unbounded() -> Self {
        RequestBudget {
            cancelled: Arc::new(AtomicBool::new(false)),
            deadline: None,
            limit: Duration::MAX,
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.cancelled.clone())
    }

    /// Err once cancelled or past the deadline; `what` names the call for the message.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                format!("{what} was stopped: the client went away"),
            ));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "{what} took longer than its {} s limit and was stopped",
                    self.limit.as_secs()
                ),
            )
            .hint("Check a smaller file, or run `backprop data check` on the machine itself."));
        }
        Ok(())
    }
}

/// An upload being written to a temporary file beside its final place. It owns one of
/// the service's upload slots; dropping it unfinished (the client went away, the cap was
/// passed) removes the partial file.
pub struct DatasetUpload {
    pub(crate) tmp: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) stem: String,
    pub(crate) file: Option<File>,
    pub(crate) hasher: Sha256,
    pub(crate) written: u64,
    pub(crate) limit: u64,
    pub(crate) _slot: Slot,
}

pub(crate) fn too_large(limit: u64) -> ServiceError {
    ServiceError::new(
        ErrorKind::TooLarge,
        format!(
            "the upload is larger than this server's {} limit",
            human_bytes(limit)
        ),
    )
    .hint(
        "Copy the file to the server and give its path instead, or start `backprop serve` \
         with a larger --max-upload-mib.",
    )
}

pub(crate) fn human_bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

impl DatasetUpload {
    /// Appends a chunk; past the size cap the upload fails (and its file goes away when
    /// this is dropped).
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.written += chunk.len() as u64;
        if self.written > self.limit {
            return Err(too_large(self.limit));
        }
        self.hasher.update(chunk);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| ServiceError::new(ErrorKind::Internal, "upload already finished"))?;
        file.write_all(chunk).map_err(|e| self.io_error(e))
    }

    /// Makes the upload durable under `<sha256 prefix>-<name>` and returns its path.
    pub fn finish(mut self) -> Result<UploadedDataset> {
        let hash = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
        let path = self.dir.join(format!("{}-{}", &hash[..12], self.stem));
        let file = self
            .file
            .take()
            .ok_or_else(|| ServiceError::new(ErrorKind::Internal, "upload already finished"))?;
        file.sync_all().map_err(|e| self.io_error(e))?;
        drop(file);
        // Same content, same name: the first copy stays and this one goes.
        if !path.is_file() {
            std::fs::rename(&self.tmp, &path).map_err(|e| self.io_error(e))?;
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        Ok(UploadedDataset {
            path: path.display().to_string(),
        })
    }

    fn io_error(&self, e: std::io::Error) -> ServiceError {
        ServiceError::new(
            ErrorKind::Internal,
            format!("cannot write the upload to {}: {e}", self.tmp.display()),
        )
        .hint("Check the free space and permissions of the datasets folder next to the runs dir.")
    }
}

impl Drop for DatasetUpload {
    fn drop(&mut self) {
        // Also runs after a successful rename, when the temporary name is already gone.
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
    }
}
