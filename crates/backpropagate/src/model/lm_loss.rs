//! The LM head and cross-entropy as one op on the CPU that never holds rows × vocab
//! logits: rows go through the head a chunk at a time, and while a chunk's logits
//! exist the per-row loss and the hidden-state gradient (`(softmax − onehot) W`) are
//! computed from them. Backward only scales the stored gradient rows by the incoming
//! per-row gradient, so the head's product is not redone.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul, Mat};
use super::blas_bf16::{self, Bf16Rows, PackedB, View};
use super::cpu_values::{values, with_values};
use super::fused::exp_shifted_in_place;

/// Logits held at once: 4 Mi values (16 MiB), whatever the vocabulary.
const CHUNK_VALUES: usize = 1 << 22;

pub struct ChunkedLmLoss {
    /// (vocab, hidden), f32, frozen.
    weight: Tensor,
    targets: Vec<u32>,
    /// Whether to compute the gradient rows (not for evaluation).
    with_grad: bool,
    grad_rows: Mutex<Option<Vec<f32>>>,
    packs: Option<Arc<HeadPacks>>,
}

/// The LM head packed for bf16 products, once per model: its transpose for the
/// logits (`h Wᵀ`) and itself for the hidden-state gradient (`dlogits W`). Packing
/// per chunk would repack vocab × hidden values for a few dozen rows each time.
pub struct HeadPacks {
    logits: PackedB,
    grad: PackedB,
}

impl HeadPacks {
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (vocab, hidden) = weight.dims2()?;
        with_values(weight, |w| {
            Ok(HeadPacks {
                logits: PackedB::new(View::t(w, vocab, hidden))?,
                grad: PackedB::new(View::rm(w, vocab, hidden))?,
            })
        })
    }
}

impl ChunkedLmLoss {
    pub fn supports(h: &Tensor, weight: &Tensor) -> bool {
        h.device().is_cpu() && h.dtype() == DType::F32 && weight.dtype() == DType::F32
    }

    /// Per-row negative log-likelihood (n,) of `targets` for hidden rows `h` (n,
    /// hidden); with `packs`, the head's products in bf16.
    pub fn nll(
        h: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        packs: Option<&Arc<HeadPacks>>,
    ) -> Result<Tensor> {
        let targets = targets.to_vec1::<u32>()?;
        let op = ChunkedLmLoss {
            weight: weight.contiguous()?,
            targets,
            with_grad: h.track_op(),
            grad_rows: Mutex::new(None),
            packs: packs.cloned(),
        };
        h.contiguous()?.apply_op1(op)
    }
}

impl ChunkedLmLoss {
    /// Per-row losses and (with `with_grad`) gradient rows for hidden rows `h` and the
    /// head `w` (vocab × hidden), a chunk of rows at a time.
    fn chunks(&self, h: &[f32], w: &[f32], vocab: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.targets.len();
        let hidden = w.len() / vocab.max(1);
        let chunk = (CHUNK_VALUES / vocab.max(1)).clamp(1, n.max(1));
        let mut nll = vec![0f32; n];
        let mut grad = if self.with_grad {
            vec![0f32; n * hidden]
        } else {
            Vec::new()
        };
        let mut logits = vec![0f32; chunk * vocab];
        for first in (0..n).step_by(chunk) {
            let rows = chunk.min(n - first);
            let lg = &mut logits[..rows * vocab];
            let hc = &h[first * hidden..(first + rows) * hidden];
            let packed = self.packs.as_ref().map(|p| &p.logits);
            head_product(lg, (hc, rows, hidden), packed, Mat::t(w, vocab, hidden))?;
            let targets = &self.targets[first..first + rows];
            lg.par_chunks_mut(vocab)
                .zip(nll[first..first + rows].par_iter_mut())
                .zip(targets.par_iter())
                .for_each(|((row, nll), &t)| {
                    let logit = row[t as usize];
                    let (max, sum) = exp_shifted_in_place(row);
                    *nll = sum.ln() - (logit - max);
                    // softmax − onehot, the logits' gradient for an upstream 1.
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|v| *v *= inv);
                    row[t as usize] -= 1.0;
                });
            if self.with_grad {
                let gc = &mut grad[first * hidden..(first + rows) * hidden];
                let packed = self.packs.as_ref().map(|p| &p.grad);
                head_product(gc, (lg, rows, vocab), packed, Mat::rm(w, vocab, hidden))?;
            }
        }
        Ok((nll, grad))
    }
}

/// `dst = lhs · rhs` for the head (`lhs` row-major `rows × cols`): in bf16 against the
/// head's pack when there is one, else in f32 against `rhs`.
fn head_product(
    dst: &mut [f32],
    (lhs, rows, cols): (&[f32], usize, usize),
    packed: Option<&PackedB>,
    rhs: Mat,
) -> Result<()> {
    match packed {
        Some(b) => {
            let a = Bf16Rows::new(View::rm(lhs, rows, cols))?;
            blas_bf16::matmul(dst, b.cols(), false, 1.0, &a, b)
        }
        None => matmul(dst, false, 1.0, Mat::rm(lhs, rows, cols), rhs),
    }
}

impl CustomOp1 for ChunkedLmLoss {
    fn name(&self) -> &'static str {
        "chunked-lm-head-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hidden) = l.shape().dims2()?;
        let h = values(s, l)?;
        let (vocab, wh) = self.weight.dims2()?;
        if wh != hidden || self.targets.len() != n {
            bail!(
                "lm head loss: {n}×{hidden} rows, {} targets, head {vocab}×{wh}",
                self.targets.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("lm head loss: target {t} is past the vocabulary ({vocab})");
        }
        let (nll, grad) = with_values(&self.weight, |w| self.chunks(h, w, vocab))?;
        if self.with_grad {
            *self.grad_rows.lock().expect("lm loss lock") = Some(grad);
        }
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _nll: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, hidden) = h.dims2()?;
        let Some(mut grad) = self.grad_rows.lock().expect("lm loss lock").take() else {
            bail!("lm head loss: backward ran twice, or on a forward without gradients");
        };
        let g = g.to_vec1::<f32>()?;
        grad.par_chunks_mut(hidden)
            .zip(g.par_iter())
            .for_each(|(row, &g)| row.iter_mut().for_each(|v| *v *= g));
        Ok(Some(Tensor::from_vec(grad, (n, hidden), h.device())?))
    }
}

/// Logits held at once by [`ChunkedLmLossAny`]: 8 Mi values (a few tens of MiB with
/// their f32 softmax and gradient).
const ANY_CHUNK_VALUES: usize = 1 << 23;

/// The chunked LM head + cross-entropy on any device (the GPU, and the basic-op
/// decoder on the CPU), from candle's ops: each chunk of rows gets its logits, its
/// per-row losses and its hidden-state gradient from a small graph built and
/// differentiated inside the forward, so neither rows × vocab logits nor their graph
/// outlive the chunk. Backward scales the stored gradient rows.
pub struct ChunkedLmLossAny {
    /// (vocab, hidden), frozen, in the compute dtype.
    weight: Tensor,
    /// (rows,) u32 on the weight's device.
    targets: Tensor,
    with_grad: bool,
    grad_rows: Mutex<Option<Tensor>>,
}

impl ChunkedLmLossAny {
    /// Per-row negative log-likelihood (n,), f32, of `targets` for hidden rows `h`.
    pub fn nll(h: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let op = ChunkedLmLossAny {
            weight: weight.clone(),
            targets: targets.clone(),
            with_grad: h.track_op(),
            grad_rows: Mutex::new(None),
        };
        super::op_tensors::owned(h)?.apply_op1(op)
    }

    fn run(&self, h: &Tensor) -> Result<Tensor> {
        let (n, _) = h.dims2()?;
        let vocab = self.weight.dim(0)?;
        let chunk = (ANY_CHUNK_VALUES / vocab.max(1)).clamp(1, n.max(1));
        let (mut nll, mut grads) = (Vec::new(), Vec::new());
        for first in (0..n).step_by(chunk) {
            let len = chunk.min(n - first);
            let rows = h.narrow(0, first, len)?;
            let targets = self.targets.narrow(0, first, len)?;
            let loss = |x: &Tensor| -> Result<Tensor> {
                let logits = super::ops::frozen_linear(x, &self.weight)?.to_dtype(DType::F32)?;
                super::ops::cross_entropy_rows(&logits, &targets)
            };
            if self.with_grad {
                // Each row's loss depends on its own row only, so the gradient of the
                // chunk's sum is every row's own gradient.
                let x = candle_core::Var::from_tensor(&rows)?;
                let rows_nll = loss(x.as_tensor())?;
                let g = rows_nll.sum_all()?.backward()?;
                let Some(dx) = g.get(x.as_tensor()) else {
                    bail!("lm head loss: no gradient reached the hidden rows");
                };
                grads.push(dx.clone());
                nll.push(rows_nll.detach());
            } else {
                nll.push(loss(&rows)?);
            }
        }
        if self.with_grad {
            *self.grad_rows.lock().expect("lm loss lock") = Some(Tensor::cat(&grads, 0)?);
        }
        Tensor::cat(&nll, 0)
    }
}

impl CustomOp1 for ChunkedLmLossAny {
    fn name(&self) -> &'static str {
        "chunked-lm-head-loss-any-device"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        super::op_tensors::into_cpu(&self.run(&super::op_tensors::from_cpu(s, l)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::op_tensors::into_cuda(&self.run(&super::op_tensors::from_cuda(s, l)?)?)
    }

    fn bwd(&self, h: &Tensor, _nll: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(grad) = self.grad_rows.lock().expect("lm loss lock").take() else {
            bail!("lm head loss: backward ran twice, or on a forward without gradients");
        };
        let g = g.to_dtype(grad.dtype())?.unsqueeze(1)?;
        Ok(Some(grad.broadcast_mul(&g)?.to_dtype(h.dtype())?))
    }
}
