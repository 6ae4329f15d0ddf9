//! `TrainConfig`: the one configuration shared by CLI flags, the UI form, the library
//! and `run.toml` on disk. Defaults follow the Python `backpropagate` package where the
//! design asks for it (LoRA r 16 / alpha 32, lr 2e-4, 100 steps, automatic batch size).

use std::fmt;
use std::path::{Path, PathBuf};
use ts_rs::TS;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::data::TrainOn;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(default, deny_unknown_fields)]
#[ts(export)]
pub struct TrainConfig {
    /// Local model folder or Hugging Face repo id.
    pub model: String,
    /// JSONL training data.
    pub data: PathBuf,
    pub steps: u64,
    pub learning_rate: f64,
    #[ts(type = "\"auto\" | number")]
    pub batch_size: BatchSize,
    pub gradient_accumulation: u32,
    pub max_seq_len: usize,
    pub lora: LoraConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    /// Which tokens the loss is computed on.
    pub train_on: TrainOn,
    /// Concatenate samples into full `max_seq_len` rows instead of padding.
    pub packing: bool,
    /// Share of samples held out for validation loss (0 disables it).
    pub val_ratio: f64,
    /// Validation loss every N steps (0: only at the end when `val_ratio` > 0).
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub seed: u64,
    pub multi_run: MultiRunConfig,
    /// Start from this PEFT adapter instead of a fresh LoRA (multi-run stages use it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[ts(optional = nullable)]
    pub init_adapter: Option<PathBuf>,
    /// Where to train: `auto` (an NVIDIA GPU in a CUDA build, else the CPU, with a
    /// notice), `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// How the frozen base is held in memory: QLoRA with `q4_k` or `q8_0`.
    pub base_quant: BaseQuant,
    /// Compute precision: `auto` (bf16 on a GPU, f32 on the CPU), `f32` or `bf16`. LoRA
    /// weights and optimizer state stay f32 either way. On the CPU, `bf16` needs
    /// AVX512-BF16 and rounds only the operands of the products with frozen weights
    /// (activations stay f32).
    pub precision: Precision,
    /// Gradient checkpointing: recompute layers in backward instead of keeping their
    /// activations. `auto` checkpoints only as many layers as the memory plan needs.
    pub gradient_checkpointing: GradientCheckpointing,
    /// Experiment trackers the run also reports to (HF Trainer's `report_to`):
    /// `tensorboard` writes event files into the run's `tensorboard/` folder, `wandb`
    /// an offline W&B run into its `wandb/` folder.
    /// `metrics.jsonl` stays the record either way.
    pub report_to: Vec<ReportTo>,
}

/// An experiment tracker a run reports to: TensorBoard event files, or a W&B offline
/// run (`wandb sync` uploads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum ReportTo {
    Tensorboard,
    Wandb,
}

impl ReportTo {
    pub const ALL: [ReportTo; 2] = [ReportTo::Tensorboard, ReportTo::Wandb];

    pub fn name(self) -> &'static str {
        match self {
            ReportTo::Tensorboard => "tensorboard",
            ReportTo::Wandb => "wandb",
        }
    }
}

impl std::str::FromStr for ReportTo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tensorboard" => Ok(ReportTo::Tensorboard),
            "wandb" => Ok(ReportTo::Wandb),
            "mlflow" => {
                Err("reporting to MLflow is not built yet; use tensorboard or wandb".to_string())
            }
            other => Err(format!(
                "unknown tracker `{other}`; use tensorboard or wandb"
            )),
        }
    }
}

/// `auto`: as many layers as needed for the planned micro-batch to fit the free
/// memory (none when it fits, or when free memory is unknown); `on`: every layer
/// (only layer inputs kept; about one more forward pass of time); `off`: none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum GradientCheckpointing {
    #[default]
    Auto,
    Off,
    On,
}

impl std::str::FromStr for GradientCheckpointing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(GradientCheckpointing::Auto),
            "off" | "false" | "no" => Ok(GradientCheckpointing::Off),
            "on" | "true" | "yes" => Ok(GradientCheckpointing::On),
            other => Err(format!(
                "gradient checkpointing must be auto, off or on, got `{other}`"
            )),
        }
    }
}

/// Activations and dense frozen weights in f32, or bf16 with f32 master LoRA weights
/// (mixed precision; on the CPU, bf16 products with f32 activations). bf16 has f32's
/// exponent range, so no loss scaling is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Precision::Auto),
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!(
                "precision must be auto, f32 or bf16, got `{other}` (f16 needs loss scaling and is not offered)"
            )),
        }
    }
}

/// Storage of the frozen base weights. `auto` keeps them as stored, except that a
/// bitsandbytes 4-bit checkpoint is held as `q4_k` (it was chosen to save memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, TS)]
#[ts(export)]
pub enum BaseQuant {
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_k")]
    Q4K,
}

impl std::str::FromStr for BaseQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BaseQuant::Auto),
            "f32" | "none" => Ok(BaseQuant::F32),
            "q8_0" | "8bit" => Ok(BaseQuant::Q8_0),
            "q4_k" | "q4" | "4bit" => Ok(BaseQuant::Q4K),
            other => Err(format!(
                "base quantization must be auto, f32, q8_0 or q4_k, got `{other}`"
            )),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            data: PathBuf::new(),
            steps: 100,
            learning_rate: 2e-4,
            batch_size: BatchSize::Auto,
            gradient_accumulation: 1,
            max_seq_len: 2048,
            lora: LoraConfig::default(),
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            train_on: TrainOn::Assistant,
            packing: false,
            val_ratio: 0.0,
            eval_every: 0,
            checkpoint_every: 50,
            seed: 42,
            multi_run: MultiRunConfig::default(),
            init_adapter: None,
            device: "auto".into(),
            base_quant: BaseQuant::Auto,
            precision: Precision::Auto,
            gradient_checkpointing: GradientCheckpointing::Auto,
            report_to: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(default, deny_unknown_fields)]
#[ts(export)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).
    pub rslora: bool,
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            rslora: false,
            target_modules: crate::lora::TARGETS.map(String::from).to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(default, deny_unknown_fields)]
#[ts(export)]
pub struct OptimizerConfig {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 disables clipping).
    pub max_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum LrSchedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(default, deny_unknown_fields)]
#[ts(export)]
pub struct ScheduleConfig {
    pub kind: LrSchedule,
    pub warmup_steps: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: LrSchedule::Cosine,
            warmup_steps: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(default, deny_unknown_fields)]
#[ts(export)]
pub struct MultiRunConfig {
    pub runs: u32,
    pub steps_per_run: u64,
    pub replay_ratio: f64,
    pub method: MultiRunMethod,
}

/// How a multi-run carries the adapter from one run to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(export)]
pub enum MultiRunMethod {
    /// SLAO: orthogonal re-initialisation of A, time-aware merging of B.
    Slao,
    /// Plain sequential LoRA: each run continues from the previous adapter.
    Sequential,
}

impl Default for MultiRunConfig {
    fn default() -> Self {
        MultiRunConfig {
            runs: 3,
            steps_per_run: 50,
            replay_ratio: 0.2,
            method: MultiRunMethod::Slao,
        }
    }
}

/// Micro-batch size: `auto` lets the engine pick the largest that fits in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchSize {
    #[default]
    Auto,
    Fixed(u32),
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Auto => f.write_str("auto"),
            BatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(BatchSize::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(BatchSize::Fixed(n)),
            _ => Err(format!(
                "batch size must be `auto` or a whole number above 0, got `{s}`"
            )),
        }
    }
}

impl Serialize for BatchSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            BatchSize::Auto => s.serialize_str("auto"),
            BatchSize::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) if n > 0 && n <= u32::MAX as i64 => Ok(BatchSize::Fixed(n as u32)),
            Raw::Num(n) => Err(serde::de::Error::custom(format!(
                "batch_size must be `auto` or above 0, got {n}"
            ))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl TrainConfig {
    /// Reads a `run.toml`, naming the file and the offending key on error.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: TrainConfig = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain data structs to TOML cannot fail: every field is a table,
        // string, number, bool or array of strings.
        toml::to_string_pretty(self).expect("TrainConfig is always representable as TOML")
    }

    /// Checks ranges that serde cannot express; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut problems = Vec::new();
        if self.steps == 0 {
            problems.push("steps must be at least 1".to_string());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            problems.push(format!(
                "learning_rate must be above 0, got {}",
                self.learning_rate
            ));
        }
        if self.gradient_accumulation == 0 {
            problems.push("gradient_accumulation must be at least 1".to_string());
        }
        if self.max_seq_len < 8 {
            problems.push(format!(
                "max_seq_len must be at least 8, got {}",
                self.max_seq_len
            ));
        }
        if let Err(e) = self.device.parse::<crate::gpu::DeviceSpec>() {
            problems.push(e);
        }
        if self.lora.r == 0 {
            problems.push("lora.r must be at least 1".to_string());
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            problems.push(format!(
                "lora.dropout must be in [0, 1), got {}",
                self.lora.dropout
            ));
        }
        if self.lora.target_modules.is_empty() {
            problems.push("lora.target_modules must name at least one layer".to_string());
        }
        for t in &self.lora.target_modules {
            if !crate::lora::TARGETS.contains(&t.as_str()) {
                problems.push(format!(
                    "unknown LoRA target `{t}`; choose from {}",
                    crate::lora::TARGETS.join(", ")
                ));
            }
        }
        if !(0.0..1.0).contains(&self.val_ratio) {
            problems.push(format!(
                "val_ratio must be in [0, 1), got {}",
                self.val_ratio
            ));
        }
        if self.multi_run.runs == 0 {
            problems.push("multi_run.runs must be at least 1".to_string());
        }
        if !(0.0..=1.0).contains(&self.multi_run.replay_ratio) {
            problems.push(format!(
                "multi_run.replay_ratio must be in [0, 1], got {}",
                self.multi_run.replay_ratio
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_python_package() {
        let c = TrainConfig::default();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.alpha, 32.0);
        assert_eq!(c.learning_rate, 2e-4);
        assert_eq!(c.steps, 100);
        assert_eq!(c.batch_size, BatchSize::Auto);
        assert_eq!(c.gradient_accumulation, 1);
        assert_eq!(c.max_seq_len, 2048);
        assert_eq!(c.multi_run.runs, 3);
        assert_eq!(c.multi_run.steps_per_run, 50);
        assert_eq!(c.multi_run.replay_ratio, 0.2);
    }

    #[test]
    fn toml_round_trips_and_batch_size_reads_auto_or_number() {
        let c = TrainConfig {
            batch_size: BatchSize::Fixed(4),
            ..TrainConfig::default()
        };
        let text = c.to_toml();
        assert!(text.contains("batch_size = 4"), "{text}");
        assert_eq!(toml::from_str::<TrainConfig>(&text).unwrap(), c);
        let auto: TrainConfig = toml::from_str("batch_size = \"auto\"").unwrap();
        assert_eq!(auto.batch_size, BatchSize::Auto);
        let err = toml::from_str::<TrainConfig>("batch_size = 0").unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
    }

    #[test]
    fn a_misspelled_key_is_named() {
        let err = toml::from_str::<TrainConfig>("learnig_rate = 0.1").unwrap_err();
        assert!(err.to_string().contains("learnig_rate"), "{err}");
    }

    #[test]
    fn load_names_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "steps = 0\n[multi_run]\nreplay_ratio = 2.0\n").unwrap();
        let err = TrainConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("run.toml"), "{err}");
        assert!(err.contains("steps must be at least 1"), "{err}");
        assert!(err.contains("replay_ratio"), "{err}");
    }
}
