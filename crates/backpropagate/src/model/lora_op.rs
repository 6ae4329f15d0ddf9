//! A LoRA linear layer as one op on the CPU: `y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ`.
//!
//! Built from basic ops the layer keeps four activations of the output's size alive
//! until backward (the base product, the LoRA product, its scaled copy and the sum)
//! and spends single-threaded passes adding them; here the bias, the base product and
//! the LoRA term land in one buffer, and backward recomputes the small `D(x) Aᵀ`
//! (rows × r) instead of keeping it. The dropout mask is regenerated from its seed
//! ([`dropout_keep`]) rather than stored.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{matmul, Mat};
use super::blas_bf16::Products;
use super::cpu_values::{values, with_values};
use super::frozen_linear::{self, g_w, init_with_bias, with_frozen, x_wt};
use super::qlinear::FrozenWeight;

/// Dropout on the LoRA input: probability `p`, and the seed its mask comes from.
#[derive(Clone, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    /// Each input row's index in the padded batch, when the rows are a padding-free
    /// selection of it (see [`mask_base`]).
    pub row_keys: Option<std::sync::Arc<Vec<u32>>>,
}

/// Whether element `i` of a dropout mask with `seed` is kept: a counter-based draw
/// (splitmix64 of seed and index), so the mask is the same wherever and however
/// often it is regenerated, and costs no memory between forward and backward.
#[inline(always)]
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 random bits: every f32 in [0, 1) they give is exact.
    ((z >> 40) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

/// Where row `m`'s mask entries start in the mask's index space: the row's place in
/// the padded batch (`keys`), so a padding-free batch drops exactly the entries the
/// padded one does; without keys, the row itself.
fn mask_base(keys: Option<&[u32]>, m: usize, cols: usize) -> u64 {
    keys.map_or(m, |k| k[m] as usize) as u64 * cols as u64
}

/// `mask[j]` = `scale` where entry `base + j` of the mask with `seed` is kept, else 0.
fn mask_row(seed: u64, base: u64, p: f32, scale: f32, mask: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has AVX-512 DQ (and F, which DQ implies).
        return unsafe { mask_row_avx512(seed, base, p, scale, mask) };
    }
    mask_row_any(seed, base, p, scale, mask)
}

/// The same loop compiled for AVX-512 (64-bit multiplies in vectors): the draws are
/// integer arithmetic and an exact compare, so the mask is bit for bit the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn mask_row_avx512(seed: u64, base: u64, p: f32, scale: f32, mask: &mut [f32]) {
    mask_row_any(seed, base, p, scale, mask)
}

#[inline(always)]
fn mask_row_any(seed: u64, base: u64, p: f32, scale: f32, mask: &mut [f32]) {
    for (j, m) in mask.iter_mut().enumerate() {
        *m = if dropout_keep(seed, base + j as u64, p) {
            scale
        } else {
            0.0
        };
    }
}

/// Runs `f(out, value, mask)` over `out` and `src` (rows × cols) with each entry's
/// mask value (1/(1−p) where kept, 0 where dropped) from `d`: the one walk both the
/// forward (applying the mask) and the backward (the gradient through it) make.
fn zip_with_mask(
    out: &mut [f32],
    src: &[f32],
    cols: usize,
    d: &Dropout,
    f: impl Fn(&mut f32, f32, f32) + Sync,
) {
    let keys = d.row_keys.as_deref().map(Vec::as_slice);
    let scale = 1.0 / (1.0 - d.p);
    out.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .enumerate()
        .for_each_init(Vec::new, |mask, (m, (o, x))| {
            mask.resize(cols, 0.0);
            mask_row(d.seed, mask_base(keys, m, cols), d.p, scale, mask);
            for ((o, &x), &k) in o.iter_mut().zip(x).zip(mask.iter()) {
                f(o, x, k);
            }
        });
}

/// `x` (rows × cols) with dropout applied (kept values scaled by 1/(1−p)), or `x`.
fn dropped<'a>(
    x: &'a [f32],
    cols: usize,
    dropout: Option<&Dropout>,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    let Some(d) = dropout else { return x };
    buf.resize(x.len(), 0.0);
    zip_with_mask(buf, x, cols, d, |o, x, k| {
        *o = if k != 0.0 { x * k } else { 0.0 }
    });
    buf
}

/// The op; its inputs are `x` (rows × in), `A` (r × in) and `B` (out × r). The frozen
/// weight (out × in; f32, bf16/f16 or ggml blocks, converted a band at a time) and
/// bias (out, f32) are not differentiated.
#[derive(Clone)]
pub struct LoraLinear {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub scale: f32,
    pub dropout: Option<Dropout>,
    /// The frozen weight's products; the LoRA ones are f32 whatever this says.
    pub products: Products,
}

impl LoraLinear {
    /// Whether the op can run these inputs (else the basic-op layer is used).
    pub fn supports(x: &Tensor, weight: &FrozenWeight) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32 && frozen_linear::supports(weight)
    }

    /// `y` for `x` (any leading shape, features last).
    pub fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let x2 = x.reshape((x.elem_count() / k.max(1), k))?.contiguous()?;
        let y = x2.apply_op3(a, b, self.clone())?;
        let mut out = dims;
        *out.last_mut().expect("x has a feature dimension") = self.weight.rows()?;
        y.reshape(out)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (r, _) = al.shape().dims2()?;
        let (n, _) = bl.shape().dims2()?;
        let (x, a, b) = (values(xs, xl)?, values(as_, al)?, values(bs, bl)?);
        let mut buf = Vec::new();
        let xd = dropped(x, k, self.dropout.as_ref(), &mut buf);
        let mut u = vec![0f32; m * r];
        matmul(&mut u, false, 1.0, Mat::rm(xd, m, k), Mat::t(a, r, k))?;
        let mut y = vec![0f32; m * n];
        let has_bias = init_with_bias(&mut y, n, self.bias.as_ref())?;
        with_frozen(&self.weight, self.products, |w| {
            x_wt(&mut y, has_bias, x, m, w)
        })?;
        matmul(&mut y, true, self.scale, Mat::rm(&u, m, r), Mat::t(b, n, r))?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let s = self.scale;
        let (dx, da, db) = with_values(x, |x| {
            with_values(a, |a| {
                with_values(b, |b| {
                    with_values(g, |g| {
                        with_frozen(&self.weight, self.products, |w| {
                            let mut buf = Vec::new();
                            let xd = dropped(x, k, self.dropout.as_ref(), &mut buf);
                            // g B (rows × r) feeds both dA and the LoRA part of dx.
                            let mut gb = vec![0f32; m * r];
                            matmul(&mut gb, false, 1.0, Mat::rm(g, m, n), Mat::rm(b, n, r))?;
                            let mut dx = vec![0f32; m * k];
                            g_w(&mut dx, false, g, m, w)?;
                            match &self.dropout {
                                None => {
                                    matmul(&mut dx, true, s, Mat::rm(&gb, m, r), Mat::rm(a, r, k))?
                                }
                                Some(d) => {
                                    // dD(x)/dx is the mask (×1/(1−p)) again.
                                    let mut t = vec![0f32; m * k];
                                    matmul(&mut t, false, s, Mat::rm(&gb, m, r), Mat::rm(a, r, k))?;
                                    add_through_mask(&mut dx, &t, k, d);
                                }
                            }
                            let mut da = vec![0f32; r * k];
                            matmul(&mut da, false, s, Mat::t(&gb, m, r), Mat::rm(xd, m, k))?;
                            let mut u = vec![0f32; m * r];
                            matmul(&mut u, false, 1.0, Mat::rm(xd, m, k), Mat::t(a, r, k))?;
                            let mut db = vec![0f32; n * r];
                            matmul(&mut db, false, s, Mat::t(g, m, n), Mat::rm(&u, m, r))?;
                            Ok((dx, da, db))
                        })
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// `dx += D(t)`: the LoRA path's input gradient through the dropout mask.
fn add_through_mask(dx: &mut [f32], t: &[f32], cols: usize, d: &Dropout) {
    zip_with_mask(dx, t, cols, d, |o, t, k| {
        if k != 0.0 {
            *o += t * k;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized mask is the scalar definition, entry for entry, at any offset.
    #[test]
    fn the_vector_mask_is_the_scalar_one() {
        for (seed, base, p) in [
            (1u64, 0u64, 0.05f32),
            (0xDEAD_BEEF, 12_345, 0.5),
            (7, u32::MAX as u64, 0.9),
        ] {
            let scale = 1.0 / (1.0 - p);
            let mut mask = vec![0f32; 1003];
            mask_row(seed, base, p, scale, &mut mask);
            let kept = mask.iter().filter(|&&m| m != 0.0).count() as f32 / mask.len() as f32;
            assert!((kept - (1.0 - p)).abs() < 0.06, "kept {kept} for p {p}");
            for (j, &m) in mask.iter().enumerate() {
                let want = if dropout_keep(seed, base + j as u64, p) {
                    scale
                } else {
                    0.0
                };
                assert_eq!(m, want, "entry {j}");
            }
        }
    }
}
