//! Differentiable building blocks. candle's fused CPU kernels for softmax, RMSNorm
//! and rotary embeddings have no backward pass, so these are written from basic ops
//! (which do); and a frozen linear layer gets its own op so that backward never
//! computes the gradient of a weight nobody trains.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// `x @ w^T` for a frozen `w` of shape (out, in): the backward pass returns the
/// gradient for `x` only. candle's own matmul would also compute (and allocate) the
/// full (out, in) gradient of `w` on every step — the largest cost of LoRA training.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, k2) = w_l.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x has {k} features but the weight takes {k2}");
        }
        let out = x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, _) = w_l.shape().dims2()?;
        let out = x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x @ w^T` over the last dimension of `x` (any leading shape), `w` frozen.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // A 16-bit weight kept for the fused ops (f32 CPU training) is widened here, per
    // call: exact, and only the paths that cannot use the fused op pay for it.
    let widened;
    let w = if w.dtype() != x.dtype() {
        widened = w.to_dtype(x.dtype())?;
        &widened
    } else {
        w
    };
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m = x.elem_count() / k;
    let x2 = x.reshape((m, k))?;
    let x2 = if x2.is_contiguous() {
        x2
    } else {
        x2.contiguous()?
    };
    // The op has CPU and CUDA kernels; elsewhere (Metal) candle's matmul is correct,
    // only slower, since it also computes the weight's gradient.
    let y = if x2.device().is_cpu() || x2.device().is_cuda() {
        x2.apply_op2(w, FrozenMatmul)?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has at least one dimension") = w.dim(0)?;
    y.reshape(out)
}

/// RMSNorm as Hugging Face computes it: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // Mixed precision: the mean of squares in bf16 loses too much; computed in f32 as
    // transformers does, then cast back.
    if x.dtype() != DType::F32 {
        let y = rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?;
        return y.to_dtype(x.dtype());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(w, super::fused::RmsNorm { eps: eps as f32 });
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Softmax over the last dimension; the max is detached (softmax is shift-invariant,
/// so the gradient is unchanged and the max op stays out of the graph).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        return softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(super::fused::Softmax);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Rotary embedding in the "rotate half" layout HF checkpoints use:
/// `x * cos + rotate_half(x) * sin`, with `cos`/`sin` broadcast over heads.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Sum of token cross-entropies over positions whose target is not ignored.
/// `logits` (n, vocab) f32, `targets` (n,) u32 and `weights` (n,) f32 with 1 for
/// counted positions and 0 for ignored ones.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    (cross_entropy_rows(logits, targets)? * weights)?.sum_all()
}

/// Each row's negative log-likelihood of its target, (rows,).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, super::fused::CrossEntropy);
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}

/// Inverted dropout mask: kept entries are scaled by 1/(1-p). Drawn from `seed` with
/// the same counter-based rule as the fused LoRA op, so both paths drop the same
/// entries.
pub fn dropout_mask(
    shape: &Shape,
    p: f32,
    seed: u64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    let data: Vec<f32> = (0..shape.elem_count() as u64)
        .map(|i| {
            if super::lora_op::dropout_keep(seed, i, p) {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(data, shape.clone(), device)
}
