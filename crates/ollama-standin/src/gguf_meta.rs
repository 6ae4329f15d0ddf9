//! Reads a GGUF file's header and key/value metadata (what `/api/show` reports as
//! `model_info`), and refuses files that are not GGUF, as Ollama does.

use std::io::{self, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

pub struct GgufMeta {
    pub version: u32,
    pub tensor_count: u64,
    pub kv: Map<String, Value>,
}

pub fn read(path: &Path) -> io::Result<GgufMeta> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "supplied file was not in GGUF format",
        ));
    }
    let version = u32_(&mut r)?;
    let tensor_count = u64_(&mut r)?;
    let kv_count = u64_(&mut r)?;
    let mut kv = Map::new();
    for _ in 0..kv_count {
        let key = string(&mut r)?;
        let ty = u32_(&mut r)?;
        let value = value(&mut r, ty)?;
        kv.insert(key, value);
    }
    Ok(GgufMeta {
        version,
        tensor_count,
        kv,
    })
}

fn u32_(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn string(r: &mut impl Read) -> io::Result<String> {
    let n = u64_(r)?;
    if n > 1 << 30 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "string too long",
        ));
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn value(r: &mut impl Read, ty: u32) -> io::Result<Value> {
    let mut b8 = [0u8; 8];
    Ok(match ty {
        0 | 1 | 7 => {
            let mut b = [0u8; 1];
            r.read_exact(&mut b)?;
            match ty {
                0 => Value::from(b[0]),
                1 => Value::from(b[0] as i8),
                _ => Value::from(b[0] != 0),
            }
        }
        2 | 3 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            if ty == 2 {
                Value::from(u16::from_le_bytes(b))
            } else {
                Value::from(i16::from_le_bytes(b))
            }
        }
        4 => Value::from(u32_(r)?),
        5 => Value::from(u32_(r)? as i32),
        6 => Value::from(f32::from_bits(u32_(r)?) as f64),
        8 => Value::from(string(r)?),
        9 => {
            let inner = u32_(r)?;
            let n = u64_(r)?;
            // As Ollama's /api/show: arrays of more than 5 items (vocabularies) are
            // shown empty.
            let mut items = Vec::new();
            for i in 0..n {
                let v = value(r, inner)?;
                if i < 5 {
                    items.push(v);
                }
            }
            if n > 5 {
                Value::Array(Vec::new())
            } else {
                Value::Array(items)
            }
        }
        10 => {
            r.read_exact(&mut b8)?;
            Value::from(u64::from_le_bytes(b8))
        }
        11 => {
            r.read_exact(&mut b8)?;
            Value::from(i64::from_le_bytes(b8))
        }
        12 => {
            r.read_exact(&mut b8)?;
            Value::from(f64::from_le_bytes(b8))
        }
        t => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown GGUF value type {t}"),
            ))
        }
    })
}
