//! `exp` (and the sums, maxima and dot products around it) for the fused ops' inner
//! loops, written so the compiler vectorizes them: libm's
//! `expf` is a call per value, and softmax over long rows (attention at 4096 tokens
//! makes billions of them per step) spent most of attention's time there. Range
//! reduction by ln 2 and a degree-6 polynomial (Cephes' `expf` coefficients): within 2
//! ulp of the true value from -87.3 to 88; `exp(-inf)` and anything below -87.3
//! give 0, anything above 88 gives exp(88).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n · LN2_HI is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LO: f32 = -87.336_55;
const ROUNDER: f32 = 12_582_912.0;
// Keeps 2^n a normal f32 (n ≤ 127): larger inputs give exp(88) ≈ 1.7e38, not inf.
const HI: f32 = 88.0;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    // Round to nearest by adding 1.5·2^23 (no `floor`, which is a call without SSE4.1).
    let t = xc * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        y * scale
    }
}

const LANES: usize = 16;

/// The largest value of `row` (−∞ for an empty row), in independent lanes so that it
/// vectorizes.
#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let m = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(m, f32::max)
}

/// `out = exp(row − shift)`; returns the sum of `out` (added in lanes, so the order is
/// fixed but not left to right).
#[inline(always)]
pub fn exp_shifted_into(row: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    for (o, &v) in out.iter_mut().zip(row) {
        *o = exp(v - shift);
    }
    sum(&out[..row.len().min(out.len())])
}

/// [`exp_shifted_into`] in place.
#[inline(always)]
pub fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f32 {
    for v in row.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(row)
}

/// The sum of `row`, in lanes.
#[inline(always)]
pub fn sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `Σ a·b`, in lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let whole = n / LANES * LANES;
    for (ca, cb) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let rest: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_saturates_like_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_97;
        }
        assert!(worst < 2.5e-7, "largest relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(200.0) > 1.0e38 && exp(200.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_and_maxima_match_the_plain_ones() {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let plain: f32 = row.iter().sum();
        assert!((sum(&row) - plain).abs() < 1e-4);
        assert_eq!(
            max(&row),
            row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let plain_dot: f32 = row.iter().map(|v| v * v).sum();
        assert!((dot(&row, &row) - plain_dot).abs() < 1e-3);
    }
}
