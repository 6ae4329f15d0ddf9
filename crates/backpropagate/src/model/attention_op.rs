//! Causal grouped-query attention as one op on the CPU, with its backward pass.
//!
//! The tokens of a batch lie in one sequence of `t` positions without padding, cut into
//! segments (one per sample; a token attends to the earlier tokens of its own segment).
//! Inputs: `q` (1, heads, t, d) already rotated and scaled by 1/√d, `k` (1, kv, t, d)
//! rotated, `v` (1, t, kv, d) straight from its projection. Output: (1, t, heads·d), the
//! layout the output projection reads. Built from basic ops this is a product over
//! padded rows, a dense mask, a softmax, a product and two transposed copies, keeping
//! the scores and probabilities (2·heads·t values per token) for backward; here each
//! (segment, k/v head, block of 64 query rows) is one task over its query heads that
//! sees only the keys its rows may attend to, only the log-sum-exp of each score row
//! is kept, and backward recomputes the probabilities. A task's scores are 64 × (its
//! causal prefix) values whatever the segment's length, and sums run in a fixed order,
//! so results do not depend on thread timing. (Keys are not tiled with an online
//! softmax as FlashAttention does on GPUs: a 64-row block of a 32k-token segment is
//! 8 MiB, and a whole prefix per row keeps the softmax exact and simple.)

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul_serial, Mat};
use super::cpu_values::{values, with_values};
use super::fast_exp;
use super::fused::exp_shifted_in_place;
use super::profile::{self, Part};

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

    /// The independent tasks: (segment, k/v head, block of query rows).
    fn tasks(&self, kv: usize) -> Vec<Task> {
        let mut tasks = Vec::new();
        for &(s0, n) in self.segments.iter() {
            for g in 0..kv {
                for i0 in (0..n).step_by(BLOCK_ROWS) {
                    tasks.push(Task {
                        s0,
                        g,
                        i0,
                        i1: (i0 + BLOCK_ROWS).min(n),
                    });
                }
            }
        }
        tasks
    }
}

/// Query rows per task. A block's rows attend to keys `0..i1` of their segment only
/// (the causal prefix), so long segments skip the upper triangle of the score matrix
/// and a task's scores are `BLOCK_ROWS × i1` values, not the segment's n × n.
const BLOCK_ROWS: usize = 64;

/// Query rows `i0..i1` of the segment starting at `s0`, against k/v head `g`.
#[derive(Clone, Copy)]
struct Task {
    s0: usize,
    g: usize,
    i0: usize,
    i1: usize,
}

impl Task {
    fn rows(&self) -> usize {
        self.i1 - self.i0
    }
}

/// Probabilities of one head's block of query rows: `s` (m × i1) holds `q kᵀ` on
/// entry, then each row's causal softmax; returns the rows' log-sum-exps in `lse`.
fn block_softmax(s: &mut [f32], i0: usize, i1: usize, lse: &mut [f32]) {
    for (ii, (row, l)) in s.chunks_mut(i1).zip(lse).enumerate() {
        *l = causal_softmax(row, i0 + ii);
    }
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
        let _span = profile::span(Part::Attention);
        let Dims { h, kv, t, d } = self.dims(ql, kl, vl)?;
        let (q, k, v) = (values(qs, ql)?, values(ks, kl)?, values(vs, vl)?);
        let n_rep = self.n_rep;
        let tasks = self.tasks(kv);
        let per_task: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|task| -> Result<(Vec<f32>, Vec<f32>)> {
                let Task { s0, g, i0, i1, .. } = *task;
                let m = task.rows();
                let vg = Mat::rows_apart(&v[(s0 * kv + g) * d..], i1, d, kv * d);
                let kt = Mat::t(&k[(g * t + s0) * d..][..i1 * d], i1, d);
                let mut out = vec![0f32; n_rep * m * d];
                let mut lse = vec![0f32; n_rep * m];
                let mut s = vec![0f32; m * i1];
                for r in 0..n_rep {
                    let hi = g * n_rep + r;
                    let qh = Mat::rm(&q[(hi * t + s0 + i0) * d..][..m * d], m, d);
                    matmul_serial(&mut s, false, 1.0, qh, kt)?;
                    block_softmax(&mut s, i0, i1, &mut lse[r * m..(r + 1) * m]);
                    let o = &mut out[r * m * d..(r + 1) * m * d];
                    matmul_serial(o, false, 1.0, Mat::rm(&s, m, i1), vg)?;
                }
                Ok((out, lse))
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; t * h * d];
        let mut lse = vec![0f32; h * t];
        for (task, (go, gl)) in tasks.iter().zip(&per_task) {
            let (m, first) = (task.rows(), task.s0 + task.i0);
            for r in 0..n_rep {
                let hi = task.g * n_rep + r;
                lse[hi * t + first..][..m].copy_from_slice(&gl[r * m..(r + 1) * m]);
                for i in 0..m {
                    out[((first + i) * h + hi) * d..][..d]
                        .copy_from_slice(&go[(r * m + i) * d..][..d]);
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
        let _span = profile::span(Part::Attention);
        let Dims { h, kv, t, d } = self.dims(q.layout(), k.layout(), v.layout())?;
        let n_rep = self.n_rep;
        let Some(lse) = self.lse.lock().expect("attention lock").take() else {
            bail!("fused attention: backward ran twice");
        };
        let tasks = self.tasks(kv);
        let mut dq = vec![0f32; h * t * d];
        let mut dk = vec![0f32; kv * t * d];
        let mut dv = vec![0f32; t * kv * d];
        // Per task: dq of its rows for its n_rep heads, and its share of dk, dv over
        // the keys its rows see (0..i1). Shares are added in task order, so the sums do
        // not depend on thread timing; tasks run in waves of a few per thread, so only
        // a wave's shares exist at once (all of them would grow with the square of a
        // segment's length).
        let wave = 4 * rayon::current_num_threads().max(1);
        with_values(q, |q| {
            with_values(k, |k| {
                with_values(v, |v| {
                    with_values(grad, |go| {
                        for wave in tasks.chunks(wave) {
                            let grads: Vec<_> = wave
                                .par_iter()
                                .map(|task| {
                                    block_backward(task, n_rep, (h, kv, t, d), (q, k, v, go), &lse)
                                })
                                .collect::<Result<_>>()?;
                            for (task, (gq, gk, gv)) in wave.iter().zip(&grads) {
                                add_shares(
                                    task,
                                    n_rep,
                                    (h, kv, t, d),
                                    (gq, gk, gv),
                                    (&mut dq, &mut dk, &mut dv),
                                );
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (1, h, t, d), dev)?),
            Some(Tensor::from_vec(dk, (1, kv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (1, t, kv, d), dev)?),
        ))
    }
}

/// Adds one task's gradients into the op's: its rows of dq, its shares of dk and dv.
fn add_shares(
    task: &Task,
    n_rep: usize,
    (_h, kv, t, d): (usize, usize, usize, usize),
    (gq, gk, gv): (&[f32], &[f32], &[f32]),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Task { s0, g, i0, i1 } = *task;
    let m = task.rows();
    for r in 0..n_rep {
        let hi = g * n_rep + r;
        dq[(hi * t + s0 + i0) * d..][..m * d].copy_from_slice(&gq[r * m * d..][..m * d]);
    }
    let dkg = &mut dk[(g * t + s0) * d..][..i1 * d];
    dkg.iter_mut().zip(gk).for_each(|(a, b)| *a += b);
    for j in 0..i1 {
        let row = &mut dv[((s0 + j) * kv + g) * d..][..d];
        row.iter_mut()
            .zip(&gv[j * d..][..d])
            .for_each(|(a, b)| *a += b);
    }
}

/// One task's backward: the probabilities recomputed from the scores and the saved
/// log-sum-exps, then dq for its rows and its shares of dk and dv (keys 0..i1).
fn block_backward(
    task: &Task,
    n_rep: usize,
    (h, kv, t, d): (usize, usize, usize, usize),
    (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
    lse: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let Task { s0, g, i0, i1, .. } = *task;
    let m = task.rows();
    let kd = &k[(g * t + s0) * d..][..i1 * d];
    let vg = &v[(s0 * kv + g) * d..];
    let mut dq = vec![0f32; n_rep * m * d];
    let mut dk = vec![0f32; i1 * d];
    let mut dv = vec![0f32; i1 * d];
    let mut p = vec![0f32; m * i1];
    let mut dp = vec![0f32; m * i1];
    for r in 0..n_rep {
        let hi = g * n_rep + r;
        let qd = &q[(hi * t + s0 + i0) * d..][..m * d];
        // This head's output gradient for the block: m rows, h·d apart.
        let gm = Mat::rows_apart(&go[((s0 + i0) * h + hi) * d..], m, d, h * d);
        matmul_serial(&mut p, false, 1.0, Mat::rm(qd, m, d), Mat::t(kd, i1, d))?;
        let l = &lse[hi * t + s0 + i0..][..m];
        for (ii, (row, &l)) in p.chunks_mut(i1).zip(l).enumerate() {
            let (live, future) = row.split_at_mut(i0 + ii + 1);
            future.fill(0.0);
            if l == f32::NEG_INFINITY {
                live.fill(0.0);
            } else {
                live.iter_mut().for_each(|s| *s = fast_exp::exp(*s - l));
            }
        }
        // dP = dO vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)).
        let vt = Mat::t_rows_apart(vg, i1, d, kv * d);
        matmul_serial(&mut dp, false, 1.0, gm, vt)?;
        for (pr, dr) in p.chunks(i1).zip(dp.chunks_mut(i1)) {
            let dot = fast_exp::dot(pr, dr);
            for (ds, &pv) in dr.iter_mut().zip(pr) {
                *ds = pv * (*ds - dot);
            }
        }
        matmul_serial(&mut dv, true, 1.0, Mat::t(&p, m, i1), gm)?;
        let dqr = &mut dq[r * m * d..(r + 1) * m * d];
        matmul_serial(dqr, false, 1.0, Mat::rm(&dp, m, i1), Mat::rm(kd, i1, d))?;
        matmul_serial(&mut dk, true, 1.0, Mat::t(&dp, m, i1), Mat::rm(qd, m, d))?;
    }
    Ok((dq, dk, dv))
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
