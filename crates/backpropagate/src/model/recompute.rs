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

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};

use super::op_tensors::{from_cpu, into_cpu, owned};
#[cfg(feature = "cuda")]
use super::op_tensors::{from_cuda, into_cuda};

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

/// Whether layers on `device` can be recomputed (CPU and CUDA: the op's forward has
/// no Metal body).
pub fn supported(device: &candle_core::Device) -> bool {
    device.is_cpu() || device.is_cuda()
}

/// `run(h)`, keeping only `h` for backward. `vars` are the layer's LoRA weights.
pub fn checkpoint(
    h: &Tensor,
    run: LayerFn,
    vars: Vec<Var>,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    // The op's storage is read as a whole from offset 0.
    let h = owned(h)?;
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

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        into_cpu(&(self.run)(&from_cpu(s, l)?, false)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        into_cuda(&(self.run)(&from_cuda(s, l)?, false)?)
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
