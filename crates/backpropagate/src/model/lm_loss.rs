//! The LM head and cross-entropy as one op on the CPU that never holds rows × vocab
//! logits: rows go through the head a chunk at a time, and while a chunk's logits
//! exist the per-row loss and the hidden-state gradient (`(softmax − onehot) W`) are
//! computed from them. Backward only scales the stored gradient rows by the incoming
//! per-row gradient, so the head's product is not redone.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul, Mat};
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
}

impl ChunkedLmLoss {
    pub fn supports(h: &Tensor, weight: &Tensor) -> bool {
        h.device().is_cpu() && h.dtype() == DType::F32 && weight.dtype() == DType::F32
    }

    /// Per-row negative log-likelihood (n,) of `targets` for hidden rows `h` (n, hidden).
    pub fn nll(h: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let targets = targets.to_vec1::<u32>()?;
        let op = ChunkedLmLoss {
            weight: weight.contiguous()?,
            targets,
            with_grad: h.track_op(),
            grad_rows: Mutex::new(None),
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
            matmul(
                lg,
                false,
                1.0,
                Mat::rm(hc, rows, hidden),
                Mat::t(w, vocab, hidden),
            )?;
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
                matmul(
                    gc,
                    false,
                    1.0,
                    Mat::rm(lg, rows, vocab),
                    Mat::rm(w, vocab, hidden),
                )?;
            }
        }
        Ok((nll, grad))
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
