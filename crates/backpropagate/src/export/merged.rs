//! The merged export: every base tensor streamed through once — LoRA targets get
//! `W + s·B·A` in f32, then everything is cast to the chosen dtype — into safetensors
//! files written by our own streaming writer, so memory stays at about one tensor.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::Device;
use serde_json::{json, Map, Value};

use super::base_reader::{add_lora, BaseReader};
use super::{ExportOptions, WeightDtype};
use crate::error::{Error, Result};
use crate::event::{Event, EventSink};
use crate::fsx::write_atomic;
use crate::lora::LoraSet;
use crate::model::ModelConfig;

/// Files of a model folder that describe it rather than hold weights.
const SIDE_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

pub fn write(
    model_dir: &Path,
    adapter: &Path,
    out: &Path,
    options: &ExportOptions,
    sink: &dyn EventSink,
) -> Result<()> {
    let config_path = model_dir.join("config.json");
    let config = ModelConfig::load(&config_path)?;
    let device = Device::Cpu;
    let lora = LoraSet::load_peft(adapter, &config, &device)?;
    let scale = lora.scale();
    let base = BaseReader::open(model_dir)?;
    let tensors = base.tensors();

    let elem = match options.dtype {
        WeightDtype::F32 => 4u64,
        WeightDtype::F16 | WeightDtype::Bf16 => 2,
    };
    let shards = plan_shards(&tensors, elem, options.max_shard_bytes);
    let total: u64 = tensors
        .iter()
        .map(|(_, s)| elem * s.iter().product::<usize>() as u64)
        .sum();
    let names: Vec<String> = (0..shards.len())
        .map(|i| {
            if shards.len() == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
            }
        })
        .collect();

    let mut done = 0u64;
    let mut weight_map = Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let entries: Vec<&(String, Vec<usize>)> = shard.iter().map(|&i| &tensors[i]).collect();
        let mut writer = StreamWriter::create(&out.join(file), &entries, options.dtype)?;
        for (name, _) in &entries {
            let mut values = base.read_f32(name)?;
            let module = name.strip_suffix(".weight").unwrap_or(name);
            if let Some(layer) = lora.find(module) {
                add_lora(&mut values, layer, scale)?;
            }
            writer.write_tensor(&values, options.dtype)?;
            weight_map.insert(name.clone(), Value::from(file.clone()));
            done += 1;
            sink.emit(Event::Progress {
                stage: "merge".into(),
                done,
                total: tensors.len() as u64,
            });
        }
        writer.finish()?;
    }
    if names.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("index serializes");
        write_atomic(&out.join("model.safetensors.index.json"), text.as_bytes())?;
    }

    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&config_path, format!("not valid JSON: {e}")))?;
    cfg["torch_dtype"] = Value::from(options.dtype.torch_name());
    // A 4-bit base is merged into plain weights: the quantization no longer applies.
    if let Some(obj) = cfg.as_object_mut() {
        obj.remove("quantization_config");
    }
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("JSON").as_bytes(),
    )?;
    for name in SIDE_FILES {
        let src = model_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Groups tensor indices (in order) into shards of at most `max` bytes each.
fn plan_shards(tensors: &[(String, Vec<usize>)], elem: u64, max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let bytes = elem * shape.iter().product::<usize>() as u64;
        if size + bytes > max && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("at least one shard").push(i);
        size += bytes;
    }
    shards
}

/// Writes a safetensors file tensor by tensor: the header (names, dtypes, shapes,
/// offsets) is known up front from the shapes, so data can follow as it is computed.
struct StreamWriter {
    file: BufWriter<File>,
    path: std::path::PathBuf,
}

impl StreamWriter {
    fn create(path: &Path, entries: &[&(String, Vec<usize>)], dtype: WeightDtype) -> Result<Self> {
        let (tag, elem) = match dtype {
            WeightDtype::F32 => ("F32", 4usize),
            WeightDtype::F16 => ("F16", 2),
            WeightDtype::Bf16 => ("BF16", 2),
        };
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, shape) in entries {
            let bytes = elem * shape.iter().product::<usize>();
            header.insert(
                name.clone(),
                json!({"dtype": tag, "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = serde_json::to_string(&Value::Object(header)).expect("header serializes");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let f = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        let io = |e| Error::io(path, e);
        file.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        Ok(StreamWriter {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write_tensor(&mut self, values: &[f32], dtype: WeightDtype) -> Result<()> {
        let bytes: Vec<u8> = match dtype {
            WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WeightDtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            WeightDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        self.file
            .write_all(&bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn finish(self) -> Result<()> {
        let path = self.path;
        let f = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit_and_keep_order() {
        let t = |n: usize| ("x".to_string(), vec![n]);
        let tensors = vec![t(10), t(10), t(30), t(5), t(50)];
        assert_eq!(
            plan_shards(&tensors, 1, 25),
            vec![vec![0, 1], vec![2], vec![3], vec![4]]
        );
        assert_eq!(plan_shards(&tensors, 1, 1000), vec![vec![0, 1, 2, 3, 4]]);
    }
}
