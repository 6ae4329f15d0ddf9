//! Products with a frozen weight (out × in, row-major) that the CPU keeps in fewer
//! bits than f32 — the checkpoint's bf16/f16, or ggml blocks for QLoRA — converted to
//! f32 a band of rows at a time inside the product. No f32 copy of a whole weight ever
//! exists: for a 7B model's MLP projection that copy would be ~230 MB per call, and it
//! was the transient peak of QLoRA on the CPU.

use candle_core::quantized::GgmlDType;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::blas::{matmul, matmul_into_columns, Mat};
use super::blas_bf16::{self, Bf16Rows, Element, PackedB, Products, View};
use super::cpu_values::{values, with_values};
use super::qlinear::FrozenWeight;
use crate::quant::{decode, GgmlType};

/// Values converted per band: 2 Mi f32 (8 MiB). Small models' weights are one band,
/// so they are converted exactly as often as before.
const BAND_VALUES: usize = 1 << 21;

enum Stored<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    Blocks(&'a [u8], GgmlType),
}

/// A frozen weight's stored values, borrowed for one product.
pub struct FrozenMat<'a> {
    stored: Stored<'a>,
    rows: usize,
    cols: usize,
    band_rows: usize,
    products: Products,
}

impl FrozenMat<'_> {
    /// Rows `r0..r1` as f32: borrowed when stored as f32, else converted into `buf`.
    fn band<'b>(&'b self, r0: usize, r1: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let k = self.cols;
        let out_len = (r1 - r0) * k;
        match &self.stored {
            Stored::F32(v) => return &v[r0 * k..r1 * k],
            Stored::Bf16(v) => widen(&v[r0 * k..r1 * k], resized(buf, out_len), bf16::to_f32),
            Stored::F16(v) => widen(&v[r0 * k..r1 * k], resized(buf, out_len), f16::to_f32),
            Stored::Blocks(bytes, ty) => {
                let per_row = ty.bytes_for(k);
                decode(
                    &bytes[r0 * per_row..r1 * per_row],
                    *ty,
                    resized(buf, out_len),
                );
            }
        }
        buf
    }

    /// Rows `r0..r1` packed for a bf16 product: as its transpose (`x Wᵀ`) or as is
    /// (`g W`). Ggml blocks are decoded into `buf` first.
    fn packed_band(
        &self,
        r0: usize,
        r1: usize,
        transposed: bool,
        buf: &mut Vec<f32>,
    ) -> Result<PackedB> {
        fn pack<T: Element>(v: &[T], rows: usize, k: usize, transposed: bool) -> Result<PackedB> {
            if transposed {
                PackedB::new(View::t(v, rows, k))
            } else {
                PackedB::new(View::rm(v, rows, k))
            }
        }
        let (k, rows) = (self.cols, r1 - r0);
        match &self.stored {
            Stored::Bf16(v) => pack(&v[r0 * k..r1 * k], rows, k, transposed),
            Stored::F16(v) => pack(&v[r0 * k..r1 * k], rows, k, transposed),
            _ => pack(self.band(r0, r1, buf), rows, k, transposed),
        }
    }

    fn bands(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.rows)
            .step_by(self.band_rows)
            .map(|r0| (r0, (r0 + self.band_rows).min(self.rows)))
    }
}

fn resized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

fn widen<T: Copy + Sync>(src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s)));
}

fn block_type(dtype: GgmlDType) -> Option<GgmlType> {
    Some(match dtype {
        GgmlDType::F32 => GgmlType::F32,
        GgmlDType::F16 => GgmlType::F16,
        GgmlDType::BF16 => GgmlType::Bf16,
        GgmlDType::Q8_0 => GgmlType::Q8_0,
        GgmlDType::Q4_0 => GgmlType::Q4_0,
        GgmlDType::Q4_1 => GgmlType::Q4_1,
        GgmlDType::Q5_0 => GgmlType::Q5_0,
        GgmlDType::Q5_1 => GgmlType::Q5_1,
        GgmlDType::Q4K => GgmlType::Q4K,
        GgmlDType::Q5K => GgmlType::Q5K,
        GgmlDType::Q6K => GgmlType::Q6K,
        _ => return None,
    })
}

/// Whether the CPU products can read `w` (else the basic-op layer is used).
pub fn supports(w: &FrozenWeight) -> bool {
    match w {
        FrozenWeight::Dense(t) => {
            t.device().is_cpu()
                && t.is_contiguous()
                && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        }
        FrozenWeight::Quant(q) => q.device().is_cpu() && block_type(q.dtype()).is_some(),
    }
}

/// `w`'s stored values handed to `f` as a [`FrozenMat`], with bands of
/// [`BAND_VALUES`], for products in `products`.
pub fn with_frozen<R>(
    w: &FrozenWeight,
    products: Products,
    f: impl FnOnce(&FrozenMat) -> Result<R>,
) -> Result<R> {
    with_frozen_banded(w, BAND_VALUES, products, f)
}

fn with_frozen_banded<R>(
    w: &FrozenWeight,
    band_values: usize,
    products: Products,
    f: impl FnOnce(&FrozenMat) -> Result<R>,
) -> Result<R> {
    let mat = |stored, rows: usize, cols: usize| FrozenMat {
        stored,
        rows,
        cols,
        band_rows: (band_values / cols.max(1)).clamp(1, rows.max(1)),
        products,
    };
    match w {
        FrozenWeight::Dense(t) => {
            let (rows, cols) = t.dims2()?;
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("frozen linear: the weight is not on the CPU");
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("frozen linear: needs a contiguous weight");
            };
            let stored = match cpu {
                CpuStorage::F32(v) => Stored::F32(&v[start..end]),
                CpuStorage::BF16(v) => Stored::Bf16(&v[start..end]),
                CpuStorage::F16(v) => Stored::F16(&v[start..end]),
                _ => bail!("frozen linear: takes f32, bf16 or f16 weights"),
            };
            f(&mat(stored, rows, cols))
        }
        FrozenWeight::Quant(q) => {
            let (rows, cols) = q.shape().dims2()?;
            let Some(ty) = block_type(q.dtype()) else {
                bail!("frozen linear: no decoder for {:?}", q.dtype());
            };
            let bytes = q.data()?;
            if bytes.len() != rows * ty.bytes_for(cols) {
                bail!("frozen linear: {rows}×{cols} {ty:?} does not fill its bytes");
            }
            f(&mat(Stored::Blocks(&bytes, ty), rows, cols))
        }
    }
}

/// `y (m × n) = (accumulate ? y : 0) + x (m × k) · Wᵀ`.
pub fn x_wt(y: &mut [f32], accumulate: bool, x: &[f32], m: usize, w: &FrozenMat) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    let mut buf = Vec::new();
    if w.products == Products::Bf16 {
        let x = Bf16Rows::new(View::rm(x, m, k))?;
        for (r0, r1) in w.bands() {
            let band = w.packed_band(r0, r1, true, &mut buf)?;
            blas_bf16::matmul(&mut y[r0..], n, accumulate, 1.0, &x, &band)?;
        }
        return Ok(());
    }
    for (r0, r1) in w.bands() {
        let band = w.band(r0, r1, &mut buf);
        let (x, band) = (Mat::rm(x, m, k), Mat::t(band, r1 - r0, k));
        matmul_into_columns(&mut y[r0..], n, accumulate, 1.0, x, band)?;
    }
    Ok(())
}

/// `dx (m × k) = (accumulate ? dx : 0) + g (m × n) · W`.
pub fn g_w(dx: &mut [f32], accumulate: bool, g: &[f32], m: usize, w: &FrozenMat) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    let mut buf = Vec::new();
    if w.products == Products::Bf16 {
        for (i, (r0, r1)) in w.bands().enumerate() {
            let g = Bf16Rows::new(View::strided(&g[r0..], m, r1 - r0, n, 1))?;
            let band = w.packed_band(r0, r1, false, &mut buf)?;
            blas_bf16::matmul(dx, k, accumulate || i > 0, 1.0, &g, &band)?;
        }
        return Ok(());
    }
    for (i, (r0, r1)) in w.bands().enumerate() {
        let band = w.band(r0, r1, &mut buf);
        let g = Mat::rows_apart(&g[r0..], m, r1 - r0, n);
        matmul(dx, accumulate || i > 0, 1.0, g, Mat::rm(band, r1 - r0, k))?;
    }
    Ok(())
}

/// A frozen linear without LoRA on the CPU: `y = x Wᵀ + b`, backward `dx = g W`
/// (nothing flows to the weight or the bias).
#[derive(Clone)]
pub struct FrozenLinear {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub products: Products,
}

impl FrozenLinear {
    /// `y` for `x` (any leading shape, features last; CPU f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let x2 = x.reshape((x.elem_count() / k.max(1), k))?.contiguous()?;
        let y = x2.apply_op1(self.clone())?;
        let mut out = dims;
        *out.last_mut().expect("x has a feature dimension") = self.weight.rows()?;
        y.reshape(out)
    }
}

/// `y = bias` broadcast over rows (`Some(true)`), or nothing to accumulate onto.
pub fn init_with_bias(y: &mut [f32], n: usize, bias: Option<&Tensor>) -> Result<bool> {
    match bias {
        Some(bias) => with_values(bias, |bias| {
            y.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bias));
            Ok(true)
        }),
        None => Ok(false),
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let x = values(xs, xl)?;
        let n = self.weight.rows()?;
        let mut y = vec![0f32; m * n];
        let has_bias = init_with_bias(&mut y, n, self.bias.as_ref())?;
        with_frozen(&self.weight, self.products, |w| {
            x_wt(&mut y, has_bias, x, m, w)
        })?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        let mut dx = vec![0f32; m * k];
        with_values(g, |g| {
            with_frozen(&self.weight, self.products, |w| {
                g_w(&mut dx, false, g, m, w)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (m, k), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BaseQuant;
    use candle_core::Device;

    fn values_of(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104729) % 2003) as f32 / 2003.0 - 0.5)
            .collect()
    }

    /// Banded products (bands of 3 rows, so several and a short last one) equal the
    /// plain product with the whole weight converted once, for bf16, f16 and blocks.
    #[test]
    fn banded_products_equal_the_converted_weight_product() {
        let (m, n, k) = (5, 11, 64);
        let dev = Device::Cpu;
        let x = values_of(m * k, 1);
        let g = values_of(m * n, 2);
        let w = values_of(n * k, 3);
        let dense = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
        let weights = [
            FrozenWeight::Dense(dense.to_dtype(DType::BF16).unwrap()),
            FrozenWeight::Dense(dense.to_dtype(DType::F16).unwrap()),
            FrozenWeight::from_f32(w.clone(), n, k, BaseQuant::Q8_0, &dev).unwrap(),
            FrozenWeight::from_f32(w, n, k, BaseQuant::Q4K, &dev).unwrap(),
        ];
        for weight in weights {
            let full: Vec<f32> = weight
                .to_dense()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut want_y = vec![0f32; m * n];
            matmul(
                &mut want_y,
                false,
                1.0,
                Mat::rm(&x, m, k),
                Mat::t(&full, n, k),
            )
            .unwrap();
            let mut want_dx = vec![0f32; m * k];
            matmul(
                &mut want_dx,
                false,
                1.0,
                Mat::rm(&g, m, n),
                Mat::rm(&full, n, k),
            )
            .unwrap();
            let (mut y, mut dx) = (vec![0f32; m * n], vec![0f32; m * k]);
            with_frozen_banded(&weight, 3 * k, Products::F32, |w| {
                assert_eq!(w.bands().count(), 4);
                x_wt(&mut y, false, &x, m, w)?;
                g_w(&mut dx, false, &g, m, w)
            })
            .unwrap();
            assert_eq!(y, want_y);
            let close = dx.iter().zip(&want_dx).all(|(a, b)| (a - b).abs() <= 1e-6);
            assert!(close, "dx differs: the bands add up in another order only");
        }
    }
}
