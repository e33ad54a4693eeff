//! A linear layer `y = x W^T (+ b)` over whichever weight storage the file
//! gave us: GGUF-quantized blocks, or a dense matrix (HF safetensors).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::error::Result;

pub enum Weight {
    Quantized(QMatMul),
    Dense(Tensor),
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    pub fn quantized(w: std::sync::Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let out_features = w.shape().dims()[0];
        Ok(Linear {
            weight: Weight::Quantized(QMatMul::from_arc(w)?),
            bias,
            out_features,
        })
    }

    /// `w`: `[out, in]` f32.
    pub fn dense(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_features = w.dims()[0];
        Ok(Linear {
            weight: Weight::Dense(w.t()?),
            bias,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[N, in]` → `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Dense(wt) => x.matmul(wt)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
