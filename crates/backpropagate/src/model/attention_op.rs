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
//! is kept, and backward recomputes the probabilities. Within a task the query heads
//! that share a k/v head are stacked into one matrix and the keys are taken in tiles
//! of 256 with an online softmax (FlashAttention's scheme), so every product is one
//! GEMM of cache-sized operands: a task's working set is a few hundred KiB whatever
//! the segment's length. Sums run in a fixed order, so results do not depend on
//! thread timing.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul_serial, Mat};
use super::cpu_values::{values, with_values};
use super::fast_exp;
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

/// Keys per tile within a task: a tile's scores for the task's stacked rows
/// (n_rep · 64 × 256 values, 192 KiB for three query heads per k/v head) stay in a
/// core's L2 cache, where whole causal prefixes of long segments did not.
const KEY_TILE: usize = 256;

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
            .map(|task| block_forward(task, n_rep, (kv, t, d), (q, k, v)))
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
        out: &Tensor,
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
                    with_values(out, |o| {
                        with_values(grad, |go| {
                            for wave in tasks.chunks(wave) {
                                let grads: Vec<_> = wave
                                    .par_iter()
                                    .map(|task| {
                                        block_backward(
                                            task,
                                            n_rep,
                                            (h, kv, t, d),
                                            (q, k, v, go),
                                            (o, &lse),
                                        )
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

/// The query rows of one task for its `n_rep` heads, stacked head by head into one
/// (n_rep·m) × d matrix, so each product with the group's keys and values is one
/// larger GEMM instead of `n_rep` small ones. `rows(hi)` gives head `hi`'s m rows.
fn stack<'a>(
    task: &Task,
    n_rep: usize,
    d: usize,
    head_rows: impl Fn(usize, usize) -> &'a [f32],
) -> Vec<f32> {
    let m = task.rows();
    let mut out = Vec::with_capacity(n_rep * m * d);
    for r in 0..n_rep {
        let hi = task.g * n_rep + r;
        for i in 0..m {
            out.extend_from_slice(&head_rows(hi, task.s0 + task.i0 + i)[..d]);
        }
    }
    out
}

/// Keys a stacked row sees in the tile `j0..j0 + w`: row `ii` of a head is query
/// position `i0 + ii` and attends to keys up to and including itself.
fn live_keys(i0: usize, ii: usize, j0: usize, w: usize) -> usize {
    (i0 + ii + 1).saturating_sub(j0).min(w)
}

/// One task's forward: for each tile of keys, the stacked scores `q kᵀ`, an online
/// softmax (running row maximum and sum, earlier output rescaled when the maximum
/// grows) and the output accumulated from `p v`. Returns the task's output rows
/// (head by head) and their log-sum-exps.
fn block_forward(
    task: &Task,
    n_rep: usize,
    (kv, t, d): (usize, usize, usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let Task { s0, g, i0, i1 } = *task;
    let m = task.rows();
    let rows = n_rep * m;
    let qs = stack(task, n_rep, d, |hi, pos| &q[(hi * t + pos) * d..]);
    let mut out = vec![0f32; rows * d];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    let mut s = vec![0f32; rows * KEY_TILE.min(i1)];
    for j0 in (0..i1).step_by(KEY_TILE) {
        let w = KEY_TILE.min(i1 - j0);
        let s = &mut s[..rows * w];
        let kt = Mat::t(&k[(g * t + s0 + j0) * d..][..w * d], w, d);
        matmul_serial(s, false, 1.0, Mat::rm(&qs, rows, d), kt)?;
        for (row, ((sr, o), (mx, l))) in s
            .chunks_mut(w)
            .zip(out.chunks_mut(d))
            .zip(max.iter_mut().zip(sum.iter_mut()))
            .enumerate()
        {
            let (live, future) = sr.split_at_mut(live_keys(i0, row % m, j0, w));
            future.fill(0.0);
            if live.is_empty() {
                continue;
            }
            let new = mx.max(fast_exp::max(live));
            if new == f32::NEG_INFINITY {
                live.fill(0.0);
                continue;
            }
            let tile_sum = fast_exp::exp_shifted_in_place(live, new);
            if *mx != new {
                let scale = fast_exp::exp(*mx - new);
                *l *= scale;
                o.iter_mut().for_each(|x| *x *= scale);
                *mx = new;
            }
            *l += tile_sum;
        }
        let vg = Mat::rows_apart(&v[((s0 + j0) * kv + g) * d..], w, d, kv * d);
        matmul_serial(&mut out, true, 1.0, Mat::rm(s, rows, w), vg)?;
    }
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for ((o, l), (&mx, &sm)) in out.chunks_mut(d).zip(&mut lse).zip(max.iter().zip(&sum)) {
        if sm > 0.0 {
            let inv = 1.0 / sm;
            o.iter_mut().for_each(|x| *x *= inv);
            *l = mx + sm.ln();
        }
    }
    Ok((out, lse))
}

/// One task's backward, tile of keys by tile: the probabilities recomputed from the
/// scores and the saved log-sum-exps, then dq for its rows and its shares of dk and
/// dv (keys 0..i1). The softmax's row term Σ p·dp equals the row's dO·O, so it is
/// taken from the output once and each tile needs only its own keys.
fn block_backward(
    task: &Task,
    n_rep: usize,
    (h, kv, t, d): (usize, usize, usize, usize),
    (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
    (o, lse): (&[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let Task { s0, g, i0, i1 } = *task;
    let m = task.rows();
    let rows = n_rep * m;
    let qs = stack(task, n_rep, d, |hi, pos| &q[(hi * t + pos) * d..]);
    let gs = stack(task, n_rep, d, |hi, pos| &go[(pos * h + hi) * d..]);
    let os = stack(task, n_rep, d, |hi, pos| &o[(pos * h + hi) * d..]);
    let row_dot: Vec<f32> = gs
        .chunks(d)
        .zip(os.chunks(d))
        .map(|(g, o)| fast_exp::dot(g, o))
        .collect();
    let row_lse: Vec<f32> = (0..rows)
        .map(|row| lse[(g * n_rep + row / m) * t + s0 + i0 + row % m])
        .collect();
    let mut dq = vec![0f32; rows * d];
    let mut dk = vec![0f32; i1 * d];
    let mut dv = vec![0f32; i1 * d];
    let tile = KEY_TILE.min(i1);
    let (mut p, mut dp) = (vec![0f32; rows * tile], vec![0f32; rows * tile]);
    for j0 in (0..i1).step_by(KEY_TILE) {
        let w = KEY_TILE.min(i1 - j0);
        let (p, dp) = (&mut p[..rows * w], &mut dp[..rows * w]);
        let kd = &k[(g * t + s0 + j0) * d..][..w * d];
        let vg = &v[((s0 + j0) * kv + g) * d..];
        matmul_serial(p, false, 1.0, Mat::rm(&qs, rows, d), Mat::t(kd, w, d))?;
        for (row, (pr, &l)) in p.chunks_mut(w).zip(&row_lse).enumerate() {
            let (live, future) = pr.split_at_mut(live_keys(i0, row % m, j0, w));
            future.fill(0.0);
            if l == f32::NEG_INFINITY {
                live.fill(0.0);
            } else {
                live.iter_mut().for_each(|s| *s = fast_exp::exp(*s - l));
            }
        }
        // dP = dO vᵀ; dS = P ⊙ (dP − dO·O).
        let vt = Mat::t_rows_apart(vg, w, d, kv * d);
        matmul_serial(dp, false, 1.0, Mat::rm(&gs, rows, d), vt)?;
        for ((pr, dr), &dot) in p.chunks(w).zip(dp.chunks_mut(w)).zip(&row_dot) {
            for (ds, &pv) in dr.iter_mut().zip(pr) {
                *ds = pv * (*ds - dot);
            }
        }
        let dvt = &mut dv[j0 * d..][..w * d];
        matmul_serial(dvt, true, 1.0, Mat::t(p, rows, w), Mat::rm(&gs, rows, d))?;
        matmul_serial(&mut dq, true, 1.0, Mat::rm(dp, rows, w), Mat::rm(kd, w, d))?;
        let dkt = &mut dk[j0 * d..][..w * d];
        matmul_serial(dkt, true, 1.0, Mat::t(dp, rows, w), Mat::rm(&qs, rows, d))?;
    }
    Ok((dq, dk, dv))
}
