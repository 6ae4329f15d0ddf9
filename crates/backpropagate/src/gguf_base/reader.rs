//! Reads a GGUF file (versions 2 and 3) that came from anywhere: every length in it is
//! checked against what the file still holds before anything is allocated, tensor
//! extents are checked against the file, and names and counts have caps, so a
//! truncated or hostile file is an error naming the file, never an abort. Tensor data
//! is read one tensor at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// A metadata value (the types GGUF defines).
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Meta::UInt(v) => Some(v),
            Meta::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Meta::Float(v) => Some(v),
            Meta::UInt(v) => Some(v as f64),
            Meta::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Meta::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Meta]> {
        match self {
            Meta::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry: its name, dims in ggml order (fastest first), type, and where
/// its data lies in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub offset: u64,
    pub bytes: u64,
}

impl TensorEntry {
    pub fn elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Meta>,
    pub tensors: Vec<TensorEntry>,
}

const MAX_TENSORS: u64 = 1 << 20;
const MAX_KEYS: u64 = 1 << 20;
const MAX_NAME: u64 = 1 << 16;
const MAX_DEPTH: u32 = 3;

/// Bytes per element block for ggml type ids (those with a fixed size); `None` for
/// types this reader does not know. q2_k and q3_k are sized (so a file holding them
/// is read and refused by name) but not decoded.
pub fn type_block(ty: u32) -> Option<(u64, u64)> {
    match (ty, GgmlType::from_id(ty)) {
        (_, Some(t)) => {
            let (n, b) = t.block();
            Some((n as u64, b as u64))
        }
        (10, None) => Some((256, 84)),
        (11, None) => Some((256, 110)),
        _ => None,
    }
}

/// ggml's name for a type id, for messages.
pub fn type_name(ty: u32) -> String {
    match (ty, GgmlType::from_id(ty)) {
        (_, Some(t)) => t.name().into(),
        (10, None) => "q2_k".into(),
        (11, None) => "q3_k".into(),
        (other, None) => format!("ggml type {other}"),
    }
}

struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
    path: PathBuf,
}

impl<R: Read> Cursor<R> {
    fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::model(
            &self.path,
            format!("not a valid GGUF file: {what} (at byte {})", self.pos),
        )
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            return Err(self.bad("the file ends early"));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self, cap: u64) -> Result<String> {
        let n = self.u64()?;
        if n > cap || n > self.left() {
            return Err(self.bad(format!("a string of {n} bytes")));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += n;
        String::from_utf8(v).map_err(|_| self.bad("a string that is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Meta> {
        Ok(match ty {
            0 => Meta::UInt(u8::from_le_bytes(self.bytes()?) as u64),
            1 => Meta::Int(i8::from_le_bytes(self.bytes()?) as i64),
            2 => Meta::UInt(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Meta::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Meta::UInt(self.u32()? as u64),
            5 => Meta::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Meta::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Meta::Bool(u8::from_le_bytes(self.bytes()?) != 0),
            8 => Meta::Str(self.string(self.len)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad("arrays nested too deep"));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte, so the file bounds the count.
                if n > self.left() {
                    return Err(self.bad(format!("an array of {n} values")));
                }
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(self.value(inner, depth + 1)?);
                }
                Meta::Array(out)
            }
            10 => Meta::UInt(self.u64()?),
            11 => Meta::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Meta::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.bad(format!("unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut c = Cursor {
            r: BufReader::new(file),
            pos: 0,
            len,
            path: path.to_path_buf(),
        };
        if &c.bytes::<4>()? != b"GGUF" {
            return Err(c.bad("it does not start with `GGUF`"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.bad(format!("version {version} (2 and 3 are read)")));
        }
        let n_tensors = c.u64()?;
        let n_keys = c.u64()?;
        if n_tensors > MAX_TENSORS || n_keys > MAX_KEYS {
            return Err(c.bad(format!("{n_tensors} tensors and {n_keys} keys")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_keys {
            let key = c.string(MAX_NAME)?;
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string(MAX_NAME)?;
            let dims = c.u32()?;
            if !(1..=4).contains(&dims) {
                return Err(c.bad(format!("tensor `{name}` has {dims} dimensions")));
            }
            let mut ne = Vec::new();
            for _ in 0..dims {
                ne.push(c.u64()?);
            }
            let ty = c.u32()?;
            let offset = c.u64()?;
            let elements = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.bad(format!("tensor `{name}` is too large")))?;
            let bytes = match type_block(ty) {
                Some((n, b)) if elements % n == 0 => elements / n * b,
                Some(_) => return Err(c.bad(format!("tensor `{name}` is not whole blocks"))),
                // Unknown types are kept (and refused only if the tensor is needed).
                None => 0,
            };
            tensors.push(TensorEntry {
                name,
                ne,
                ty,
                offset,
                bytes,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Meta::as_u64)
            .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
            .unwrap_or(32);
        let data_start = c.pos.div_ceil(alignment) * alignment;
        for t in &mut tensors {
            let start = data_start
                .checked_add(t.offset)
                .filter(|s| s.checked_add(t.bytes).is_some_and(|end| end <= len));
            match start {
                Some(s) => t.offset = s,
                None => {
                    return Err(Error::model(
                        path,
                        format!(
                            "not a valid GGUF file: tensor `{}` lies past the end of the file (truncated download?)",
                            t.name
                        ),
                    ))
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Meta> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's values as f32, decoded from its blocks.
    pub fn read_f32(&self, t: &TensorEntry) -> Result<Vec<f32>> {
        let ty = self.value_type(t)?;
        let raw = self.read_raw(t)?;
        let mut out = vec![0f32; t.elements() as usize];
        crate::quant::decode(&raw, ty, &mut out);
        Ok(out)
    }

    /// The tensor's bytes as the file stores them.
    pub fn read_raw(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(t.offset))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut raw = vec![0u8; t.bytes as usize];
        file.read_exact(&mut raw)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(raw)
    }

    /// The type of a tensor's values, refused by name when the engine cannot read it.
    pub fn value_type(&self, t: &TensorEntry) -> Result<GgmlType> {
        let Some(ty) = GgmlType::from_id(t.ty) else {
            return Err(Error::model(
                &self.path,
                format!(
                    "tensor `{}` is {}, which Backpropagate cannot read yet (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k are read): requantize the file with llama.cpp's llama-quantize to q8_0 or q4_k_m",
                    t.name,
                    type_name(t.ty)
                ),
            ));
        };
        Ok(ty)
    }
}
