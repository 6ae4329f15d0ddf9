//! Attention for the basic-op decoder (the GPU path, and the CPU reference) that keeps
//! no (b, heads, t, t) scores for backward: one op over q, k, v whose forward runs
//! blocks of query rows with candle's ops and keeps nothing but its inputs, and whose
//! backward recomputes each block with a small graph of its own. Built from basic ops
//! the scores, the masked scores, their exponentials and the probabilities of every
//! layer stay alive until backward — at 2048 tokens with 32 heads each of them is
//! 256 MiB per layer in bf16. A block's rows see only their causal prefix of keys.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};

use super::op_tensors::{from_cpu, into_cpu, owned};
#[cfg(feature = "cuda")]
use super::op_tensors::{from_cuda, into_cuda};
use super::ops::softmax_last_dim;

/// Query rows per block.
pub const BLOCK_ROWS: usize = 128;

/// `softmax(q kᵀ · scale + mask) v` for q (b, heads, t, d), k and v (b, kv, t, d), the
/// additive mask (b, 1, t, t); out (b, heads, t, d).
pub fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    n_rep: usize,
) -> Result<Tensor> {
    let op = BlockedAttention {
        mask: mask.clone(),
        n_rep,
        scale: 1.0 / (q.dim(3)? as f64).sqrt(),
    };
    owned(q)?.apply_op3(&owned(k)?, &owned(v)?, op)
}

struct BlockedAttention {
    mask: Tensor,
    n_rep: usize,
    scale: f64,
}

/// Grouped-query attention: each k/v head serves `n_rep` query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

impl BlockedAttention {
    /// Query rows `i0..i0 + len` (`q` holds just those) against keys `0..i0 + len`
    /// (the later ones are masked out for every row of the block).
    fn block(&self, q: &Tensor, k: &Tensor, v: &Tensor, i0: usize, len: usize) -> Result<Tensor> {
        let keys = i0 + len;
        let k = repeat_kv(k.narrow(2, 0, keys)?, self.n_rep)?;
        let v = repeat_kv(v.narrow(2, 0, keys)?, self.n_rep)?;
        let mask = self
            .mask
            .narrow(2, i0, len)?
            .narrow(3, 0, keys)?
            .to_dtype(q.dtype())?;
        let scores = (q.matmul(&k.contiguous()?.t()?)? * self.scale)?.broadcast_add(&mask)?;
        softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = q.dim(2)?;
        let blocks = (0..t)
            .step_by(BLOCK_ROWS)
            .map(|i0| {
                let len = BLOCK_ROWS.min(t - i0);
                self.block(&q.narrow(2, i0, len)?, k, v, i0, len)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&blocks, 2)
    }
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (from_cpu(qs, ql)?, from_cpu(ks, kl)?, from_cpu(vs, vl)?);
        into_cpu(&self.forward(&q, &k, &v)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (q, k, v) = (from_cuda(qs, ql)?, from_cuda(ks, kl)?, from_cuda(vs, vl)?);
        into_cuda(&self.forward(&q, &k, &v)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let t = q.dim(2)?;
        let q = q.detach();
        let (kv, vv) = (
            Var::from_tensor(&k.detach())?,
            Var::from_tensor(&v.detach())?,
        );
        let g = g.detach();
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        for i0 in (0..t).step_by(BLOCK_ROWS) {
            let len = BLOCK_ROWS.min(t - i0);
            let qb = Var::from_tensor(&q.narrow(2, i0, len)?)?;
            let y = self.block(qb.as_tensor(), kv.as_tensor(), vv.as_tensor(), i0, len)?;
            let grads = (y * g.narrow(2, i0, len)?)?.sum_all()?.backward()?;
            let get = |t: &Tensor| grads.get(t).cloned();
            dq.push(get(qb.as_tensor()).ok_or_else(|| no_grad("q"))?);
            let add = |acc: Option<Tensor>, part: Option<Tensor>| -> Result<Option<Tensor>> {
                Ok(match (acc, part) {
                    (Some(a), Some(p)) => Some((a + p)?),
                    (a, p) => a.or(p),
                })
            };
            dk = add(dk, get(kv.as_tensor()))?;
            dv = add(dv, get(vv.as_tensor()))?;
        }
        Ok((Some(Tensor::cat(&dq, 2)?), dk, dv))
    }
}

fn no_grad(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("blocked attention: no gradient reached {what}"))
}
