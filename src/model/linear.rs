//! A linear layer `y = x Wᵀ (+ b)` on row-major f32 buffers, over treespec's
//! own kernels: GGUF-quantized blocks (scored N rows for little more than
//! one) or a dense f32 matrix (HF safetensors).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

use crate::error::Result;
use crate::kernels::QMatrix;

pub struct Linear {
    weight: QMatrix,
    bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn quantized(w: &QTensor, bias: Option<Vec<f32>>) -> Result<Self> {
        Ok(Linear {
            weight: QMatrix::from_qtensor(w)?,
            bias,
        })
    }

    /// `w`: `[out, in]`, any float dtype.
    pub fn dense(w: &Tensor, bias: Option<Vec<f32>>) -> Result<Self> {
        let w = w.to_dtype(candle_core::DType::F32)?;
        Self::quantized(&QTensor::quantize(&w, GgmlDType::F32)?, bias)
    }

    pub fn in_features(&self) -> usize {
        self.weight.in_features()
    }

    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    /// `x`: `n` rows of `in_features` → `n` rows of `out_features`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let out = self.out_features();
        let mut y = vec![0f32; n * out];
        self.weight.matmul(x, n, &mut y);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                crate::model::ops::add(row, b);
            }
        }
        y
    }
}
