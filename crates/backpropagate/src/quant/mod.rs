//! The weight codecs shared by the model (QLoRA bases, bitsandbytes checkpoints) and
//! the exports (GGUF): ggml's block types, bit-exact with ggml's reference
//! (`quantize_row_q8_0_ref`, `GGML_FP32_TO_FP16`, `GGML_FP32_TO_BF16`, the k-quants),
//! and bitsandbytes' NF4/FP4. Kept below both so that the crate's dependencies run one
//! way (model → train → export).

use half::{bf16, f16};
use rayon::prelude::*;

mod decode;
pub mod kquants;
pub mod nf4;
pub mod stored;

pub use decode::decode;

/// ggml tensor types we write (ids from ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Bf16 = 30,
}

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Bf16,
    ];

    /// The type with ggml's id `id` (ggml.h), if it is one of ours.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| *t as u32 == id)
    }

    /// ggml's name for the type (`q4_k`, `bf16`), for messages and plans.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
            GgmlType::Bf16 => "bf16",
        }
    }

    /// Whether values are stored in quantized blocks (not one float per value).
    pub fn is_blocks(self) -> bool {
        self.block().0 > 1
    }

    /// Bits per value, scales included (q4_k: 4.5).
    pub fn bits(self) -> f64 {
        let (n, b) = self.block();
        8.0 * b as f64 / n as f64
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    pub fn bytes_for(self, elements: usize) -> usize {
        let (n, b) = self.block();
        elements / n * b
    }
}

pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        // half's conversion rounds to nearest even, as GGML_FP32_TO_BF16 does.
        GgmlType::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => blocks(values, ty, q8_0_block),
        GgmlType::Q4_0 => blocks(values, ty, kquants::q4_0_block),
        GgmlType::Q4_1 => blocks(values, ty, kquants::q4_1_block),
        GgmlType::Q5_0 => blocks(values, ty, kquants::q5_0_block),
        GgmlType::Q5_1 => blocks(values, ty, kquants::q5_1_block),
        GgmlType::Q4K => blocks(values, ty, kquants::q4_k_block),
        GgmlType::Q5K => blocks(values, ty, kquants::q5_k_block),
        GgmlType::Q6K => blocks(values, ty, kquants::q6_k_block),
    }
}

/// Quantizes independent blocks in parallel; the output is the same for any
/// thread count.
fn blocks(values: &[f32], ty: GgmlType, f: fn(&[f32], &mut [u8])) -> Vec<u8> {
    let (n, bytes) = ty.block();
    let mut out = vec![0u8; values.len() / n * bytes];
    out.par_chunks_mut(bytes)
        .zip(values.par_chunks(n))
        .for_each(|(o, x)| f(x, o));
    out
}

/// d = max|x| / 127; q = round(x / d) (half away from zero, as C's roundf).
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_layout() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 4.0).collect();
        let b = encode(&x, GgmlType::Q8_0);
        assert_eq!(b.len(), 34);
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((d - 4.0 / 127.0).abs() < 1e-5);
        assert_eq!(b[2] as i8, -127);
        assert_eq!(b[2 + 16] as i8, 0);
        let zeros = encode(&[0.0; 32], GgmlType::Q8_0);
        assert!(zeros.iter().all(|&v| v == 0));
    }
}
