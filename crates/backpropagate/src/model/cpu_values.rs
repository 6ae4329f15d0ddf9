//! The f32 values of CPU tensors, as the fused ops read them, borrowed from a
//! contiguous storage: one place for the layout checks every fused op needs. (Frozen
//! weights kept in fewer bits are read by `frozen_linear`.)

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The values of a contiguous f32 storage.
pub fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("fused CPU op: needs contiguous inputs");
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// A CPU f32 tensor's values (made contiguous first if needed), handed to `f`.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused CPU op: runs on the CPU only");
    };
    values(cpu, layout).and_then(f)
}
