//! Rotary position tables (cos, sin) with the scaling variants we support, computed
//! as Hugging Face's `_compute_*_parameters` do.

use candle_core::{Device, Result, Tensor};

use super::config::{ModelConfig, RopeScaling};

pub struct RopeTables {
    /// (positions, head_dim)
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies, one per pair of dimensions.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| {
            // HF computes arange(0, d, 2) / d in float32 before the power.
            let exp = ((2 * i) as f32 / d as f32) as f64;
            1.0 / cfg.rope_theta.powf(exp)
        })
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl RopeTables {
    pub fn new(cfg: &ModelConfig, positions: usize, device: &Device) -> Result<Self> {
        let inv = inv_freq(cfg);
        let d = cfg.head_dim;
        let mut cos = Vec::with_capacity(positions * d);
        let mut sin = Vec::with_capacity(positions * d);
        for p in 0..positions {
            // HF: emb = cat(freqs, freqs); freqs computed in float32.
            for _half in 0..2 {
                for &f in &inv {
                    let angle = (p as f32 * f as f32) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (positions, d), device)?,
            sin: Tensor::from_vec(sin, (positions, d), device)?,
        })
    }
}
