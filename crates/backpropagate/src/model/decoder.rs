//! The decoder-only transformer shared by llama, mistral, qwen2 and qwen3, in
//! Hugging Face's formulation (pre-norm RMSNorm, rotary q/k, grouped-query attention,
//! SwiGLU MLP), with LoRA on any of its linears. Training forward only: no KV cache.

use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::attention_any::blocked_attention;
use super::attention_op::{Attention, KeptAttention};
use super::blas_bf16::{self, Products};
use super::config::ModelConfig;
use super::frozen_linear::FrozenLinear;
use super::fused::{RopeHeads, SwiGlu};
use super::lm_loss::{ChunkedLmLoss, ChunkedLmLossAny, HeadPacks};
use super::lora_op::{Dropout, LoraLinear};
use super::ops::{apply_rope, cross_entropy_sum, dropout_mask, frozen_linear, rms_norm};
use super::qlinear::{quant_linear, FrozenWeight};
use super::recompute::{self, GradSink};
use super::rope::RopeTables;
use super::weights::Weights;
use crate::config::BaseQuant;
use crate::error::{Error, Result};
use crate::lora::{LoraLayer, LoraSet};

/// A frozen linear layer, optionally adapted by LoRA.
#[derive(Clone)]
struct Linear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    lora: Option<LoraLayer>,
    scale: f64,
    dropout: f32,
}

impl Linear {
    fn load(
        w: &Weights,
        module: &str,
        out_f: usize,
        in_f: usize,
        bias: bool,
        lora: Option<&LoraSet>,
        quant: BaseQuant,
    ) -> Result<Self> {
        let weight = w.frozen(&format!("{module}.weight"), &[out_f, in_f], quant)?;
        let bias = if bias {
            Some(w.get(&format!("{module}.bias"), &[out_f])?)
        } else {
            None
        };
        let adapter = lora.and_then(|l| l.find(module)).cloned();
        Ok(Linear {
            weight,
            bias,
            lora: adapter,
            scale: lora.map_or(0.0, |l| l.scale()),
            dropout: lora.map_or(0.0, |l| l.config.dropout as f32),
        })
    }

    /// Whether a pass through this linear draws a dropout seed.
    fn draws_seed(&self) -> bool {
        self.lora.is_some() && self.dropout > 0.0
    }

    /// `fused`: one op for base + bias + LoRA where it can run (CPU, f32), its frozen
    /// products as given, else (`None`) the basic ops; both drop the same entries for
    /// the same `seed`.
    /// `row_keys`: in a padding-free batch, each row's index in the padded one, so
    /// dropout drops the same entries either way.
    /// `track`: false runs the LoRA weights detached (a pass that builds no graph).
    fn forward(
        &self,
        x: &Tensor,
        seed: Option<u64>,
        fused: Option<Products>,
        row_keys: Option<&Arc<Vec<u32>>>,
        track: bool,
    ) -> CResult<Tensor> {
        let lora = self.lora.as_ref().map(|l| {
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            if track {
                (a.clone(), b.clone())
            } else {
                (a.detach(), b.detach())
            }
        });
        if let Some(products) = fused.filter(|_| LoraLinear::supports(x, &self.weight)) {
            match &lora {
                Some((a, b)) => {
                    let op = LoraLinear {
                        weight: self.weight.clone(),
                        bias: self.bias.clone(),
                        scale: self.scale as f32,
                        dropout: seed.map(|seed| Dropout {
                            p: self.dropout,
                            seed,
                            row_keys: row_keys.cloned(),
                        }),
                        products,
                    };
                    return op.forward(x, a, b);
                }
                None => {
                    let op = FrozenLinear {
                        weight: self.weight.clone(),
                        bias: self.bias.clone(),
                        products,
                    };
                    return op.forward(x);
                }
            }
        }
        let mut y = match &self.weight {
            FrozenWeight::Dense(w) => frozen_linear(x, w)?,
            FrozenWeight::Quant(q) => quant_linear(x, q)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b)) = &lora {
            let xd = match seed {
                Some(seed) => {
                    let mask = dropout_mask(x.shape(), self.dropout, seed, x.device())?;
                    (x * mask.to_dtype(x.dtype())?)?
                }
                None => x.clone(),
            };
            // Master LoRA weights are f32; in mixed precision they are cast for the
            // matmuls and their gradients cast back by the same op.
            let (a, b) = if x.dtype() == a.dtype() {
                (a.clone(), b.clone())
            } else {
                (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?)
            };
            let h = xd.broadcast_matmul(&a.t()?)?;
            let d = h.broadcast_matmul(&b.t()?)?;
            y = (y + (d * self.scale)?)?;
        }
        Ok(y)
    }
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The linears in the order a pass calls them (the order dropout seeds are drawn).
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    fn lora_vars(&self) -> Vec<candle_core::Var> {
        self.linears()
            .iter()
            .filter_map(|l| l.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// The dropout seeds one pass through this layer takes, drawn from `rng` in call
    /// order; none without an RNG (evaluation).
    fn draw_seeds(&self, rng: &mut Option<&mut ChaCha8Rng>) -> Vec<Option<u64>> {
        self.linears()
            .iter()
            .map(|l| match rng {
                Some(rng) if l.draws_seed() => Some(rng.gen::<u64>()),
                _ => None,
            })
            .collect()
    }

    /// One pass through the layer: `h` in, `h` out, with `seeds` from [`Layer::draw_seeds`].
    /// `kept` is a checkpointed layer's attention output, shared by its first pass and
    /// its recomputation (fused ops only).
    fn forward(
        &self,
        h: &Tensor,
        pass: &LayerPass,
        seeds: &[Option<u64>],
        track: bool,
        kept: Option<&Arc<KeptAttention>>,
    ) -> CResult<Tensor> {
        let seed = |i: usize| seeds.get(i).copied().flatten();
        match pass {
            LayerPass::Basic(p) => {
                let (b, t, d) = (p.b, p.t, p.head_dim);
                let x = rms_norm(h, &self.input_norm, p.eps)?;
                let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
                let lin =
                    |l: &Linear, x: &Tensor, i: usize| l.forward(x, seed(i), None, None, track);
                let mut q = heads(lin(&self.q, &x, 0)?, p.heads)?;
                let mut k = heads(lin(&self.k, &x, 1)?, p.kv)?;
                let v = heads(lin(&self.v, &x, 2)?, p.kv)?;
                if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                    q = rms_norm(&q, qn, p.eps)?;
                    k = rms_norm(&k, kn, p.eps)?;
                }
                let q = apply_rope(&q.contiguous()?, &p.cos, &p.sin)?;
                let k = apply_rope(&k.contiguous()?, &p.cos, &p.sin)?;
                let attn = blocked_attention(&q, &k, &v.contiguous()?, &p.mask, p.heads / p.kv)?
                    .transpose(1, 2)?
                    .reshape((b, t, p.heads * d))?;
                let h = (h + lin(&self.o, &attn, 3)?)?;
                let x = rms_norm(&h, &self.post_norm, p.eps)?;
                let gated = (lin(&self.gate, &x, 4)?.silu()? * lin(&self.up, &x, 5)?)?;
                h + lin(&self.down, &gated, 6)?
            }
            LayerPass::Fused(p) => {
                let (b, t, d) = (p.b, p.t, p.head_dim);
                let keys = p.row_keys.as_ref();
                let fused = Some(p.products);
                let lin =
                    |l: &Linear, x: &Tensor, i: usize| l.forward(x, seed(i), fused, keys, track);
                let x = rms_norm(h, &self.input_norm, p.eps)?;
                let mut q = lin(&self.q, &x, 0)?.reshape((b, t, p.heads, d))?;
                let mut k = lin(&self.k, &x, 1)?.reshape((b, t, p.kv, d))?;
                let v = lin(&self.v, &x, 2)?.reshape((b, t, p.kv, d))?;
                if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                    q = rms_norm(&q, qn, p.eps)?;
                    k = rms_norm(&k, kn, p.eps)?;
                }
                let rope = |scale: f32| RopeHeads {
                    cos: p.cos.clone(),
                    sin: p.sin.clone(),
                    scale,
                };
                let q = q.contiguous()?.apply_op1(rope(1.0 / (d as f32).sqrt()))?;
                let k = k.contiguous()?.apply_op1(rope(1.0))?;
                let mut op = Attention::new(p.segments.clone(), p.heads / p.kv);
                if let Some(kept) = kept {
                    op = op.keeping(kept.clone());
                }
                let attn = q.apply_op3(&k, &v.contiguous()?, op)?;
                let h = (h + lin(&self.o, &attn, 3)?)?;
                let x = rms_norm(&h, &self.post_norm, p.eps)?;
                let gate = lin(&self.gate, &x, 4)?;
                let up = lin(&self.up, &x, 5)?;
                let gated = gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?;
                h + lin(&self.down, &gated, 6)?
            }
        }
    }
}

/// What every layer of one forward pass shares: the basic-op decoder's rope tables
/// and dense mask, or the fused ops' segments, rope rows and row keys.
#[derive(Clone)]
enum LayerPass {
    Basic(BasicPass),
    Fused(FusedPass),
}

#[derive(Clone)]
struct BasicPass {
    b: usize,
    t: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    eps: f64,
    /// (b, 1, t, head_dim)
    cos: Tensor,
    sin: Tensor,
    /// (b, 1, t, t) additive
    mask: Tensor,
}

#[derive(Clone)]
struct FusedPass {
    b: usize,
    t: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    eps: f64,
    segments: Arc<Vec<(usize, usize)>>,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    row_keys: Option<Arc<Vec<u32>>>,
    products: Products,
}

/// Inputs of one forward pass, built by the batcher.
pub struct BatchInputs {
    /// (b, t) u32
    pub input_ids: Tensor,
    /// (b, t) u32 positions (restart per packed sample)
    pub position_ids: Tensor,
    /// (b, 1, t, t) f32 additive mask: 0 where attention is allowed, -inf elsewhere.
    pub mask: Tensor,
    /// Flat indices (into b*t) of positions whose next token is a target, and those
    /// targets: only these rows go through the LM head.
    pub target_rows: Tensor,
    pub targets: Tensor,
    pub target_count: usize,
    /// The same batch without padding, for the fused CPU path.
    pub flat: FlatBatch,
}

/// A batch's real tokens as one sequence (padding dropped): what the fused CPU path
/// computes on, so no product runs on padding.
#[derive(Debug, Clone, Default)]
pub struct FlatBatch {
    /// Indices (into b·t) of the real tokens, row by row.
    pub tokens: Vec<u32>,
    /// (start, len) of each sample in `tokens` order (a packed row holds several); a
    /// token attends to the earlier tokens of its own sample.
    pub segments: Vec<(usize, usize)>,
    /// Indices (into `tokens`) of the positions whose next token is a target, in the
    /// order of `BatchInputs::targets`.
    pub target_rows: Vec<u32>,
}

impl FlatBatch {
    /// Segments over all b·t padded positions: the samples' own, plus each padding
    /// position alone (it attends to itself, as the dense mask has it).
    fn padded_segments(&self, positions: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut next = 0;
        for &(start, len) in &self.segments {
            let at = self.tokens[start] as usize;
            out.extend((next..at).map(|p| (p, 1)));
            out.push((at, len));
            next = at + len;
        }
        out.extend((next..positions).map(|p| (p, 1)));
        out
    }
}

pub struct CausalLm {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RopeTables,
    device: Device,
    /// Fused ops where they can run (the default); false keeps the basic-op decoder,
    /// the reference the fused ops are tested against (`BACKPROP_REFERENCE_OPS=1`).
    fused: bool,
    /// Layers checkpointed (from the first), and where their LoRA gradients wait.
    recompute_layers: usize,
    recompute_grads: Arc<GradSink>,
    /// The fused ops' frozen-weight products, and the LM head packed for bf16 ones.
    products: Products,
    head_packs: Option<Arc<HeadPacks>>,
}

/// Why bf16 products are refused on a CPU without the instructions they need.
pub const CPU_BF16_REFUSAL: &str = "precision = \"bf16\" on the CPU needs AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids or newer, AMD Zen 4 or newer), and this CPU does not have it: use precision = \"f32\" (or \"auto\"), or train on a GPU";

/// Whether the input embedding is kept in host memory rather than on `device`: on a
/// GPU, unless a tied LM head multiplies by it.
pub fn embedding_on_host(device: &Device, c: &ModelConfig) -> bool {
    !device.is_cpu() && !c.tie_word_embeddings
}

/// Whether gradient checkpointing can run on `device`.
pub fn recompute_supported(device: &Device) -> bool {
    recompute::supported(device)
}

/// Whether models use the fused CPU ops by default: yes, unless
/// `BACKPROP_REFERENCE_OPS` is set (to anything but empty or 0).
pub fn fused_ops_enabled() -> bool {
    std::env::var_os("BACKPROP_REFERENCE_OPS").is_none_or(|v| v.is_empty() || v == "0")
}

/// Every tensor the checkpoint must hold for `c`, with its shape.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut linear = |name: &str, o: usize, i: usize, bias: bool| {
            out.push((format!("{p}.{name}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        };
        linear("self_attn.q_proj", q, h, c.qkv_bias);
        linear("self_attn.k_proj", kv, h, c.qkv_bias);
        linear("self_attn.v_proj", kv, h, c.qkv_bias);
        linear("self_attn.o_proj", h, q, c.o_bias);
        linear("mlp.gate_proj", i, h, c.mlp_bias);
        linear("mlp.up_proj", i, h, c.mlp_bias);
        linear("mlp.down_proj", h, i, c.mlp_bias);
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if c.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

impl CausalLm {
    /// Checks a model folder's weights against its config without loading them, so a
    /// bad download fails before a run starts.
    pub fn validate(dir: &Path, config: &ModelConfig) -> Result<()> {
        let w = Weights::open(dir, DType::F32, &Device::Cpu)?;
        // The sizes that multiply (vocab × hidden, the layer count) are checked against
        // the header first, so a config.json claiming far more than the checkpoint holds
        // fails on one clear line instead of a list of every missing tensor.
        w.check(
            "model.embed_tokens.weight",
            &[config.vocab_size, config.hidden_size],
        )?;
        let last = format!(
            "model.layers.{}.input_layernorm.weight",
            config.num_layers.saturating_sub(1)
        );
        w.check(&last, &[config.hidden_size]).map_err(|_| {
            Error::model(
                dir.join("config.json"),
                format!(
                    "field `num_hidden_layers` is {} but the checkpoint has no `{last}`; config.json does not belong to these weights",
                    config.num_layers
                ),
            )
        })?;
        for (name, shape) in expected_tensors(config) {
            w.check(&name, &shape)?;
        }
        Ok(())
    }

    /// Loads the base model from a HF folder, attaching `lora` where it targets; a
    /// bitsandbytes 4-bit checkpoint is held as q4_k, anything else as stored.
    pub fn load(
        dir: &Path,
        config: ModelConfig,
        lora: Option<&LoraSet>,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(
            dir,
            config,
            lora,
            max_positions,
            device,
            BaseQuant::Auto,
            DType::F32,
        )
    }

    /// [`CausalLm::load`] with the frozen linears held as `quant` says (QLoRA) and
    /// dense weights and activations in `dtype` (f32, or bf16 for mixed precision).
    pub fn load_with(
        dir: &Path,
        config: ModelConfig,
        lora: Option<&LoraSet>,
        max_positions: usize,
        device: &Device,
        quant: BaseQuant,
        dtype: DType,
    ) -> Result<Self> {
        let w = Weights::open(dir, dtype, device)?;
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let q_out = c.num_heads * c.head_dim;
        let kv_out = c.num_kv_heads * c.head_dim;
        // An untied input embedding is only looked up, never multiplied: on a GPU it
        // stays in host memory (about 1 GiB of VRAM for a 7B model's vocabulary in
        // bf16) and only the rows looked up travel.
        let embed = if embedding_on_host(device, c) {
            Weights::open(dir, dtype, &Device::Cpu)?.get("model.embed_tokens.weight", &[v, h])?
        } else {
            w.get("model.embed_tokens.weight", &[v, h])?
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let attn = |name: &str, o, i, bias| {
                Linear::load(
                    &w,
                    &format!("{p}.self_attn.{name}"),
                    o,
                    i,
                    bias,
                    lora,
                    quant,
                )
            };
            let mlp = |name: &str, o, i| {
                Linear::load(
                    &w,
                    &format!("{p}.mlp.{name}"),
                    o,
                    i,
                    c.mlp_bias,
                    lora,
                    quant,
                )
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(w.get(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?),
                    Some(w.get(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: attn("q_proj", q_out, h, c.qkv_bias)?,
                k: attn("k_proj", kv_out, h, c.qkv_bias)?,
                v: attn("v_proj", kv_out, h, c.qkv_bias)?,
                o: attn("o_proj", h, q_out, c.o_bias)?,
                q_norm,
                k_norm,
                gate: mlp("gate_proj", i, h)?,
                up: mlp("up_proj", i, h)?,
                down: mlp("down_proj", h, i)?,
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[v, h])?
        };
        let rope = RopeTables::new(c, max_positions.max(1), device)?;
        Ok(CausalLm {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            fused: fused_ops_enabled(),
            recompute_layers: 0,
            recompute_grads: Arc::default(),
            products: Products::F32,
            head_packs: None,
        })
    }

    /// Runs the fused CPU ops' products with the frozen weights (the linears' and the
    /// LM head's) in `products`. For bf16 the CPU must have AVX512-BF16; f32 dense
    /// linears are then rounded to bf16 once here (every product would round them
    /// anyway), and the LM head is packed once in both orientations. The LoRA
    /// weights, their products and gradients, attention and the element-wise ops stay
    /// f32.
    pub fn set_products(&mut self, products: Products) -> Result<()> {
        self.products = products;
        self.head_packs = None;
        if products == Products::F32 {
            return Ok(());
        }
        if !blas_bf16::supported() {
            return Err(Error::InvalidOption(CPU_BF16_REFUSAL.into()));
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                if let FrozenWeight::Dense(w) = &lin.weight {
                    if w.dtype() == DType::F32 && w.device().is_cpu() {
                        lin.weight = FrozenWeight::Dense(w.to_dtype(DType::BF16)?);
                    }
                }
            }
        }
        if self.lm_head.device().is_cpu() && self.lm_head.dtype() == DType::F32 {
            self.head_packs = Some(Arc::new(HeadPacks::new(&self.lm_head)?));
        }
        Ok(())
    }

    pub fn products(&self) -> Products {
        self.products
    }

    /// Chooses the fused ops (true) or the basic-op reference decoder.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Whether this pass runs the fused CPU ops: they need f32 on the CPU.
    fn fused_for(&self, h: &Tensor) -> bool {
        self.fused && h.device().is_cpu() && h.dtype() == DType::F32
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held by the frozen linears (quantized ones at their block size).
    pub fn linear_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .map(|lin| lin.weight.bytes())
            .sum()
    }

    pub fn max_positions(&self) -> usize {
        self.rope.cos.dims()[0]
    }

    /// The embedding rows of `ids`, on `ids`' device (the table may be in host memory).
    fn embed_rows(&self, ids: &Tensor) -> CResult<Tensor> {
        let table = candle_nn::Embedding::new(self.embed.clone(), self.config.hidden_size);
        if self.embed.device().same_device(ids.device()) {
            return table.forward(ids);
        }
        table
            .forward(&ids.to_device(self.embed.device())?)?
            .to_device(ids.device())
    }

    /// Final hidden states (b, t, hidden).
    pub fn hidden_states(
        &self,
        batch: &BatchInputs,
        rng: Option<&mut ChaCha8Rng>,
    ) -> CResult<Tensor> {
        let (b, t) = batch.input_ids.dims2()?;
        let c = &self.config;
        let h = self.embed_rows(&batch.input_ids)?;
        if self.fused_for(&h) {
            let segments = batch.flat.padded_segments(b * t);
            let h = h.reshape((1, b * t, c.hidden_size))?;
            let pos = batch.position_ids.flatten_all()?;
            return self
                .fused_layers(h, &pos, segments, None, rng)?
                .reshape((b, t, c.hidden_size));
        }
        let pos = batch.position_ids.flatten_all()?;
        let cos = self
            .rope
            .cos
            .index_select(&pos, 0)?
            .reshape((b, 1, t, c.head_dim))?
            .to_dtype(h.dtype())?;
        let sin = self
            .rope
            .sin
            .index_select(&pos, 0)?
            .reshape((b, 1, t, c.head_dim))?
            .to_dtype(h.dtype())?;
        let pass = LayerPass::Basic(BasicPass {
            b,
            t,
            heads: c.num_heads,
            kv: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
            cos,
            sin,
            mask: batch.mask.to_dtype(h.dtype())?,
        });
        let h = self.run_layers(h, pass, rng)?;
        rms_norm(&h, &self.norm, c.rms_norm_eps)
    }

    /// The decoder layers with the fused CPU ops: rope fused with the move of heads
    /// forward (and, for q, the attention scale), attention as one op (grouped-query,
    /// masked, recomputing its probabilities in backward), SwiGLU in one op, and every
    /// LoRA linear in one op.
    ///
    /// `h` is (1, t, hidden): one sequence cut into `segments`, with `pos` (t,) the
    /// position of each token within its sample.
    fn fused_layers(
        &self,
        h: Tensor,
        pos: &Tensor,
        segments: Vec<(usize, usize)>,
        row_keys: Option<Arc<Vec<u32>>>,
        rng: Option<&mut ChaCha8Rng>,
    ) -> CResult<Tensor> {
        let c = &self.config;
        let (b, t, _) = h.dims3()?;
        let table = |t: &Tensor| -> CResult<Arc<Vec<f32>>> {
            Ok(Arc::new(
                t.index_select(pos, 0)?.flatten_all()?.to_vec1::<f32>()?,
            ))
        };
        let pass = LayerPass::Fused(FusedPass {
            b,
            t,
            heads: c.num_heads,
            kv: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
            segments: Arc::new(segments),
            cos: table(&self.rope.cos)?,
            sin: table(&self.rope.sin)?,
            row_keys,
            products: self.products,
        });
        let h = self.run_layers(h, pass, rng)?;
        rms_norm(&h, &self.norm, c.rms_norm_eps)
    }

    /// Every decoder layer on `h`; the first [`CausalLm::set_recompute_layers`] of them
    /// checkpointed (only their input kept, the rest recomputed in backward).
    fn run_layers(
        &self,
        mut h: Tensor,
        pass: LayerPass,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> CResult<Tensor> {
        let recompute = self.recompute_layers > 0 && recompute::supported(h.device());
        if recompute {
            self.recompute_grads.clear();
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let seeds = layer.draw_seeds(&mut rng);
            h = if recompute && i < self.recompute_layers {
                let (layer_, pass) = (layer.clone(), pass.clone());
                let kept = Arc::new(KeptAttention::default());
                let run: recompute::LayerFn =
                    Arc::new(move |x, track| layer_.forward(x, &pass, &seeds, track, Some(&kept)));
                recompute::checkpoint(&h, run, layer.lora_vars(), &self.recompute_grads)?
            } else {
                layer.forward(&h, &pass, &seeds, true, None)?
            };
        }
        Ok(h)
    }

    /// Checkpoints the first `n` decoder layers (gradient checkpointing): their
    /// activations are recomputed in backward instead of kept. 0 turns it off.
    pub fn set_recompute_layers(&mut self, n: usize) {
        self.recompute_layers = n.min(self.layers.len());
    }

    pub fn recompute_layers(&self) -> usize {
        self.recompute_layers
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `loss.backward()`, with the LoRA gradients of recomputed layers merged in: use
    /// this rather than `backward` directly whenever layers may be checkpointed.
    pub fn backward(&self, loss: &Tensor) -> CResult<candle_core::backprop::GradStore> {
        let mut grads = loss.backward()?;
        self.recompute_grads.merge_into(&mut grads)?;
        Ok(grads)
    }

    /// Logits for every position (b, t, vocab); for previews and reference checks.
    pub fn logits(&self, batch: &BatchInputs) -> CResult<Tensor> {
        let h = self.hidden_states(batch, None)?;
        frozen_linear(&h, &self.lm_head)?.to_dtype(DType::F32)
    }

    /// Summed cross-entropy over the batch's targets (only those rows reach the LM head).
    pub fn loss_sum(&self, batch: &BatchInputs, rng: Option<&mut ChaCha8Rng>) -> CResult<Tensor> {
        if self.fused && self.device.is_cpu() && self.embed.dtype() == DType::F32 {
            // Padding-free: only the batch's real tokens go through the layers.
            let f = &batch.flat;
            let n = f.tokens.len();
            let tokens = Tensor::from_slice(&f.tokens, n, &self.device)?;
            let ids = batch.input_ids.flatten_all()?.index_select(&tokens, 0)?;
            let pos = batch.position_ids.flatten_all()?.index_select(&tokens, 0)?;
            let h = self.embed_rows(&ids.reshape((1, n))?)?;
            let keys = Arc::new(f.tokens.clone());
            let h = self.fused_layers(h, &pos, f.segments.clone(), Some(keys), rng)?;
            let rows = Tensor::from_slice(&f.target_rows, f.target_rows.len(), &self.device)?;
            let rows = h.squeeze(0)?.index_select(&rows, 0)?;
            if ChunkedLmLoss::supports(&rows, &self.lm_head) {
                let packs = self.head_packs.as_ref();
                return ChunkedLmLoss::nll(&rows, &self.lm_head, &batch.targets, packs)?.sum_all();
            }
            let logits = frozen_linear(&rows, &self.lm_head)?;
            let weights = Tensor::ones(batch.target_count, DType::F32, &self.device)?;
            return cross_entropy_sum(&logits, &batch.targets, &weights);
        }
        let h = self.hidden_states(batch, rng)?;
        let rows = h.flatten_to(1)?.index_select(&batch.target_rows, 0)?;
        // The loss is computed in f32, a chunk of rows' logits at a time.
        ChunkedLmLossAny::nll(&rows, &self.lm_head, &batch.targets)?.sum_all()
    }
}
