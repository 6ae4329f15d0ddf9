//! The f32 values of CPU tensors, as the fused ops read them: borrowed from a
//! contiguous storage, or (for frozen weights kept in bf16/f16) widened into a
//! transient buffer. One place for the layout checks every fused op needs.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

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

/// [`with_values`] for a frozen weight that may be kept in bf16/f16: those are widened
/// into a transient buffer (exactly: every bf16/f16 value is an f32).
pub fn with_f32<R>(w: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if w.dtype() == DType::F32 {
        return with_values(w, f);
    }
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused CPU op: runs on the CPU only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fused CPU op: needs a contiguous weight");
    };
    let mut wide = vec![0f32; end - start];
    match cpu {
        CpuStorage::BF16(v) => widen(&v[start..end], &mut wide, |x| x.to_f32()),
        CpuStorage::F16(v) => widen(&v[start..end], &mut wide, |x| x.to_f32()),
        _ => bail!("fused CPU op: takes f32, bf16 or f16 weights"),
    }
    f(&wide)
}

fn widen<T: Copy + Sync>(src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s)));
}
