//! Fused CPU kernels with backward passes for the row-wise ops of a transformer:
//! softmax, RMSNorm and token cross-entropy. Built from basic ops these cost several
//! single-threaded passes and keep every intermediate alive for backward; here each
//! is one parallel pass over rows, and backward recomputes what it needs.
//!
//! On other devices (CUDA, Metal) the basic-op versions in `ops` are used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values::{values, with_values};
use super::fast_exp;
use super::profile::{self, Part};

/// Rows of a contiguous f32 tensor, and the row length.
fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize)> {
    let d = l.dims().last().copied().unwrap_or(1).max(1);
    Ok((values(s, l)?, d))
}

/// Below this many elements a single thread beats rayon's scheduling.
const PAR_MIN: usize = 1 << 14;

fn par_rows<F>(out: &mut [f32], d: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() < PAR_MIN {
        out.chunks_mut(d).enumerate().for_each(|(i, o)| f(i, o));
    } else {
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// Replaces a row by `exp(x − max x)` and returns (max, sum): the numerically safe
/// numerator and denominator of a softmax, in place.
pub fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = fast_exp::max(row);
    (max, fast_exp::exp_shifted_in_place(row, max))
}

/// Writes `exp(x − max x)` of a row into `out` and returns its sum: the numerically
/// safe numerator and denominator of a softmax.
fn exp_shifted(row: &[f32], out: &mut [f32]) -> f32 {
    fast_exp::exp_shifted_into(row, fast_exp::max(row), out)
}

pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (x, d) = rows(s, l)?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |i, o| {
            let inv = 1.0 / exp_shifted(&x[i * d..(i + 1) * d], o);
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// dx = y ⊙ (g − Σ g ⊙ y)
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (y, d) = rows(ys, yl)?;
        let (g, _) = rows(gs, gl)?;
        let mut out = vec![0f32; y.len()];
        par_rows(&mut out, d, |i, o| {
            let (y, g) = (&y[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// `w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension; `w` is frozen.
pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (x, d) = rows(xs, xl)?;
        let (w, _) = rows(ws, wl)?;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        par_rows(&mut out, d, |i, o| {
            let x = &x[i * d..(i + 1) * d];
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = w * (x * r);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = x.apply_op2_no_bwd(
            &g.contiguous()?,
            &RmsNormGrad {
                eps: self.eps,
                w: w.clone(),
            },
        )?;
        Ok((Some(grad), None))
    }
}

/// dx = r·(g⊙w) − x·r³·⟨g⊙w, x⟩/d
struct RmsNormGrad {
    eps: f32,
    w: Tensor,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (x, d) = rows(xs, xl)?;
        let (g, _) = rows(gs, gl)?;
        let w = self.w.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        par_rows(&mut out, d, |i, o| {
            let (x, g) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            let dot: f32 = x.iter().zip(g).zip(&w).map(|((x, g), w)| g * w * x).sum();
            let c = r * r * r * dot / d as f32;
            for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(&w) {
                *o = r * g * w - x * c;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Per-row negative log-likelihood of `targets` under softmax(`logits`).
/// Backward recomputes the softmax instead of keeping an (n, vocab) copy.
pub struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (logits, v) = rows(ls, ll)?;
        let targets = targets(ts, tl)?;
        let n = logits.len() / v;
        let nll: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let row = &logits[i * v..(i + 1) * v];
                let max = fast_exp::max(row);
                let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                lse - (row[targets[i] as usize] - max)
            })
            .collect();
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad { g: g.clone() })?;
        Ok((Some(grad), None))
    }
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("targets must be contiguous");
    };
    Ok(&data[start..end])
}

/// d nll_i / d logits_i = g_i · (softmax(logits_i) − onehot(target_i))
struct CrossEntropyGrad {
    g: Tensor,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (logits, v) = rows(ls, ll)?;
        let targets = targets(ts, tl)?;
        let g = self.g.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; logits.len()];
        par_rows(&mut out, v, |i, o| {
            let scale = g[i] / exp_shifted(&logits[i * v..(i + 1) * v], o);
            o.iter_mut().for_each(|p| *p *= scale);
            o[targets[i] as usize] -= g[i];
        });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

/// Rotary embedding (HF's rotate-half layout) fused with the move of heads in front of
/// positions and an optional scale: `x` (b, t, h, d) in, `scale · rope(x)` (b, h, t, d)
/// out, with `cos`/`sin` per (batch row, position) as (b·t, d). The basic-op version
/// keeps four copies of `x` for backward and a transposed copy; this keeps none, since
/// the backward is the same rotation run the other way.
pub struct RopeHeads {
    pub cos: std::sync::Arc<Vec<f32>>,
    pub sin: std::sync::Arc<Vec<f32>>,
    pub scale: f32,
}

impl RopeHeads {
    /// Forward: (b, t, h, d) in, rotated and scaled (b, h, t, d) out.
    fn rotate(&self, x: &[f32], (b, t, h, d): (usize, usize, usize, usize)) -> Vec<f32> {
        let half = d / 2;
        let sc = self.scale;
        let mut out = vec![0f32; b * h * t * d];
        // Output chunk (batch, head) is contiguous; walk its positions.
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                let bt = bi * t + ti;
                let (c, s) = (&self.cos[bt * d..][..d], &self.sin[bt * d..][..d]);
                let v = &x[(bt * h + hi) * d..][..d];
                let o = &mut o[ti * d..][..d];
                for j in 0..half {
                    let (x1, x2) = (v[j], v[j + half]);
                    o[j] = (x1 * c[j] - x2 * s[j]) * sc;
                    o[j + half] = (x2 * c[j + half] + x1 * s[j + half]) * sc;
                }
            }
        });
        out
    }

    /// Backward, the transpose of [`RopeHeads::rotate`]: (b, h, t, d) gradient in,
    /// (b, t, h, d) out.
    fn unrotate(&self, g: &[f32], (b, t, h, d): (usize, usize, usize, usize)) -> Vec<f32> {
        let half = d / 2;
        let sc = self.scale;
        let mut out = vec![0f32; b * t * h * d];
        // Output chunk (batch, position) is contiguous: its h heads.
        out.par_chunks_mut(h * d).enumerate().for_each(|(bt, o)| {
            let (bi, ti) = (bt / t, bt % t);
            let (c, s) = (&self.cos[bt * d..][..d], &self.sin[bt * d..][..d]);
            for hi in 0..h {
                let v = &g[((bi * h + hi) * t + ti) * d..][..d];
                let o = &mut o[hi * d..][..d];
                for j in 0..half {
                    let (g1, g2) = (v[j], v[j + half]);
                    o[j] = (g1 * c[j] + g2 * s[j + half]) * sc;
                    o[j + half] = (g2 * c[j + half] - g1 * s[j]) * sc;
                }
            }
        });
        out
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (x, _) = rows(s, l)?;
        let (b, t, h, d) = l.shape().dims4()?;
        if self.cos.len() != b * t * d || d % 2 != 0 {
            candle_core::bail!("fused rope: tables do not match ({b}, {t}, {h}, {d})");
        }
        let out = self.rotate(x, (b, t, h, d));
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _span = profile::span(Part::Elementwise);
        let (b, t, h, d) = x.dims4()?;
        let dx = with_values(g, |g| Ok(self.unrotate(g, (b, t, h, d))))?;
        Ok(Some(Tensor::from_vec(dx, (b, t, h, d), x.device())?))
    }
}

/// `silu(gate) ⊙ up`, the SwiGLU activation, with both gradients computed in one pass
/// (`d gate = g·up·σ(e)(1 + e(1 − σ(e)))`, `d up = g·silu(e)`) and nothing kept but
/// the two inputs.
pub struct SwiGlu;

fn silu_parts(e: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + fast_exp::exp(-e));
    (e * sig, sig * (1.0 + e * (1.0 - sig)))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (gate, d) = rows(gs, gl)?;
        let (up, _) = rows(us, ul)?;
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "fused swiglu: gate {:?} and up {:?} differ",
                gl.shape(),
                ul.shape()
            );
        }
        let mut out = vec![0f32; gate.len()];
        par_rows(&mut out, d, |i, o| {
            let (e, u) = (&gate[i * d..(i + 1) * d], &up[i * d..(i + 1) * d]);
            for ((o, &e), &u) in o.iter_mut().zip(e).zip(u) {
                *o = silu_parts(e).0 * u;
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &g.contiguous()?,
            &SwiGluGrad,
        )?;
        Ok((Some(grads.get(0)?), Some(grads.get(1)?)))
    }
}

/// (gate, up, output gradient) in; (2, …) = [d gate; d up] out.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        es: &CpuStorage,
        el: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = profile::span(Part::Elementwise);
        let (gate, d) = rows(es, el)?;
        let (up, _) = rows(us, ul)?;
        let (g, _) = rows(gs, gl)?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        let chunk = d.max(1) * 16;
        dgate
            .par_chunks_mut(chunk)
            .zip(dup.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let base = c * chunk;
                for j in 0..dg.len() {
                    let (e, u, g) = (gate[base + j], up[base + j], g[base + j]);
                    let (silu, dsilu) = silu_parts(e);
                    dg[j] = g * u * dsilu;
                    du[j] = g * silu;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(el.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
