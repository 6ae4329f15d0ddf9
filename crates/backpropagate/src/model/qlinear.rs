//! QLoRA: frozen base weights held in ggml block formats (q8_0, q4_K, q4_0 — the GGUF
//! types our exporter writes, quantized by the same bit-exact code) and a linear op
//! whose forward is candle's quantized matmul and whose backward sends the gradient to
//! the input through the dequantized weight. Nothing flows to the weight: it is frozen.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};

use crate::config::BaseQuant;
use crate::quant::{encode, GgmlType};

/// A frozen weight of shape (out, in): dense, or quantized in blocks along `in`.
#[derive(Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl FrozenWeight {
    /// Holds `values` (row-major, `rows` × `cols`) as `quant` asks: a block type when
    /// every row splits into whole blocks, else dense f32 (as llama.cpp falls back for
    /// odd widths).
    pub fn from_f32(
        values: Vec<f32>,
        rows: usize,
        cols: usize,
        quant: BaseQuant,
        device: &Device,
    ) -> Result<FrozenWeight> {
        let ty = match quant {
            BaseQuant::Q4K if cols.is_multiple_of(256) => Some((GgmlType::Q4K, GgmlDType::Q4K)),
            BaseQuant::Q4K if cols.is_multiple_of(32) => Some((GgmlType::Q4_0, GgmlDType::Q4_0)),
            BaseQuant::Q8_0 if cols.is_multiple_of(32) => Some((GgmlType::Q8_0, GgmlDType::Q8_0)),
            _ => None,
        };
        match ty {
            Some((ours, candle)) => {
                let bytes = encode(&values, ours);
                // Borrowed, never Owned: candle 0.9's CPU path reinterprets the bytes
                // through a slice of the Cow it was given and copies it after the Cow is
                // gone, so an owned buffer is read after it was freed.
                let storage = QStorage::from_data(Cow::Borrowed(&bytes), device, candle)?;
                Ok(FrozenWeight::Quant(Arc::new(QTensor::new(
                    storage,
                    (rows, cols),
                )?)))
            }
            None => Ok(FrozenWeight::Dense(Tensor::from_vec(
                values,
                (rows, cols),
                device,
            )?)),
        }
    }

    /// A (rows, cols) weight from blocks already in ggml's `ty` layout (a GGUF base's
    /// own tensor), as they are.
    pub fn from_blocks(
        bytes: &[u8],
        ty: GgmlType,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<FrozenWeight> {
        if !cols.is_multiple_of(ty.block().0) || bytes.len() != rows * ty.bytes_for(cols) {
            candle_core::bail!(
                "{} bytes of {} blocks do not hold a {rows}×{cols} weight",
                bytes.len(),
                ty.name()
            );
        }
        // candle reads the bytes as block structs, which must be aligned (blocks in a
        // memory-mapped safetensors file start wherever the tensor before them ended).
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: the u64 buffer is at least bytes.len() bytes long, and any bytes are
        // valid u8s.
        let aligned =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        aligned.copy_from_slice(bytes);
        let storage = QStorage::from_data(Cow::Borrowed(&*aligned), device, candle_type(ty))?;
        Ok(FrozenWeight::Quant(Arc::new(QTensor::new(
            storage,
            (rows, cols),
        )?)))
    }

    /// Output features (the weight's rows).
    pub fn rows(&self) -> Result<usize> {
        match self {
            FrozenWeight::Dense(t) => t.dim(0),
            FrozenWeight::Quant(q) => Ok(q.shape().dims2()?.0),
        }
    }

    /// Bytes this weight occupies (for logs and the memory estimate).
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quant(q) => q.storage_size_in_bytes(),
        }
    }

    /// The f32 values (dequantized when quantized), for reference checks.
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            FrozenWeight::Quant(q) => q.dequantize(&q.device()),
        }
    }
}

/// candle's name for one of our ggml types.
fn candle_type(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::Bf16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
    }
}

/// From this many input rows on, the CPU forward dequantizes and uses the GEMM.
const DEQUANT_ROWS: usize = 32;

/// `x @ dequant(w)^T` with the quantized kernels; backward `grad @ dequant(w)`.
struct QuantLinear(Arc<QTensor>);

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        if m < DEQUANT_ROWS || x.dtype() != DType::F32 {
            return self.0.as_ref().cpu_fwd(x, l);
        }
        // For training-sized inputs candle's quantized CPU kernel (one row at a time,
        // parallel over output columns only) is several times slower than dequantizing
        // the weight and using the multi-threaded GEMM; the dequantized copy lives only
        // for this matmul.
        let w = self.0.dequantize(&Device::Cpu)?;
        let (storage, w_l) = w.storage_and_layout();
        let Storage::Cpu(w_s) = &*storage else {
            candle_core::bail!("quant-linear: the dequantized weight is not on the CPU")
        };
        let n = w_l.shape().dims2()?.0;
        let out = x.matmul(w_s, (1, m, n, k), l, &w_l.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.as_ref().cuda_fwd(x, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.0.as_ref().metal_fwd(x, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Dequantized per backward rather than kept: keeping it would undo the memory
        // saving that is the point of QLoRA. One layer's weight is alive at a time.
        let w = self.0.dequantize(grad.device())?;
        Ok(Some(grad.matmul(&w)?))
    }
}

/// `x @ w^T` over the last dimension of a 2-D contiguous `x` for a quantized `w`.
pub fn quant_linear_2d(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    x.apply_op1(QuantLinear(w.clone()))
}

/// `x @ w^T` over the last dimension of `x` (any leading shape), `w` quantized.
pub fn quant_linear(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    // The quantized kernels take f32 (or f16) inputs; bf16 activations go through f32.
    let x2 = x
        .reshape((x.elem_count() / k, k))?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let y = quant_linear_2d(&x2, w)?.to_dtype(x.dtype())?;
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = w.shape().dims()[0];
    }
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919) % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect()
    }

    #[test]
    fn widths_that_do_not_split_into_blocks_stay_dense() {
        let d = Device::Cpu;
        let w = FrozenWeight::from_f32(values(4 * 256), 4, 256, BaseQuant::Q4K, &d).unwrap();
        assert!(matches!(&w, FrozenWeight::Quant(q) if q.dtype() == GgmlDType::Q4K));
        // 4.5 bits per weight.
        assert_eq!(w.bytes(), 4 * 144);
        let w = FrozenWeight::from_f32(values(4 * 64), 4, 64, BaseQuant::Q4K, &d).unwrap();
        assert!(matches!(&w, FrozenWeight::Quant(q) if q.dtype() == GgmlDType::Q4_0));
        let w = FrozenWeight::from_f32(values(4 * 40), 4, 40, BaseQuant::Q8_0, &d).unwrap();
        assert!(matches!(w, FrozenWeight::Dense(_)));
    }

    /// Forward and the input gradient match the same op on the dequantized weight: the
    /// quantized kernel quantizes activations too, so the forward agrees to ~1%, and
    /// the backward (a dequantized matmul) exactly.
    #[test]
    fn forward_and_backward_match_the_dequantized_weight() {
        let d = Device::Cpu;
        for quant in [BaseQuant::Q8_0, BaseQuant::Q4K] {
            let w = FrozenWeight::from_f32(values(8 * 256), 8, 256, quant, &d).unwrap();
            let FrozenWeight::Quant(q) = &w else {
                panic!("quantized")
            };
            let dense = w.to_dense().unwrap();
            let x = Var::from_vec(
                values(3 * 256).iter().rev().copied().collect(),
                (3, 256),
                &d,
            )
            .unwrap();
            let y = quant_linear_2d(x.as_tensor(), q).unwrap();
            let y_ref = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
            let err = max_abs(&(&y - &y_ref).unwrap());
            let scale = max_abs(&y_ref);
            assert!(err <= 0.02 * scale, "{quant:?}: {err} vs {scale}");
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g.get(x.as_tensor()).unwrap();
            let expected = (y * 2.0).unwrap().matmul(&dense).unwrap();
            let diff = max_abs(&(gx - expected).unwrap());
            assert!(diff < 1e-5, "{quant:?}: {diff}");

            // Training-sized inputs take the dequantize + GEMM path: exact.
            let x = Tensor::new(values(40 * 256), &d)
                .unwrap()
                .reshape((40, 256))
                .unwrap();
            let y = quant_linear_2d(&x, q).unwrap();
            let y_ref = x.matmul(&dense.t().unwrap()).unwrap();
            let err = max_abs(&(y - y_ref).unwrap());
            assert!(err < 1e-5, "{quant:?}: {err}");
        }
    }
}
