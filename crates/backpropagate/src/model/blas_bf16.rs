//! bf16 matrix products with f32 accumulation on CPUs with AVX512-BF16
//! (`--precision bf16` on the CPU): both operands are rounded to bf16 (nearest, ties
//! to even), and `VDPBF16PS` multiplies pairs of them along the inner dimension into
//! f32 sums: twice the multiply-adds per instruction of an f32 FMA, half the bytes.
//!
//! The left operand is held as rows of bf16 pairs ([`Bf16Rows`]: the kernel
//! broadcasts one pair at a time), the right one as panels of [`NR`] columns whose
//! pairs are interleaved ([`PackedB`]: one vector load per pair of rows). Every output
//! element is one sum in a fixed order, whatever the thread count, so a bf16 run is as
//! reproducible as an f32 one.

use candle_core::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// How a model's products with its frozen weights run on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Products {
    /// f32 operands and sums (a bf16/f16 weight widened exactly).
    #[default]
    F32,
    /// Both operands rounded to bf16, f32 sums (`--precision bf16` on the CPU).
    Bf16,
}

/// Rows of the output one kernel call computes.
const MR: usize = 8;
/// Columns of the output one kernel call computes: three vectors of 16 f32.
pub const NR: usize = 48;
/// Rows of the output per parallel task: the task's B panel is read from cache once
/// per kernel call, its A rows once.
const ROWS_PER_TASK: usize = 128;

/// Whether this CPU has the instructions the bf16 products need.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v` rounded to bf16 as the CPU's `VCVTNE2PS2BF16` rounds (nearest, ties to even;
/// subnormal inputs read as zero; NaN stays a quiet NaN), as its bits.
#[inline]
pub fn round_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7F80_0000 == 0 {
        return (bits >> 16) as u16 & 0x8000;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// Values a product operand can be read from, as bf16 bits.
pub trait Element: Copy + Send + Sync {
    fn bits(self) -> u16;

    /// `src` as bf16 pairs (`out` holds `src.len()/2` rounded up; an odd last value
    /// is paired with 0).
    fn pairs_of(src: &[Self], out: &mut [u32]) {
        scalar_pairs(src, out)
    }
}

/// [`Element::pairs_of`] one pair at a time.
fn scalar_pairs<T: Element>(src: &[T], out: &mut [u32]) {
    let mut chunks = src.chunks_exact(2);
    for (o, c) in out.iter_mut().zip(&mut chunks) {
        *o = pair(c[0].bits(), c[1].bits());
    }
    if let [last] = chunks.remainder() {
        out[src.len() / 2] = pair(last.bits(), 0);
    }
}

impl Element for f32 {
    #[inline]
    fn bits(self) -> u16 {
        round_bits(self)
    }

    fn pairs_of(src: &[f32], out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            let whole = src.len() / 32 * 32;
            // SAFETY: the CPU has AVX512-BF16; `out` holds whole/2 pairs.
            unsafe { x86::round_f32(&src[..whole], &mut out[..whole / 2]) };
            return scalar_pairs(&src[whole..], &mut out[whole / 2..]);
        }
        scalar_pairs(src, out)
    }
}

impl Element for bf16 {
    #[inline]
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Element for f16 {
    #[inline]
    fn bits(self) -> u16 {
        round_bits(self.to_f32())
    }
}

/// A strided read-only matrix of any [`Element`]: `at(i, j) = data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Element> View<'a, T> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        View::strided(data, rows, cols, cols, 1)
    }

    /// The transpose of `data` read as a row-major `rows × cols` matrix.
    pub fn t(data: &'a [T], rows: usize, cols: usize) -> Self {
        View::strided(data, cols, rows, 1, cols)
    }

    /// `rows × cols` with rows `rs` and columns `cs` apart.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    fn check(&self, what: &str) -> Result<()> {
        let extent = if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        };
        if extent > self.data.len() {
            bail!(
                "bf16 gemm: {what} {}×{} is larger than its {} values",
                self.rows,
                self.cols,
                self.data.len()
            );
        }
        Ok(())
    }

    /// # Safety
    /// [`View::check`] must have passed, and `i < rows`, `j < cols`.
    #[inline]
    unsafe fn at(&self, i: usize, j: usize) -> u16 {
        self.data.get_unchecked(i * self.rs + j * self.cs).bits()
    }

    /// Row `i` when its columns are adjacent.
    fn row(&self, i: usize) -> Option<&'a [T]> {
        (self.cs == 1).then(|| &self.data[i * self.rs..i * self.rs + self.cols])
    }
}

/// Pairs along the inner dimension for `k` values.
fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Two bf16 (`lo` first in memory) as the 32-bit lane the kernel reads.
#[inline]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// The left operand (`rows × k`) in bf16: each row as `k/2` pairs (zero-padded to an
/// even `k`), the rows padded with zeros to a whole number of kernel rows.
pub struct Bf16Rows {
    data: Vec<u32>,
    rows: usize,
    k: usize,
}

impl Bf16Rows {
    pub fn new<T: Element>(a: View<T>) -> Result<Self> {
        let _span = super::profile::span(super::profile::Part::Gemm);
        a.check("lhs")?;
        let kp = pairs(a.cols);
        let padded = a.rows.div_ceil(MR) * MR;
        let mut data = vec![0u32; padded * kp];
        if kp > 0 {
            data.par_chunks_mut(kp)
                .take(a.rows)
                .enumerate()
                .for_each(|(i, out)| match a.row(i) {
                    Some(src) => T::pairs_of(src, out),
                    None => {
                        for (p, out) in out.iter_mut().enumerate() {
                            // SAFETY: checked above; i < rows, 2p (+1 when tested) < cols.
                            let (lo, hi) = unsafe {
                                let hi = 2 * p + 1 < a.cols;
                                (a.at(i, 2 * p), if hi { a.at(i, 2 * p + 1) } else { 0 })
                            };
                            *out = pair(lo, hi);
                        }
                    }
                });
        }
        Ok(Bf16Rows {
            data,
            rows: a.rows,
            k: a.cols,
        })
    }
}

/// The right operand (`k × n`) in bf16 for the kernel: panels of [`NR`] columns (the
/// last one zero-padded), each holding, pair of rows after pair of rows, the pairs
/// `(b[2p][j], b[2p+1][j])` of its columns.
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    pub fn new<T: Element>(b: View<T>) -> Result<Self> {
        let _span = super::profile::span(super::profile::Part::Gemm);
        b.check("rhs")?;
        let kp = pairs(b.rows);
        let panels = b.cols.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        if kp > 0 {
            data.par_chunks_mut(kp * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    let j0 = panel * NR;
                    let width = NR.min(b.cols - j0);
                    if b.rs == 1 {
                        // Columns of b adjacent along k (b is a transposed row-major
                        // weight): each column's pairs are one run of memory, written
                        // into the panel a block of 16 pairs at a time.
                        let t = View::strided(b.data, b.cols, b.rows, b.cs, 1);
                        let mut block = vec![0u32; 16 * kp];
                        for c0 in (0..width).step_by(16) {
                            let cols = 16.min(width - c0);
                            for c in 0..cols {
                                let col = t.row(j0 + c0 + c).expect("unit stride");
                                T::pairs_of(col, &mut block[c * kp..(c + 1) * kp]);
                            }
                            for p0 in (0..kp).step_by(16) {
                                for p in p0..(p0 + 16).min(kp) {
                                    let dst = &mut out[p * NR + c0..p * NR + c0 + cols];
                                    for (c, d) in dst.iter_mut().enumerate() {
                                        *d = block[c * kp + p];
                                    }
                                }
                            }
                        }
                        return;
                    }
                    if b.cs == 1 {
                        // Rows of b adjacent: a pair of rows interleaved.
                        for p in 0..kp {
                            let dst = &mut out[p * NR..p * NR + width];
                            let r0 = &b.data[2 * p * b.rs + j0..][..width];
                            if 2 * p + 1 < b.rows {
                                let r1 = &b.data[(2 * p + 1) * b.rs + j0..][..width];
                                for ((d, x), y) in dst.iter_mut().zip(r0).zip(r1) {
                                    *d = pair(x.bits(), y.bits());
                                }
                            } else {
                                for (d, x) in dst.iter_mut().zip(r0) {
                                    *d = pair(x.bits(), 0);
                                }
                            }
                        }
                        return;
                    }
                    for p in 0..kp {
                        let row = &mut out[p * NR..p * NR + width];
                        let (r0, r1) = (2 * p, 2 * p + 1);
                        for (c, out) in row.iter_mut().enumerate() {
                            // SAFETY: checked above; r0 (and r1 when tested) < rows,
                            // j0 + c < cols.
                            *out = unsafe {
                                let hi = if r1 < b.rows { b.at(r1, j0 + c) } else { 0 };
                                pair(b.at(r0, j0 + c), hi)
                            };
                        }
                    }
                });
        }
        Ok(PackedB {
            data,
            k: b.rows,
            n: b.cols,
        })
    }

    /// Columns of the packed matrix (`n`).
    pub fn cols(&self) -> usize {
        self.n
    }
}

/// A raw pointer handed to the parallel tasks, which write disjoint tiles.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: every task writes only its own rows × columns of the destination.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// # Safety
    /// `offset` must be within the destination.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// `dst = (accumulate ? dst : 0) + beta · a · b`, `dst` with rows `dst_rs` apart
/// (at least `b.cols()`), multi-threaded. Needs [`supported`] (checked).
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    beta: f32,
    a: &Bf16Rows,
    b: &PackedB,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.k, b.n);
    if b.k != k {
        bail!("bf16 gemm: ({m}×{k}) · ({}×{n}) do not chain", b.k);
    }
    if dst_rs < n || (m > 0 && dst.len() < (m - 1) * dst_rs + n) {
        bail!(
            "bf16 gemm: destination of {} values does not hold {m}×{n} with rows {dst_rs} apart",
            dst.len()
        );
    }
    if !supported() {
        bail!("bf16 gemm: this CPU has no AVX512-BF16");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let kp = pairs(k);
    let panels = n.div_ceil(NR);
    let row_blocks = m.div_ceil(ROWS_PER_TASK);
    let out = Dst(dst.as_mut_ptr());
    let _span = super::profile::span(super::profile::Part::Gemm);
    (0..panels * row_blocks).into_par_iter().for_each(|task| {
        let (panel, block) = (task % panels, task / panels);
        let j0 = panel * NR;
        let cols = NR.min(n - j0);
        let bp = &b.data[panel * kp * NR..(panel + 1) * kp * NR];
        let r_end = ((block + 1) * ROWS_PER_TASK).min(m);
        for i0 in (block * ROWS_PER_TASK..r_end).step_by(MR) {
            let rows = MR.min(m - i0);
            let ap = &a.data[i0 * kp..(i0 + MR) * kp];
            // SAFETY: `ap` holds MR rows of kp pairs (rows are padded to MR), `bp` kp
            // pairs of NR columns; the tile's rows i0..i0+rows and columns
            // j0..j0+cols are inside `dst` (checked above) and no other task's.
            unsafe {
                let c = out.at(i0 * dst_rs + j0);
                tile(kp, ap, bp, c, dst_rs, rows, cols, accumulate, beta);
            }
        }
    });
    Ok(())
}

/// One MR × NR tile of the output from MR rows of pairs and one B panel.
///
/// # Safety
/// `c` must be valid for `rows` rows of `cols` values, `ldc` apart, written by no one
/// else meanwhile; the CPU must have AVX512-BF16.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    beta: f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        x86::tile(kp, a, b, c, ldc, rows, cols, accumulate, beta)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kp, a, b, c, ldc, rows, cols, accumulate, beta);
        unreachable!("bf16 products are refused without AVX512-BF16")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `src` (a multiple of 32 values) rounded to bf16 into `out` (half as many pairs).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_f32(src: &[f32], out: &mut [u32]) {
        debug_assert!(src.len().is_multiple_of(32) && out.len() * 2 == src.len());
        for (s, o) in src.chunks_exact(32).zip(out.chunks_exact_mut(16)) {
            let lo = _mm512_loadu_ps(s.as_ptr());
            let hi = _mm512_loadu_ps(s.as_ptr().add(16));
            let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(o.as_mut_ptr() as *mut __m512i, r);
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(
        kp: usize,
        a: &[u32],
        b: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
        beta: f32,
    ) {
        debug_assert!(a.len() >= MR * kp && b.len() >= NR * kp);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for p in 0..kp {
            let bv = bp.add(p * NR) as *const __m512i;
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bv));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bv.add(1)));
            let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bv.add(2)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(r * kp + p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                acc[2] = _mm512_dpbf16_ps(acc[2], av, b2);
            }
        }
        let scale = _mm512_set1_ps(beta);
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let row = c.add(r * ldc);
            for (v, &sum) in acc.iter().enumerate() {
                let lanes = cols.saturating_sub(v * 16).min(16);
                if lanes == 0 {
                    break;
                }
                let mask: __mmask16 = if lanes == 16 {
                    0xFFFF
                } else {
                    (1u16 << lanes) - 1
                };
                let at = row.add(v * 16);
                let out = if accumulate {
                    _mm512_fmadd_ps(sum, scale, _mm512_maskz_loadu_ps(mask, at))
                } else {
                    _mm512_mul_ps(sum, scale)
                };
                _mm512_mask_storeu_ps(at, mask, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: u64) -> Vec<f32> {
        let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn bf(v: f32) -> f64 {
        f32::from_bits((round_bits(v) as u32) << 16) as f64
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bits(1.0), 0x3F80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even 1.
        assert_eq!(round_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(round_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(round_bits(-2.5), bf16::from_f32(-2.5).to_bits());
        assert!(f32::from_bits((round_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(round_bits(-f32::from_bits(0x007F_FFFF)), 0x8000);
        for v in values(1000, 9) {
            assert_eq!(round_bits(v * 1e3), bf16::from_f32(v * 1e3).to_bits());
        }
    }

    /// The vector conversion and [`round_bits`] agree on every kind of value,
    /// subnormals and NaN included, so packed operands do not depend on alignment.
    #[test]
    fn vector_and_scalar_rounding_agree() {
        let mut src = values(1000, 4);
        for (i, bits) in [
            0x0000_8001u32,
            0x807F_FFFF,
            0x7F80_0001,
            0x7FC0_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x7F7F_FFFF,
        ]
        .into_iter()
        .enumerate()
        {
            src[i * 37] = f32::from_bits(bits);
        }
        let mut out = vec![0u32; 500];
        f32::pairs_of(&src, &mut out);
        for (i, v) in src.iter().enumerate() {
            let got = (out[i / 2] >> (16 * (i % 2))) as u16;
            assert_eq!(got, round_bits(*v), "value {i}: {:#010x}", v.to_bits());
        }
    }

    /// Odd shapes (edge tiles in both directions, an odd inner dimension, transposed
    /// and strided operands, accumulation with a scale): the kernel's sums equal the
    /// sums of the bf16-rounded inputs, and stay within 1 % of the f32 product.
    #[test]
    fn products_equal_the_bf16_rounded_definition() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (m, k, n) in [(1, 1, 1), (13, 37, 50), (130, 64, 97), (9, 300, 48)] {
            let a = values(m * k, 1);
            let bt = values(n * k, 2); // b stored transposed (n × k)
            let mut want = vec![0f64; m * n];
            let mut exact = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    for p in 0..k {
                        want[i * n + j] += bf(a[i * k + p]) * bf(bt[j * k + p]);
                        exact[i * n + j] += a[i * k + p] as f64 * bt[j * k + p] as f64;
                    }
                }
            }
            let lhs = Bf16Rows::new(View::rm(&a, m, k)).unwrap();
            let rhs = PackedB::new(View::t(&bt, n, k)).unwrap();
            let dst_rs = n + 3;
            let mut got = vec![0.5f32; m * dst_rs];
            matmul(&mut got, dst_rs, true, 2.0, &lhs, &rhs).unwrap();
            let (mut err, mut norm) = (0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let g = got[i * dst_rs + j] as f64;
                    let w = 0.5 + 2.0 * want[i * n + j];
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{m}×{k}×{n} at {i},{j}"
                    );
                    err += (g - 0.5 - 2.0 * exact[i * n + j]).powi(2);
                    norm += (2.0 * exact[i * n + j]).powi(2);
                }
                for j in n..dst_rs.min(got.len() - i * dst_rs) {
                    assert_eq!(got[i * dst_rs + j], 0.5, "wrote past the columns");
                }
            }
            assert!(
                err.sqrt() <= 0.01 * norm.sqrt(),
                "{m}×{k}×{n}: {}",
                err.sqrt() / norm.sqrt()
            );
            // The same product from a bf16 row-major copy of b, without accumulation.
            let b_rm: Vec<bf16> = (0..k * n)
                .map(|i| bf16::from_f32(bt[(i % n) * k + i / n]))
                .collect();
            let rhs = PackedB::new(View::rm(&b_rm, k, n)).unwrap();
            let mut plain = vec![7f32; m * n];
            matmul(&mut plain, n, false, 1.0, &lhs, &rhs).unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert!(
                        (plain[i * n + j] as f64 - want[i * n + j]).abs()
                            <= 1e-5 * (1.0 + want[i * n + j].abs())
                    );
                }
            }
        }
        let lhs = Bf16Rows::new(View::rm(&[1f32; 6], 2, 3)).unwrap();
        let rhs = PackedB::new(View::rm(&[1f32; 8], 4, 2)).unwrap();
        assert!(matmul(&mut [0f32; 4], 2, false, 1.0, &lhs, &rhs).is_err());
        assert!(View::rm(&[1f32; 5], 2, 3).check("lhs").is_err());
    }
}
