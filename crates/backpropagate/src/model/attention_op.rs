//! Causal grouped-query attention as one op on the CPU, with its backward pass.
//!
//! The tokens of a batch lie in one sequence of `t` positions without padding, cut into
//! segments (one per sample; a token attends to the earlier tokens of its own segment).
//! Inputs: `q` (1, heads, t, d) already rotated and scaled by 1/√d, `k` (1, kv, t, d)
//! rotated, `v` (1, t, kv, d) straight from its projection. Output: (1, t, heads·d), the
//! layout the output projection reads. Built from basic ops this is a product over
//! padded rows, a dense mask, a softmax, a product and two transposed copies, keeping
//! the scores and probabilities (2·heads·t values per token) for backward; here each
//! (segment, k/v head) is one task over its query heads, only the log-sum-exp of each
//! score row is kept, and backward recomputes the probabilities. Sums run in a fixed
//! order per task, so results do not depend on thread timing.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul_serial, Mat};
use super::cpu_values::{values, with_values};
use super::fused::exp_shifted_in_place;

pub struct Attention {
    /// (start, len) of each segment; together they cover the t positions. Shared by
    /// the ops of all layers of one forward.
    segments: Arc<Vec<(usize, usize)>>,
    n_rep: usize,
    /// (heads, t) log-sum-exp of each score row, from the forward.
    lse: Mutex<Option<Vec<f32>>>,
}

/// The sizes of one call: query heads, k/v heads, positions, head dim.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
}

impl Attention {
    pub fn new(segments: Arc<Vec<(usize, usize)>>, n_rep: usize) -> Self {
        Attention {
            segments,
            n_rep,
            lse: Mutex::new(None),
        }
    }

    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, h, t, d) = q.shape().dims4()?;
        let (kb, kv, kt, kd) = k.shape().dims4()?;
        if b != 1 || (kb, kt, kd) != (1, t, d) || v.shape().dims4()? != (1, t, kv, d) {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not match",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if kv * self.n_rep != h {
            bail!(
                "fused attention: {h} query heads for {kv} k/v heads × {}",
                self.n_rep
            );
        }
        let mut next = 0;
        for &(start, len) in self.segments.iter() {
            if start != next || len == 0 {
                bail!("fused attention: segments must tile the {t} positions in order");
            }
            next = start + len;
        }
        if next != t {
            bail!("fused attention: segments cover {next} of {t} positions");
        }
        Ok(Dims { h, kv, t, d })
    }

    /// (segment index, k/v head) pairs: the independent tasks.
    fn tasks(&self, kv: usize) -> Vec<(usize, usize)> {
        (0..self.segments.len())
            .flat_map(|s| (0..kv).map(move |g| (s, g)))
            .collect()
    }
}

/// Causal scores of one head on one segment: `s = q kᵀ` (n × n), rows then
/// softmaxed over their first i + 1 entries by the caller.
fn scores(q: Mat, k: Mat, n: usize, s: &mut [f32]) -> Result<()> {
    matmul_serial(&mut s[..n * n], false, 1.0, q, k)
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
        let Dims { h, kv, t, d } = self.dims(ql, kl, vl)?;
        let (q, k, v) = (values(qs, ql)?, values(ks, kl)?, values(vs, vl)?);
        let n_rep = self.n_rep;
        let tasks = self.tasks(kv);
        let per_task: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(si, g)| -> Result<(Vec<f32>, Vec<f32>)> {
                let (s0, n) = self.segments[si];
                let vg = Mat::rows_apart(&v[(s0 * kv + g) * d..], n, d, kv * d);
                let mut out = vec![0f32; n_rep * n * d];
                let mut lse = vec![0f32; n_rep * n];
                let mut s = vec![0f32; n * n];
                for r in 0..n_rep {
                    let hi = g * n_rep + r;
                    let qh = Mat::rm(&q[(hi * t + s0) * d..][..n * d], n, d);
                    scores(qh, Mat::t(&k[(g * t + s0) * d..][..n * d], n, d), n, &mut s)?;
                    for (i, (row, l)) in s
                        .chunks_mut(n)
                        .zip(&mut lse[r * n..(r + 1) * n])
                        .enumerate()
                    {
                        *l = causal_softmax(row, i);
                    }
                    matmul_serial(
                        &mut out[r * n * d..(r + 1) * n * d],
                        false,
                        1.0,
                        Mat::rm(&s, n, n),
                        vg,
                    )?;
                }
                Ok((out, lse))
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; t * h * d];
        let mut lse = vec![0f32; h * t];
        for (&(si, g), (go, gl)) in tasks.iter().zip(&per_task) {
            let (s0, n) = self.segments[si];
            for r in 0..n_rep {
                let hi = g * n_rep + r;
                lse[hi * t + s0..][..n].copy_from_slice(&gl[r * n..(r + 1) * n]);
                for i in 0..n {
                    out[((s0 + i) * h + hi) * d..][..d]
                        .copy_from_slice(&go[(r * n + i) * d..][..d]);
                }
            }
        }
        *self.lse.lock().expect("attention lock") = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((1, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { h, kv, t, d } = self.dims(q.layout(), k.layout(), v.layout())?;
        let n_rep = self.n_rep;
        let Some(lse) = self.lse.lock().expect("attention lock").take() else {
            bail!("fused attention: backward ran twice");
        };
        let tasks = self.tasks(kv);
        // Per task: dq of its n_rep heads, and its dk, dv rows.
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let per_task: Vec<Grads> = with_values(q, |q| {
            with_values(k, |k| {
                with_values(v, |v| {
                    with_values(grad, |go| {
                        tasks
                            .par_iter()
                            .map(|&(si, g)| -> Result<Grads> {
                                let (s0, n) = self.segments[si];
                                let kd = &k[(g * t + s0) * d..][..n * d];
                                let vg = &v[(s0 * kv + g) * d..];
                                let mut dq = vec![0f32; n_rep * n * d];
                                let mut dk = vec![0f32; n * d];
                                let mut dv = vec![0f32; n * d];
                                let mut p = vec![0f32; n * n];
                                let mut dp = vec![0f32; n * n];
                                for r in 0..n_rep {
                                    let hi = g * n_rep + r;
                                    let qd = &q[(hi * t + s0) * d..][..n * d];
                                    // This head's output gradient: n rows, h·d apart.
                                    let gm = Mat::rows_apart(&go[(s0 * h + hi) * d..], n, d, h * d);
                                    scores(Mat::rm(qd, n, d), Mat::t(kd, n, d), n, &mut p)?;
                                    let l = &lse[hi * t + s0..][..n];
                                    for (i, (row, &l)) in p.chunks_mut(n).zip(l).enumerate() {
                                        for (j, s) in row.iter_mut().enumerate() {
                                            *s = if j <= i && l != f32::NEG_INFINITY {
                                                (*s - l).exp()
                                            } else {
                                                0.0
                                            };
                                        }
                                    }
                                    // dP = dO vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                                    let vt = Mat::t_rows_apart(vg, n, d, kv * d);
                                    matmul_serial(&mut dp, false, 1.0, gm, vt)?;
                                    for (pr, dr) in p.chunks(n).zip(dp.chunks_mut(n)) {
                                        let dot: f32 =
                                            pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                        for (ds, &pv) in dr.iter_mut().zip(pr) {
                                            *ds = pv * (*ds - dot);
                                        }
                                    }
                                    matmul_serial(&mut dv, true, 1.0, Mat::t(&p, n, n), gm)?;
                                    matmul_serial(
                                        &mut dq[r * n * d..(r + 1) * n * d],
                                        false,
                                        1.0,
                                        Mat::rm(&dp, n, n),
                                        Mat::rm(kd, n, d),
                                    )?;
                                    matmul_serial(
                                        &mut dk,
                                        true,
                                        1.0,
                                        Mat::t(&dp, n, n),
                                        Mat::rm(qd, n, d),
                                    )?;
                                }
                                Ok((dq, dk, dv))
                            })
                            .collect()
                    })
                })
            })
        })?;
        let mut dq = vec![0f32; h * t * d];
        let mut dk = vec![0f32; kv * t * d];
        let mut dv = vec![0f32; t * kv * d];
        for (&(si, g), (gq, gk, gv)) in tasks.iter().zip(&per_task) {
            let (s0, n) = self.segments[si];
            for r in 0..n_rep {
                let hi = g * n_rep + r;
                dq[(hi * t + s0) * d..][..n * d].copy_from_slice(&gq[r * n * d..][..n * d]);
            }
            dk[(g * t + s0) * d..][..n * d].copy_from_slice(gk);
            for i in 0..n {
                dv[((s0 + i) * kv + g) * d..][..d].copy_from_slice(&gv[i * d..][..d]);
            }
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (1, h, t, d), dev)?),
            Some(Tensor::from_vec(dk, (1, kv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (1, t, kv, d), dev)?),
        ))
    }
}

/// Softmax of score row `i` over its first i + 1 entries (the causal prefix), in
/// place, the rest zeroed; returns the log-sum-exp.
fn causal_softmax(row: &mut [f32], i: usize) -> f32 {
    let (live, future) = row.split_at_mut(i + 1);
    future.fill(0.0);
    let (max, sum) = exp_shifted_in_place(live);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}
