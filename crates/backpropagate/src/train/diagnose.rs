//! Training diagnostics that turn a raw compute failure into a cause the user can act
//! on: the non-finite weight behind a NaN or infinite loss, looked for when one
//! appears. (Token ids past the vocabulary are refused by the encoder, before step 1.)

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use safetensors::Dtype;

use crate::lora::LoraSet;

/// Where a NaN or infinite loss comes from when the weights are to blame: the first
/// base tensor (in file order) or LoRA tensor holding a non-finite value, as
/// "`name` in <file>". `None` when every weight is finite or the base is not in
/// safetensors (a GGUF base), so the caller falls back to the usual suspects.
pub(super) fn non_finite_weight(model_dir: &Path, lora: &LoraSet) -> Option<String> {
    for (name, var) in lora.named_vars() {
        let values = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .ok()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Some(format!(
                "the LoRA tensor `{name}` (value {} at element {i})",
                values[i]
            ));
        }
    }
    let paths = crate::model::safetensors_paths(model_dir).ok()?;
    for path in &paths {
        // SAFETY: mapped read-only, as the trainer's own weight loader does; nothing
        // writes the base files while a run uses them.
        let files = unsafe { MmapedSafetensors::new(path) }.ok()?;
        let mut tensors = files.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            if let Some((i, v)) = first_non_finite(view.dtype(), view.data()) {
                return Some(format!(
                    "the base tensor `{name}` in {} (value {v} at element {i})",
                    path.display()
                ));
            }
        }
    }
    None
}

/// The first non-finite value of a float tensor's little-endian bytes, scanned in
/// place (no copy of the tensor); integer and quantized tensors have none.
fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, f32)> {
    let decode: fn(&[u8]) -> f32 = match dtype {
        Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::F64 => {
            |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }
        _ => return None,
    };
    let width = dtype.bitsize() / 8;
    bytes
        .chunks_exact(width)
        .map(decode)
        .enumerate()
        .find(|(_, v)| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nan_and_inf_in_every_float_width() {
        let mut f32s: Vec<u8> = [1.0f32, 2.0, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &f32s).map(|x| x.0), Some(2));
        f32s.truncate(8);
        assert_eq!(first_non_finite(Dtype::F32, &f32s), None);
        let f16s: Vec<u8> = [half::f16::ONE, half::f16::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F16, &f16s).map(|x| x.0), Some(1));
        let bf16s: Vec<u8> = [half::bf16::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::BF16, &bf16s).map(|x| x.0), Some(0));
        assert_eq!(first_non_finite(Dtype::U8, &[255, 255]), None);
    }
}
