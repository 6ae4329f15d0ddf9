//! Gradient checkpointing: a decoder layer whose activations are not kept for
//! backward but recomputed from its input when backward reaches it.
//!
//! The layer runs as one op on its input. Its forward runs the layer with nothing
//! tracked (so every intermediate is freed as soon as it is used) and keeps only the
//! input; its backward runs the layer again with tracking, from that input, and
//! back-propagates the incoming gradient through it. The layer's LoRA weights are not
//! inputs of the op (a candle op takes at most three), so their gradients from that
//! inner backward are handed to a [`GradSink`] and merged into the outer gradients by
//! [`GradSink::merge_into`]. The recomputed pass draws the same dropout seeds as the
//! first (they are fixed before the op runs), so it computes exactly the same values.

use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, Var};

/// One layer's forward from its input; `track` says whether to build the graph (the
/// recomputation) or not (the first pass).
pub type LayerFn = Arc<dyn Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync>;

/// The LoRA gradients of recomputed layers, waiting to join the outer gradients.
#[derive(Default)]
pub struct GradSink(Mutex<Vec<(Tensor, Tensor)>>);

impl GradSink {
    fn add(&self, var: &Tensor, grad: Tensor) {
        self.0
            .lock()
            .expect("grad sink lock")
            .push((var.clone(), grad));
    }

    /// Drops gradients left by a pass whose backward did not finish (an error, or an
    /// out-of-memory retry), so they cannot leak into the next step.
    pub fn clear(&self) {
        self.0.lock().expect("grad sink lock").clear();
    }

    /// Adds the collected gradients into `store` (summed with any already there) and
    /// empties the sink.
    pub fn merge_into(&self, store: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().expect("grad sink lock"));
        for (var, grad) in pending {
            let sum = match store.get(&var) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            store.insert(&var, sum);
        }
        Ok(())
    }
}

/// Whether layers on `h`'s device can be recomputed (CPU and CUDA).
pub fn supported(h: &Tensor) -> bool {
    h.device().is_cpu() || h.device().is_cuda()
}

/// `run(h)`, keeping only `h` for backward. `vars` are the layer's LoRA weights.
pub fn checkpoint(
    h: &Tensor,
    run: LayerFn,
    vars: Vec<Var>,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    // The op's storage is read as a whole from offset 0.
    let h = if h.is_contiguous() && h.layout().start_offset() == 0 {
        h.clone()
    } else {
        h.copy()?
    };
    // An untracked input (the first layer's embeddings) would make candle skip the
    // op's backward, and with it the layer's LoRA gradients: track it.
    let h = if h.track_op() {
        h
    } else {
        Var::from_tensor(&h)?.into_inner()
    };
    h.apply_op1(Recompute {
        run,
        vars,
        sink: sink.clone(),
    })
}

struct Recompute {
    run: LayerFn,
    vars: Vec<Var>,
    sink: Arc<GradSink>,
}

fn whole(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        bail!("recompute: the layer input must be contiguous from offset 0");
    }
    Ok(())
}

/// The layer's output as a tensor that owns contiguous storage from offset 0.
fn owned(y: Tensor) -> Result<Tensor> {
    if y.is_contiguous() && y.layout().start_offset() == 0 {
        Ok(y)
    } else {
        y.copy()
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        whole(l)?;
        let x = Tensor::from_storage(
            Storage::Cpu(s.clone()),
            l.shape().clone(),
            BackpropOp::none(),
            false,
        );
        let y = owned((self.run)(&x, false)?)?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(out) = &*storage else {
            bail!("recompute: the layer left the CPU");
        };
        Ok((out.clone(), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        whole(l)?;
        let x = Tensor::from_storage(
            Storage::Cuda(s.try_clone(l)?),
            l.shape().clone(),
            BackpropOp::none(),
            false,
        );
        let y = owned((self.run)(&x, false)?)?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cuda(out) = &*storage else {
            bail!("recompute: the layer left the GPU");
        };
        Ok((out.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&x.detach())?;
        let y = (self.run)(x.as_tensor(), true)?;
        // d(Σ y ⊙ g)/dy = g exactly, so this back-propagates the incoming gradient.
        let grads = (y * g.detach())?.sum_all()?.backward()?;
        for var in &self.vars {
            if let Some(grad) = grads.get(var.as_tensor()) {
                self.sink.add(var.as_tensor(), grad.clone());
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
