//! Reading base weights for exports: one tensor at a time with plain positioned reads
//! (not a memory map, whose touched pages would stay resident and make an export of a
//! 14 GB model look like a 14 GB process), converted to f32, with the LoRA delta
//! added in row chunks so no second full-size buffer is ever allocated.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::lora::LoraLayer;
use crate::model::safetensors_paths;
use crate::quant::nf4::{dequantize_weight, le_floats, weight_of_state, QuantState};
use crate::quant::{stored, GgmlType};

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

pub struct BaseReader {
    files: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    /// bitsandbytes 4-bit weights by name; their companions stay in `entries`.
    nf4: HashMap<String, QuantState>,
    /// Tensors kept as ggml blocks (a GGUF base), by name, with their logical shape.
    blocks: HashMap<String, (GgmlType, Vec<usize>)>,
    dir: PathBuf,
}

impl BaseReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = safetensors_paths(dir)?;
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
            let len = u64::from_le_bytes(len);
            if len > 100 << 20 {
                return Err(Error::model(
                    path,
                    "safetensors header is implausibly large; is the file corrupt?",
                ));
            }
            let mut header = vec![0u8; len as usize];
            f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
            let header: Value = serde_json::from_slice(&header)
                .map_err(|e| Error::model(path, format!("unreadable safetensors header: {e}")))?;
            let base = 8 + len;
            for (name, info) in header.as_object().into_iter().flatten() {
                if name == "__metadata__" {
                    continue;
                }
                let bad = || Error::model(path, format!("bad header entry for `{name}`"));
                let offsets = info["data_offsets"].as_array().ok_or_else(bad)?;
                let (Some(start), Some(end)) = (
                    offsets.first().and_then(Value::as_u64),
                    offsets.get(1).and_then(Value::as_u64),
                ) else {
                    return Err(bad());
                };
                let shape = info["shape"]
                    .as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                    .collect::<Result<Vec<_>>>()?;
                let dtype = serde_json::from_value(info["dtype"].clone()).map_err(|_| bad())?;
                entries.insert(
                    name.clone(),
                    Entry {
                        file: i,
                        dtype,
                        shape,
                        start: base + start,
                        end: base + end,
                    },
                );
            }
        }
        let mut reader = BaseReader {
            files,
            entries,
            nf4: HashMap::new(),
            blocks: HashMap::new(),
            dir: dir.to_path_buf(),
        };
        let types: Vec<String> = reader
            .entries
            .keys()
            .filter(|n| stored::weight_of_type_tensor(n).is_some())
            .cloned()
            .collect();
        for type_name in types {
            let bytes = reader.read_bytes(&type_name)?;
            let weight = stored::weight_of_type_tensor(&type_name).unwrap_or(&type_name);
            let ty = stored::type_of(reader.entries[&type_name].dtype, &bytes)
                .map_err(|e| Error::model(&reader.dir, format!("`{weight}`: {e}")))?;
            let e = reader
                .entries
                .get(weight)
                .ok_or_else(|| Error::model(&reader.dir, format!("missing tensor `{weight}`")))?;
            // Stored as (rows, bytes per row): the logical shape is (rows, values per row).
            let [rows, row_bytes] = e.shape[..] else {
                return Err(Error::model(
                    &reader.dir,
                    format!("`{weight}`: ggml blocks must be stored as (rows, bytes per row)"),
                ));
            };
            let (n, b) = ty.block();
            let shape = vec![rows, row_bytes / b * n];
            stored::check(ty, e.dtype, &e.shape, &shape)
                .map_err(|err| Error::model(&reader.dir, format!("`{weight}`: {err}")))?;
            reader.blocks.insert(weight.to_string(), (ty, shape));
        }
        let states: Vec<String> = reader
            .entries
            .keys()
            .filter(|n| weight_of_state(n).is_some())
            .cloned()
            .collect();
        for state_name in states {
            let bytes = reader.read_bytes(&state_name)?;
            let state = QuantState::parse(&bytes)
                .map_err(|e| Error::model(&reader.dir, format!("`{state_name}`: {e}")))?;
            let weight = weight_of_state(&state_name).unwrap_or(&state_name);
            reader.nf4.insert(weight.to_string(), state);
        }
        Ok(reader)
    }

    /// Whether `name` is a bitsandbytes companion (`….weight.absmax` and the like) or
    /// the ggml type of a blocks tensor.
    fn is_companion(&self, name: &str) -> bool {
        if stored::weight_of_type_tensor(name).is_some_and(|w| self.blocks.contains_key(w)) {
            return true;
        }
        self.nf4.keys().any(|w| {
            name.len() > w.len() && name.starts_with(w) && name[w.len()..].starts_with('.')
        })
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::model(&self.dir, format!("missing tensor `{name}`")))?;
        let path = &self.files[e.file];
        let mut f = File::open(path).map_err(|err| Error::io(path, err))?;
        f.seek(SeekFrom::Start(e.start))
            .map_err(|err| Error::io(path, err))?;
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        f.read_exact(&mut bytes)
            .map_err(|err| Error::io(path, err))?;
        Ok(bytes)
    }

    /// A bitsandbytes 4-bit weight, dequantized as bitsandbytes does.
    fn read_nf4(&self, name: &str, state: &QuantState) -> Result<Vec<f32>> {
        dequantize_weight(
            state,
            |suffix| {
                self.read_bytes(&format!("{name}{suffix}"))
                    .map(Cow::Owned)
                    .map_err(|e| e.to_string())
            },
            |suffix| {
                self.read_f32(&format!("{name}{suffix}"))
                    .map_err(|e| e.to_string())
            },
        )
        .map_err(|e| Error::model(&self.dir, format!("4-bit tensor `{name}`: {e}")))
    }

    /// Tensor names with their shapes, sorted by name; a bitsandbytes 4-bit weight is
    /// listed once, with its real shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<_> = self
            .entries
            .iter()
            .filter(|(n, _)| !self.is_companion(n))
            .map(|(n, e)| match (self.nf4.get(n), self.blocks.get(n)) {
                (Some(state), _) => (n.clone(), state.shape.clone()),
                (None, Some((_, shape))) => (n.clone(), shape.clone()),
                (None, None) => (n.clone(), e.shape.clone()),
            })
            .collect();
        out.sort();
        out
    }

    /// A tensor as f32 values (row-major).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(state) = self.nf4.get(name) {
            return self.read_nf4(name, state);
        }
        let bytes = self.read_bytes(name)?;
        let e = &self.entries[name];
        let path = &self.files[e.file];
        if let Some((ty, shape)) = self.blocks.get(name) {
            return stored::decode(*ty, &bytes, shape.iter().product())
                .map_err(|err| Error::model(path, format!("tensor `{name}`: {err}")));
        }
        le_floats(e.dtype, &bytes).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "tensor `{name}` is {:?}; only f32, f16 and bf16 bases can be exported",
                    e.dtype
                ),
            )
        })
    }
}

/// Adds `scale · B·A` to the row-major (out × in) weight `w`, 256 rows at a time.
pub fn add_lora(w: &mut [f32], layer: &LoraLayer, scale: f64) -> Result<()> {
    let a = layer.a.as_tensor();
    let b = layer.b.as_tensor();
    let (out_f, _) = b.dims2()?;
    let in_f = a.dims2()?.1;
    const ROWS: usize = 256;
    let mut r0 = 0;
    while r0 < out_f {
        let n = ROWS.min(out_f - r0);
        let delta: Vec<f32> = (b.narrow(0, r0, n)?.matmul(a)? * scale)?
            .flatten_all()?
            .to_vec1()?;
        for (w, d) in w[r0 * in_f..(r0 + n) * in_f].iter_mut().zip(delta) {
            *w += d;
        }
        r0 += n;
    }
    Ok(())
}

/// Reorders the rows of a row-major (rows × cols) tensor per head, as llama.cpp's
/// rotary layout for the llama architecture wants: within each head, the first and
/// second halves of the rows are interleaved (`reshape(heads, 2, d/2, ..)
/// .swapaxes(1, 2)`).
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let head = rows / heads;
    let half = head / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for i in 0..half {
            for part in 0..2 {
                let src = h * head + part * half + i;
                out.extend_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_rotary_halves_per_head() {
        // 2 heads of 4 rows: [0 1 2 3 | 4 5 6 7] → [0 2 1 3 | 4 6 5 7].
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(
            permute_rows(&v, 8, 1, 2),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }
}
