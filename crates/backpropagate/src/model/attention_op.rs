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
    kept: Option<Arc<KeptAttention>>,
}

/// A checkpointed layer's attention output and log-sum-exps from its first forward,
/// handed to the same layer's recomputation in backward so that it skips the
/// attention forward: at long context that is the costliest part of recomputing a
/// layer (the scores grow with the square of the length, the rest linearly), and it
/// costs `heads · (head_dim + 1)` values per token, about one more layer input. The
/// recomputed q, k and v are bit for bit the first pass's (same inputs, same dropout
/// seeds), so the kept output is exactly what the recomputation would give.
#[derive(Default)]
pub struct KeptAttention(Mutex<Option<(Vec<f32>, Vec<f32>)>>);

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
            kept: None,
        }
    }

    /// The op of a checkpointed layer: its first forward leaves its output in `kept`,
    /// and the recomputation takes it from there instead of computing it again.
    pub fn keeping(mut self, kept: Arc<KeptAttention>) -> Self {
        self.kept = Some(kept);
        self
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
        let shape = Shape::from((1, t, h * d));
        let slot = self.kept.as_ref().map(|k| &k.0);
        if let Some((out, lse)) = slot.and_then(|s| s.lock().expect("attention lock").take()) {
            if out.len() != t * h * d || lse.len() != h * t {
                bail!("fused attention: the kept output does not match the recomputation");
            }
            *self.lse.lock().expect("attention lock") = Some(lse);
            return Ok((CpuStorage::F32(out), shape));
        }
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
        if let Some(slot) = slot {
            *slot.lock().expect("attention lock") = Some((out.clone(), lse.clone()));
        }
        *self.lse.lock().expect("attention lock") = Some(lse);
        Ok((CpuStorage::F32(out), shape))
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

/// Whether the per-tile loops (exp, maxima, sums, masks) can run compiled for AVX-512.
/// Checked once per task; the detection is cached by the standard library.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`block_forward_any`] compiled for AVX-512: the same IEEE operations on 16 lanes
/// (no fused multiply-adds are formed, and the lane sums keep their order), so the
/// results are bit for bit those of the baseline build, at a quarter of the
/// instructions for the exponentials that dominate the loops between products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_forward_avx512(
    task: &Task,
    n_rep: usize,
    dims: (usize, usize, usize),
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>)> {
    block_forward_any(task, n_rep, dims, qkv)
}

fn block_forward(
    task: &Task,
    n_rep: usize,
    dims: (usize, usize, usize),
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>)> {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { block_forward_avx512(task, n_rep, dims, qkv) };
    }
    block_forward_any(task, n_rep, dims, qkv)
}

/// One task's forward: for each tile of keys, the stacked scores `q kᵀ`, an online
/// softmax (running row maximum and sum, earlier output rescaled when the maximum
/// grows) and the output accumulated from `p v`. Returns the task's output rows
/// (head by head) and their log-sum-exps.
#[inline(always)]
fn block_forward_any(
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

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// [`block_backward_any`] compiled for AVX-512, bit for bit the same (see
/// [`block_forward_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_backward_avx512(
    task: &Task,
    n_rep: usize,
    dims: (usize, usize, usize, usize),
    qkvg: (&[f32], &[f32], &[f32], &[f32]),
    saved: (&[f32], &[f32]),
) -> Result<Grads> {
    block_backward_any(task, n_rep, dims, qkvg, saved)
}

fn block_backward(
    task: &Task,
    n_rep: usize,
    dims: (usize, usize, usize, usize),
    qkvg: (&[f32], &[f32], &[f32], &[f32]),
    saved: (&[f32], &[f32]),
) -> Result<Grads> {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { block_backward_avx512(task, n_rep, dims, qkvg, saved) };
    }
    block_backward_any(task, n_rep, dims, qkvg, saved)
}

/// One task's backward, tile of keys by tile: the probabilities recomputed from the
/// scores and the saved log-sum-exps, then dq for its rows and its shares of dk and
/// dv (keys 0..i1). The softmax's row term Σ p·dp equals the row's dO·O, so it is
/// taken from the output once and each tile needs only its own keys.
#[inline(always)]
fn block_backward_any(
    task: &Task,
    n_rep: usize,
    (h, kv, t, d): (usize, usize, usize, usize),
    (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
    (o, lse): (&[f32], &[f32]),
) -> Result<Grads> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const H: usize = 6;
    const KV: usize = 2;
    const D: usize = 16;

    /// Two segments over several query blocks and key tiles (the second segment's
    /// last block sees keys across a tile boundary).
    type Inputs = (Arc<Vec<(usize, usize)>>, Var, Var, Var);

    fn inputs() -> Inputs {
        let dev = Device::Cpu;
        let t = 70 + 300;
        let seeded = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5 - 1.0) * 0.7)
                .collect()
        };
        let var = |data: Vec<f32>, shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::from_vec(data, shape, &dev).unwrap()).unwrap()
        };
        (
            Arc::new(vec![(0, 70), (70, 300)]),
            var(seeded(H * t * D, 1), (1, H, t, D)),
            var(seeded(KV * t * D, 2), (1, KV, t, D)),
            var(seeded(t * KV * D, 3), (1, t, KV, D)),
        )
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Output and (dq, dk, dv) of the op under a fixed upstream gradient.
    fn run(op: Attention, q: &Var, k: &Var, v: &Var) -> (Vec<u32>, Vec<Vec<u32>>) {
        let out = q.apply_op3(k, v, op).unwrap();
        let weights = Tensor::arange(0f32, out.elem_count() as f32, out.device())
            .unwrap()
            .reshape(out.shape())
            .unwrap()
            .affine(1e-4, -0.3)
            .unwrap()
            .sin()
            .unwrap();
        let grads = (&out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = |x: &Var| bits(grads.get(x.as_tensor()).unwrap());
        (bits(&out), vec![g(q), g(k), g(v)])
    }

    #[test]
    fn a_kept_output_is_handed_to_the_recomputation_once_and_changes_nothing() {
        let (segments, q, k, v) = inputs();
        let plain = run(Attention::new(segments.clone(), H / KV), &q, &k, &v);
        let kept = Arc::new(KeptAttention::default());
        let first = run(
            Attention::new(segments.clone(), H / KV).keeping(kept.clone()),
            &q,
            &k,
            &v,
        );
        assert_eq!(first, plain);
        assert!(
            kept.0.lock().unwrap().is_some(),
            "the first pass keeps its output"
        );
        let again = run(
            Attention::new(segments.clone(), H / KV).keeping(kept.clone()),
            &q,
            &k,
            &v,
        );
        assert_eq!(again, plain, "the recomputation's output and gradients");
        assert!(kept.0.lock().unwrap().is_none(), "taken, not copied");
        // Proof that the second pass took the kept output rather than computing: fed
        // other queries, it still returns the first pass's output.
        let (_, q2, _, _) = inputs();
        let other = Var::from_tensor(&(q2.as_tensor() * 0.5).unwrap()).unwrap();
        let op = Attention::new(segments.clone(), H / KV).keeping(kept.clone());
        let _ = q.apply_op3(&k, &v, op).unwrap();
        let out = other
            .apply_op3(&k, &v, Attention::new(segments, H / KV).keeping(kept))
            .unwrap();
        assert_eq!(bits(&out), plain.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_build_of_the_tile_loops_gives_the_baseline_bits() {
        if !avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let (segments, q, k, v) = inputs();
        let t = q.dims()[2];
        let op = Attention::new(segments.clone(), H / KV);
        let task_list = op.tasks(KV);
        let data = |x: &Var| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (q, k, v) = (data(&q), data(&k), data(&v));
        let go: Vec<f32> = (0..t * H * D)
            .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
            .collect();
        for task in &task_list {
            let plain = block_forward_any(task, H / KV, (KV, t, D), (&q, &k, &v)).unwrap();
            // SAFETY: checked above that the CPU has AVX-512 F.
            let wide =
                unsafe { block_forward_avx512(task, H / KV, (KV, t, D), (&q, &k, &v)) }.unwrap();
            assert_eq!(plain, wide);
            // Backward reads the whole output and log-sum-exps; a task's own rows are
            // enough for its recomputed probabilities, the rest may stay zero.
            let mut o = vec![0f32; t * H * D];
            let mut lse = vec![f32::NEG_INFINITY; H * t];
            let m = task.rows();
            for r in 0..H / KV {
                let hi = task.g * (H / KV) + r;
                for i in 0..m {
                    let pos = task.s0 + task.i0 + i;
                    o[(pos * H + hi) * D..][..D].copy_from_slice(&plain.0[(r * m + i) * D..][..D]);
                    lse[hi * t + pos] = plain.1[r * m + i];
                }
            }
            let dims = (H, KV, t, D);
            let back = block_backward_any(task, H / KV, dims, (&q, &k, &v, &go), (&o, &lse));
            // SAFETY: as above.
            let wide_back =
                unsafe { block_backward_avx512(task, H / KV, dims, (&q, &k, &v, &go), (&o, &lse)) };
            assert_eq!(back.unwrap(), wide_back.unwrap());
        }
    }
}
