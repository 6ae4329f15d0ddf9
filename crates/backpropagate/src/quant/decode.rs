//! ggml block types back to f32, value for value what ggml's `dequantize_row_*` (and
//! candle's port of it) give: the fused CPU ops decode a frozen weight a band of rows
//! at a time instead of holding a dequantized copy, and GGUF bases are read with it.

use half::{bf16, f16};
use rayon::prelude::*;

use super::kquants::QK_K;
use super::GgmlType;

#[inline]
fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Decodes whole blocks of `ty` from `bytes` into `out` (as many values as the
/// blocks hold). Panics on lengths that are not whole blocks: callers size both.
pub fn decode(bytes: &[u8], ty: GgmlType, out: &mut [f32]) {
    let (n, size) = ty.block();
    assert_eq!(
        bytes.len() / size * n,
        out.len(),
        "decode: lengths do not match"
    );
    assert_eq!(bytes.len() % size, 0, "decode: not whole blocks");
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, o| {
            for (o, b) in o.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        },
        GgmlType::F16 => |b, o| o[0] = half(b),
        GgmlType::Bf16 => |b, o| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
    };
    // Blocks are independent; a few hundred per task keeps rayon's overhead small.
    let per_task = 256;
    out.par_chunks_mut(n * per_task)
        .zip(bytes.par_chunks(size * per_task))
        .for_each(|(o, b)| {
            for (o, b) in o.chunks_exact_mut(n).zip(b.chunks_exact(size)) {
                f(b, o);
            }
        });
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b), half(&b[2..]));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((q & 0x0f) as i32 | h0) - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as i32 | h1) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b), half(&b[2..]));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((q & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// The j-th 6-bit scale and min of a q4_K/q5_K block (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b), half(&b[2..]));
    let scales = &b[4..16];
    let q = &b[16..144];
    for (chunk, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min(2 * chunk, scales);
        let (sc2, m2) = scale_min(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &q[32 * chunk..32 * chunk + 32];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b), half(&b[2..]));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for (chunk, y) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min(2 * chunk, scales);
        let (sc2, m2) = scale_min(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let ql = &ql[32 * chunk..32 * chunk + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0f) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(&b[208..210]);
    for (chunk, y) in y.chunks_exact_mut(128).enumerate() {
        let ql = &b[64 * chunk..64 * chunk + 64];
        let qh = &b[128 + 32 * chunk..128 + 32 * chunk + 32];
        let sc = &b[192 + 8 * chunk..192 + 8 * chunk + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | (qh[l] & 3) << 4) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
            let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

const _: () = assert!(QK_K == 256);

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use candle_core::Device;

    use super::*;
    use crate::quant::encode;

    /// Every block type decodes to exactly what candle's own dequantization (a port
    /// of ggml's) gives for the same bytes, on values with outliers and zero blocks.
    #[test]
    fn decoding_equals_candle_dequantize_for_every_block_type() {
        let n = 4 * 256;
        let mut x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 37) as f32))
            .collect();
        x[5] = 40.0;
        x[300] = -55.0;
        x[512..768].fill(0.0);
        for (ours, theirs) in [
            (GgmlType::Q8_0, GgmlDType::Q8_0),
            (GgmlType::Q4_0, GgmlDType::Q4_0),
            (GgmlType::Q4_1, GgmlDType::Q4_1),
            (GgmlType::Q5_0, GgmlDType::Q5_0),
            (GgmlType::Q5_1, GgmlDType::Q5_1),
            (GgmlType::Q4K, GgmlDType::Q4K),
            (GgmlType::Q5K, GgmlDType::Q5K),
            (GgmlType::Q6K, GgmlDType::Q6K),
            (GgmlType::F16, GgmlDType::F16),
            (GgmlType::Bf16, GgmlDType::BF16),
            (GgmlType::F32, GgmlDType::F32),
        ] {
            let bytes = encode(&x, ours);
            let storage = QStorage::from_data(Cow::Borrowed(&bytes), &Device::Cpu, theirs).unwrap();
            let want = QTensor::new(storage, (4, 256))
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut got = vec![f32::NAN; n];
            decode(&bytes, ours, &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ours:?} decodes differently from candle");
        }
    }
}
