//! Stopping and pausing a running job from outside it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Asks a running job to stop at the next step boundary (after a checkpoint), or to
/// hold between steps while paused (the thermal guard pauses hot GPUs this way).
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    cancelled: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl CancelToken {
    /// A token whose pause flag is shared with others (one guard pauses every job).
    pub fn with_pause(paused: Arc<AtomicBool>) -> Self {
        CancelToken {
            cancelled: Arc::default(),
            paused,
        }
    }
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst)
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    /// Blocks while paused; a cancel ends the wait.
    pub fn wait_while_paused(&self) {
        while self.is_paused() && !self.is_cancelled() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
