//! Causal grouped-query attention as one op on the CPU, with its backward pass.
//!
//! Inputs: `q` (b, heads, t, d) already rotated and scaled by 1/√d, `k` (b, kv, t, d)
//! rotated, `v` (b, t, kv, d) straight from its projection, and the additive mask
//! (b, 1, t, t). Output: (b, t, heads·d), the layout the output projection reads. Built
//! from basic ops this is a product, a masked softmax, a product and two transposed
//! copies, keeping the scores and probabilities (2·heads·t values per token) for
//! backward; here each (batch row, k/v head) is one task over its query heads, only the
//! log-sum-exp of each score row is kept, and backward recomputes the probabilities.
//! Sums run in a fixed order per task, so results do not depend on thread timing.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::blas::{matmul_serial, Mat};

pub struct Attention {
    /// (b, 1, t, t) additive f32 mask, contiguous.
    mask: Tensor,
    n_rep: usize,
    /// (b, heads, t) log-sum-exp of each masked score row, from the forward.
    lse: Mutex<Option<Vec<f32>>>,
}

/// A CPU tensor's contiguous f32 values, handed to `f`.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("the fused attention runs on the CPU only");
    };
    values(cpu, layout).and_then(f)
}

fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("the fused attention needs contiguous inputs");
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// The sizes of one call: batch rows, query heads, k/v heads, positions, head dim.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
}

impl Attention {
    pub fn new(mask: &Tensor, n_rep: usize) -> Result<Self> {
        Ok(Attention {
            mask: mask.contiguous()?,
            n_rep,
            lse: Mutex::new(None),
        })
    }

    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, h, t, d) = q.shape().dims4()?;
        let (kb, kv, kt, kd) = k.shape().dims4()?;
        if (kb, kt, kd) != (b, t, d) || v.shape().dims4()? != (b, t, kv, d) {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not match",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if kv * self.n_rep != h || self.mask.dims4()? != (b, 1, t, t) {
            bail!(
                "fused attention: {h} query heads, {kv} k/v heads × {}, mask {:?}",
                self.n_rep,
                self.mask.shape()
            );
        }
        Ok(Dims { b, h, kv, t, d })
    }
}

/// Scores of one head: `s = q kᵀ + mask` (t × t).
fn scores(q: &[f32], k: &[f32], mask: &[f32], t: usize, d: usize, s: &mut [f32]) -> Result<()> {
    s.copy_from_slice(mask);
    matmul_serial(s, true, 1.0, Mat::rm(q, t, d), Mat::t(k, t, d))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let Dims { b, h, kv, t, d } = self.dims(ql, kl, vl)?;
        let (q, k, v) = (values(qs, ql)?, values(ks, kl)?, values(vs, vl)?);
        let n_rep = self.n_rep;
        let per_group: Vec<(Vec<f32>, Vec<f32>)> = with_values(&self.mask, |mask| {
            (0..b * kv)
                .into_par_iter()
                .map(|bg| -> Result<(Vec<f32>, Vec<f32>)> {
                    let (bi, g) = (bg / kv, bg % kv);
                    let kg = &k[bg * t * d..][..t * d];
                    // This group's v: t rows of d, kv·d apart, from v[bi, 0, g, 0].
                    let vg = &v[(bi * t * kv + g) * d..];
                    let m = &mask[bi * t * t..][..t * t];
                    let mut out = vec![0f32; n_rep * t * d];
                    let mut lse = vec![0f32; n_rep * t];
                    let mut s = vec![0f32; t * t];
                    for r in 0..n_rep {
                        let hi = g * n_rep + r;
                        let qh = &q[(bi * h + hi) * t * d..][..t * d];
                        scores(qh, kg, m, t, d, &mut s)?;
                        for (row, l) in s.chunks_mut(t).zip(&mut lse[r * t..(r + 1) * t]) {
                            *l = softmax_in_place(row);
                        }
                        matmul_serial(
                            &mut out[r * t * d..(r + 1) * t * d],
                            false,
                            1.0,
                            Mat::rm(&s, t, t),
                            Mat::rows_apart(vg, t, d, kv * d),
                        )?;
                    }
                    Ok((out, lse))
                })
                .collect()
        })?;
        // Scatter into (b, t, heads·d) and (b, heads, t).
        let mut out = vec![0f32; b * t * h * d];
        let mut lse = vec![0f32; b * h * t];
        out.par_chunks_mut(t * h * d)
            .zip(lse.par_chunks_mut(h * t))
            .enumerate()
            .for_each(|(bi, (o, l))| {
                for g in 0..kv {
                    let (go, gl) = &per_group[bi * kv + g];
                    for r in 0..n_rep {
                        let hi = g * n_rep + r;
                        l[hi * t..(hi + 1) * t].copy_from_slice(&gl[r * t..(r + 1) * t]);
                        for ti in 0..t {
                            o[(ti * h + hi) * d..][..d]
                                .copy_from_slice(&go[(r * t + ti) * d..][..d]);
                        }
                    }
                }
            });
        *self.lse.lock().expect("attention lock") = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, h, kv, t, d } = self.dims(q.layout(), k.layout(), v.layout())?;
        let n_rep = self.n_rep;
        let Some(lse) = self.lse.lock().expect("attention lock").take() else {
            bail!("fused attention: backward ran twice");
        };
        // Per group: dq of its n_rep heads (contiguous in dq), and its dk, dv.
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let per_group: Vec<Grads> = with_values(q, |q| {
            with_values(k, |k| {
                with_values(v, |v| {
                    with_values(grad, |go| {
                        with_values(&self.mask, |mask| {
                            (0..b * kv)
                                .into_par_iter()
                                .map(|bg| -> Result<Grads> {
                                    let (bi, g) = (bg / kv, bg % kv);
                                    let kg = &k[bg * t * d..][..t * d];
                                    let vg = &v[(bi * t * kv + g) * d..];
                                    let m = &mask[bi * t * t..][..t * t];
                                    let mut dq = vec![0f32; n_rep * t * d];
                                    let mut dk = vec![0f32; t * d];
                                    let mut dv = vec![0f32; t * d];
                                    let mut p = vec![0f32; t * t];
                                    let mut dp = vec![0f32; t * t];
                                    for r in 0..n_rep {
                                        let hi = g * n_rep + r;
                                        let qh = &q[(bi * h + hi) * t * d..][..t * d];
                                        // This head's output gradient: t rows, h·d apart.
                                        let gh = &go[(bi * t * h + hi) * d..];
                                        let gm = Mat::rows_apart(gh, t, d, h * d);
                                        scores(qh, kg, m, t, d, &mut p)?;
                                        let l = &lse[(bi * h + hi) * t..][..t];
                                        for (row, &l) in p.chunks_mut(t).zip(l) {
                                            if l == f32::NEG_INFINITY {
                                                row.fill(0.0);
                                            } else {
                                                row.iter_mut().for_each(|s| *s = (*s - l).exp());
                                            }
                                        }
                                        // dP = dO vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                                        let vt = Mat::t_rows_apart(vg, t, d, kv * d);
                                        matmul_serial(&mut dp, false, 1.0, gm, vt)?;
                                        for (pr, dr) in p.chunks(t).zip(dp.chunks_mut(t)) {
                                            let dot: f32 =
                                                pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                            for (ds, &pv) in dr.iter_mut().zip(pr) {
                                                *ds = pv * (*ds - dot);
                                            }
                                        }
                                        matmul_serial(&mut dv, true, 1.0, Mat::t(&p, t, t), gm)?;
                                        matmul_serial(
                                            &mut dq[r * t * d..(r + 1) * t * d],
                                            false,
                                            1.0,
                                            Mat::rm(&dp, t, t),
                                            Mat::rm(kg, t, d),
                                        )?;
                                        matmul_serial(
                                            &mut dk,
                                            true,
                                            1.0,
                                            Mat::t(&dp, t, t),
                                            Mat::rm(qh, t, d),
                                        )?;
                                    }
                                    Ok((dq, dk, dv))
                                })
                                .collect()
                        })
                    })
                })
            })
        })?;
        let mut dq = vec![0f32; b * h * t * d];
        let mut dk = vec![0f32; b * kv * t * d];
        let mut dv = vec![0f32; b * t * kv * d];
        dq.par_chunks_mut(n_rep * t * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(&per_group)
            .for_each(|((q, k), (gq, gk, _))| {
                q.copy_from_slice(gq);
                k.copy_from_slice(gk);
            });
        dv.par_chunks_mut(t * kv * d)
            .enumerate()
            .for_each(|(bi, o)| {
                for g in 0..kv {
                    let gv = &per_group[bi * kv + g].2;
                    for ti in 0..t {
                        o[(ti * kv + g) * d..][..d].copy_from_slice(&gv[ti * d..][..d]);
                    }
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, h, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, kv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (b, t, kv, d), dev)?),
        ))
    }
}

/// Softmax of a row in place; returns its log-sum-exp (−∞ for a fully masked row,
/// which is left all zero).
fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}
