//! `BACKPROP_PROFILE=1`: where a training step's time goes (forward, backward, the
//! fused ops' matrix products, attention and element-wise work within them, the
//! optimizer), logged after every step.
//! Off by default; then each probe is one relaxed load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Clone, Copy)]
pub enum Part {
    Forward = 0,
    Backward = 1,
    /// The GEMMs inside the fused CPU ops (counted within forward and backward); for
    /// bf16 products, the rounding and packing of their operands too.
    Gemm = 2,
    Optimizer = 3,
    /// The fused attention op (its per-head products included).
    Attention = 4,
    /// The fused element-wise ops: RMSNorm, rope, SwiGLU, softmax (and their grads).
    Elementwise = 5,
}

static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Adds the time until it is dropped to a part, when profiling: for op bodies with
/// early returns, where [`timed`]'s closure would not fit.
pub struct Span(Option<(Part, Instant)>);

pub fn span(part: Part) -> Span {
    Span(enabled().then(|| (part, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((part, t)) = self.0 {
            NANOS[part as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("BACKPROP_PROFILE").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

/// Runs `f`, adding its wall time to `part` when profiling.
pub fn timed<R>(part: Part, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let out = f();
    NANOS[part as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// The times gathered since the last call, as one log line, and resets them.
pub fn take_line(step: u64) -> String {
    let s = |p: Part| NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 / 1e9;
    let (fwd, bwd, gemm, opt, attn, elem) = (
        s(Part::Forward),
        s(Part::Backward),
        s(Part::Gemm),
        s(Part::Optimizer),
        s(Part::Attention),
        s(Part::Elementwise),
    );
    format!(
        "profile step {step}: forward {fwd:.3} s, backward {bwd:.3} s, of which fused-op GEMMs {gemm:.3} s, attention {attn:.3} s, fused element-wise {elem:.3} s and other ops {:.3} s; optimizer {opt:.3} s",
        (fwd + bwd - gemm - attn - elem).max(0.0)
    )
}
