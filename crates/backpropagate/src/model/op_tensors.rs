//! Running candle's own ops inside a custom op's forward, on any device: a tensor made
//! from the storage the op is handed (a copy, untracked), and the storage of a
//! result handed back. Ops built this way (recomputed layers, the chunked LM loss on a
//! GPU) need no kernels of their own.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, Layout, Result, Shape, Storage, Tensor};

fn whole(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        bail!("custom op: its input must be contiguous from offset 0");
    }
    Ok(())
}

/// `t` itself when it is contiguous from offset 0 (what [`from_cpu`] and
/// [`into_cpu`] need), else a copy that is.
pub fn owned(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

pub fn from_cpu(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    whole(l)?;
    Ok(Tensor::from_storage(
        Storage::Cpu(s.clone()),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

pub fn into_cpu(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    let t = owned(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(out) = &*storage else {
        bail!("custom op: the result left the CPU");
    };
    Ok((out.clone(), layout.shape().clone()))
}

#[cfg(feature = "cuda")]
pub fn from_cuda(s: &candle_core::CudaStorage, l: &Layout) -> Result<Tensor> {
    whole(l)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(s.try_clone(l)?),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

#[cfg(feature = "cuda")]
pub fn into_cuda(t: &Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    let t = owned(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(out) = &*storage else {
        bail!("custom op: the result left the GPU");
    };
    Ok((out.try_clone(layout)?, layout.shape().clone()))
}
