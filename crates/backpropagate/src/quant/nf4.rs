//! bitsandbytes 4-bit checkpoints (`*-bnb-4bit` on the Hub), as transformers saves them:
//! a linear's `weight` is u8 with two 4-bit codes per byte (high nibble first), beside
//! `weight.absmax` (one scale per `blocksize` values), `weight.quant_map` (the 16-entry
//! NF4 or FP4 code book) and `weight.quant_state.bitsandbytes__nf4` (a JSON blob stored
//! as u8: shape, dtype, blocksize). With double quantization the scales are themselves
//! u8 codes into `weight.nested_quant_map`, scaled per `nested_blocksize` by
//! `weight.nested_absmax`, plus `nested_offset`.
//!
//! value[i] = quant_map[code[i]] × absmax[i / blocksize], rounded to the stored dtype,
//! which is what `bitsandbytes.functional.dequantize_4bit` computes.

use half::{bf16, f16};
use serde::Deserialize;

/// The non-tensor half of a bitsandbytes `QuantState`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub nested_blocksize: Option<usize>,
    #[serde(default)]
    pub nested_offset: Option<f32>,
}

/// The suffixes of a 4-bit linear's companion tensors.
pub const STATE_SUFFIXES: [&str; 2] = [
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
];

impl QuantState {
    pub fn parse(bytes: &[u8]) -> Result<QuantState, String> {
        let s: QuantState = serde_json::from_slice(bytes)
            .map_err(|e| format!("unreadable bitsandbytes quant_state: {e}"))?;
        if s.blocksize == 0 || s.nested_blocksize == Some(0) {
            return Err("bitsandbytes quant_state has a zero block size".into());
        }
        if !matches!(s.dtype.as_str(), "bfloat16" | "float16" | "float32") {
            return Err(format!(
                "bitsandbytes quant_state has dtype `{}`; expected bfloat16, float16 or float32",
                s.dtype
            ));
        }
        Ok(s)
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nested(&self) -> bool {
        self.nested_blocksize.is_some()
    }
}

/// Scales of a double-quantized checkpoint: code book lookup, per-block scale, offset.
pub fn dequantize_absmax(
    codes: &[u8],
    nested_map: &[f32],
    nested_absmax: &[f32],
    nested_blocksize: usize,
    offset: f32,
) -> Result<Vec<f32>, String> {
    if nested_map.len() < 256 {
        return Err(format!(
            "nested_quant_map has {} entries; expected 256",
            nested_map.len()
        ));
    }
    if nested_absmax.len() < codes.len().div_ceil(nested_blocksize) {
        return Err("nested_absmax is shorter than the scales it covers".into());
    }
    Ok(codes
        .iter()
        .enumerate()
        .map(|(i, &c)| nested_map[c as usize] * nested_absmax[i / nested_blocksize] + offset)
        .collect())
}

/// The weight a quant-state tensor belongs to: `….weight` for
/// `….weight.quant_state.bitsandbytes__nf4`.
pub fn weight_of_state(name: &str) -> Option<&str> {
    STATE_SUFFIXES.iter().find_map(|s| name.strip_suffix(s))
}

/// Little-endian float data (safetensors F32, F16 or BF16) as f32; None for other
/// dtypes.
pub fn le_floats(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let pairs = || data.chunks_exact(2).map(|b| [b[0], b[1]]);
    match dtype {
        safetensors::Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        safetensors::Dtype::F16 => Some(pairs().map(|b| f16::from_le_bytes(b).to_f32()).collect()),
        safetensors::Dtype::BF16 => {
            Some(pairs().map(|b| bf16::from_le_bytes(b).to_f32()).collect())
        }
        _ => None,
    }
}

/// The f32 values of the 4-bit weight described by `state`, whatever holds the file:
/// `bytes(suffix)` and `floats(suffix)` read the weight's companion tensors by suffix
/// (`""` is the packed weight itself, `".absmax"` its scales, and so on).
pub fn dequantize_weight<'a>(
    state: &QuantState,
    bytes: impl Fn(&str) -> Result<std::borrow::Cow<'a, [u8]>, String>,
    floats: impl Fn(&str) -> Result<Vec<f32>, String>,
) -> Result<Vec<f32>, String> {
    let absmax = if state.nested() {
        dequantize_absmax(
            &bytes(".absmax")?,
            &floats(".nested_quant_map")?,
            &floats(".nested_absmax")?,
            state.nested_blocksize.unwrap_or(256),
            state.nested_offset.unwrap_or(0.0),
        )?
    } else {
        floats(".absmax")?
    };
    dequantize(&bytes("")?, &absmax, &floats(".quant_map")?, state)
}

/// The f32 values of a 4-bit tensor, rounded through `state.dtype` as bitsandbytes
/// returns them.
pub fn dequantize(
    packed: &[u8],
    absmax: &[f32],
    quant_map: &[f32],
    state: &QuantState,
) -> Result<Vec<f32>, String> {
    let n = state.elements();
    if packed.len() != n.div_ceil(2) {
        return Err(format!(
            "packed weight has {} bytes; shape {:?} needs {}",
            packed.len(),
            state.shape,
            n.div_ceil(2)
        ));
    }
    if quant_map.len() < 16 {
        return Err(format!(
            "quant_map has {} entries; expected 16",
            quant_map.len()
        ));
    }
    if absmax.len() < n.div_ceil(state.blocksize) {
        return Err(format!(
            "absmax has {} scales; {n} values in blocks of {} need {}",
            absmax.len(),
            state.blocksize,
            n.div_ceil(state.blocksize)
        ));
    }
    let round: fn(f32) -> f32 = match state.dtype.as_str() {
        "bfloat16" => |v| bf16::from_f32(v).to_f32(),
        "float16" => |v| f16::from_f32(v).to_f32(),
        _ => |v| v,
    };
    let mut out = Vec::with_capacity(n);
    for (j, byte) in packed.iter().enumerate() {
        for (half, code) in [(0, byte >> 4), (1, byte & 0x0f)] {
            let i = 2 * j + half;
            if i < n {
                out.push(round(
                    quant_map[code as usize] * absmax[i / state.blocksize],
                ));
            }
        }
    }
    Ok(out)
}

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): the quantiles of a standard
/// normal, normalised to [-1, 1]. Checkpoints carry their own copy in `quant_map`; this
/// one builds test fixtures.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Blockwise NF4 quantization (absmax scaling, nearest code), the inverse of
/// [`dequantize`]; used to write fixtures in the checkpoint layout.
pub fn quantize(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let absmax: Vec<f32> = values
        .chunks(blocksize)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let code = |i: usize| -> u8 {
        let scale = absmax[i / blocksize];
        let x = if scale > 0.0 { values[i] / scale } else { 0.0 };
        let mut best = 0;
        for (c, q) in NF4.iter().enumerate() {
            if (q - x).abs() < (NF4[best] - x).abs() {
                best = c;
            }
        }
        best as u8
    };
    let packed = (0..values.len().div_ceil(2))
        .map(|j| {
            let hi = code(2 * j);
            let lo = if 2 * j + 1 < values.len() {
                code(2 * j + 1)
            } else {
                0
            };
            (hi << 4) | lo
        })
        .collect();
    (packed, absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(shape: Vec<usize>, blocksize: usize, dtype: &str) -> QuantState {
        QuantState {
            quant_type: "nf4".into(),
            blocksize,
            dtype: dtype.into(),
            shape,
            nested_blocksize: None,
            nested_offset: None,
        }
    }

    #[test]
    fn nibbles_are_high_first_and_scaled_per_block() {
        // Codes 15 (1.0) and 0 (-1.0) in block 0 (absmax 2), then 7 (0.0) and 15 in block 1.
        let packed = [0xf0, 0x7f];
        let out = dequantize(&packed, &[2.0, 0.5], &NF4, &state(vec![2, 2], 2, "float32"));
        assert_eq!(out.unwrap(), vec![2.0, -2.0, 0.0, 0.5]);
    }

    #[test]
    fn values_round_through_the_stored_dtype() {
        let out = dequantize(&[0xe0], &[1.0], &NF4, &state(vec![2], 64, "bfloat16")).unwrap();
        assert_eq!(out[0], bf16::from_f32(0.722_956_84).to_f32());
        assert_ne!(out[0], 0.722_956_84);
    }

    #[test]
    fn quantize_then_dequantize_is_close_and_exact_on_codes() {
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let (packed, absmax) = quantize(&values, 64);
        let back = dequantize(&packed, &absmax, &NF4, &state(vec![16, 16], 64, "float32")).unwrap();
        for (b, v) in back.iter().zip(&values) {
            assert!((b - v).abs() <= 0.2 * absmax[0], "{b} vs {v}");
        }
        // The block maximum is code 15 or 0 exactly.
        assert!(back.iter().any(|b| *b == 2.0 || *b == -2.0));
    }

    #[test]
    fn nested_scales_add_the_offset() {
        let mut map = vec![0.0f32; 256];
        map[3] = 0.5;
        map[4] = -0.25;
        let out = dequantize_absmax(&[3, 4, 3], &map, &[2.0, 4.0], 2, 0.1).unwrap();
        assert_eq!(out, vec![1.1, -0.4, 2.1]);
    }

    #[test]
    fn bad_states_and_sizes_are_errors_not_panics() {
        assert!(QuantState::parse(b"{not json").is_err());
        let j = br#"{"quant_type":"nf4","blocksize":64,"dtype":"int8","shape":[4,4]}"#;
        assert!(QuantState::parse(j).unwrap_err().contains("int8"));
        let j = br#"{"quant_type":"nf4","blocksize":64,"dtype":"bfloat16","shape":[4,4],"nested_blocksize":256,"nested_offset":0.03}"#;
        let s = QuantState::parse(j).unwrap();
        assert!(s.nested() && s.elements() == 16);
        assert!(dequantize(&[0; 3], &[1.0], &NF4, &s).is_err());
        assert!(dequantize(&[0; 8], &[], &NF4, &s).is_err());
    }
}
