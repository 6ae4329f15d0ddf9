//! The GGUF container (version 3), written by us: header, metadata key/values, tensor
//! infos, then aligned tensor data streamed one tensor at a time. Type ids and layout
//! follow ggml's `gguf.h` / llama.cpp's gguf-py.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use crate::quant::GgmlType;

pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
}

/// A tensor to be written: GGUF name, dims in ggml order (fastest first), type.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn bytes(&self) -> usize {
        self.ty.bytes_for(self.ne.iter().product::<u64>() as usize)
    }
}

pub struct GgufWriter {
    out: BufWriter<File>,
    path: PathBuf,
    tensors: Vec<TensorInfo>,
    next: usize,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    const U32: u32 = 4;
    const I32: u32 = 5;
    const F32: u32 = 6;
    const BOOL: u32 = 7;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;
    let array_head = |w: &mut dyn Write, ty: u32, n: usize| -> std::io::Result<()> {
        w.write_all(&ARRAY.to_le_bytes())?;
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(&(n as u64).to_le_bytes())
    };
    match v {
        Value::U32(x) => {
            w.write_all(&U32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            w.write_all(&F32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            w.write_all(&BOOL.to_le_bytes())?;
            w.write_all(&[u8::from(*x)])
        }
        Value::Str(s) => {
            w.write_all(&STRING.to_le_bytes())?;
            put_str(w, s)
        }
        Value::ArrStr(a) => {
            array_head(w, STRING, a.len())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        Value::ArrI32(a) => {
            array_head(w, I32, a.len())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

impl GgufWriter {
    /// Writes the header, metadata and tensor table; tensor data follows through
    /// `write_tensor`, in the order of `tensors`.
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(b"GGUF").map_err(io)?;
        out.write_all(&3u32.to_le_bytes()).map_err(io)?;
        out.write_all(&(tensors.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&(metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (k, v) in metadata {
            put_str(&mut out, k).map_err(io)?;
            put_value(&mut out, v).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in &tensors {
            put_str(&mut out, &t.name).map_err(io)?;
            out.write_all(&(t.ne.len() as u32).to_le_bytes())
                .map_err(io)?;
            for d in &t.ne {
                out.write_all(&d.to_le_bytes()).map_err(io)?;
            }
            out.write_all(&(t.ty as u32).to_le_bytes()).map_err(io)?;
            out.write_all(&offset.to_le_bytes()).map_err(io)?;
            offset += pad(t.bytes() as u64);
        }
        let mut w = GgufWriter {
            out,
            path: path.to_path_buf(),
            tensors,
            next: 0,
        };
        w.align()?;
        Ok(w)
    }

    fn align(&mut self) -> Result<()> {
        let pos = self
            .out
            .stream_position()
            .map_err(|e| Error::io(&self.path, e))?;
        let zeros = vec![0u8; (pad(pos) - pos) as usize];
        self.out
            .write_all(&zeros)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes the next tensor's bytes (already in its ggml type).
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(info) = self.tensors.get(self.next) else {
            return Err(Error::model(
                &self.path,
                "more tensors written than declared",
            ));
        };
        if data.len() != info.bytes() {
            return Err(Error::model(
                &self.path,
                format!(
                    "tensor `{}`: {} bytes, expected {}",
                    info.name,
                    data.len(),
                    info.bytes()
                ),
            ));
        }
        self.next += 1;
        self.out
            .write_all(data)
            .map_err(|e| Error::io(&self.path, e))?;
        self.align()
    }

    pub fn finish(self) -> Result<()> {
        if self.next != self.tensors.len() {
            return Err(Error::model(
                &self.path,
                "fewer tensors written than declared",
            ));
        }
        let path = self.path;
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&path, e))
    }
}

fn pad(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}
