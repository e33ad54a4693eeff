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

    /// Stacks layers with the same input into one (see [`QMatrix::stack`]);
    /// layers that cannot be stacked come back unchanged.
    fn stack(parts: Vec<Linear>) -> std::result::Result<Linear, Vec<Linear>> {
        let any_bias = parts.iter().any(|l| l.bias.is_some());
        let biases: Vec<Option<Vec<f32>>> = parts.iter().map(|l| l.bias.clone()).collect();
        let outs: Vec<usize> = parts.iter().map(|l| l.out_features()).collect();
        match QMatrix::stack(parts.into_iter().map(|l| l.weight).collect()) {
            Ok(weight) => {
                let bias = any_bias.then(|| {
                    biases
                        .into_iter()
                        .zip(&outs)
                        .flat_map(|(b, &o)| b.unwrap_or_else(|| vec![0.0; o]))
                        .collect()
                });
                Ok(Linear { weight, bias })
            }
            Err(weights) => Err(weights
                .into_iter()
                .zip(biases)
                .map(|(weight, bias)| Linear { weight, bias })
                .collect()),
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.in_features()
    }

    /// Bytes of weights a forward reads.
    pub fn weight_bytes(&self) -> usize {
        self.weight.weight_bytes()
    }

    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    /// `x`: `n` rows of `in_features` → `y`: `n` rows of `out_features`, a
    /// reused buffer (resized; the matmul overwrites every value, so a
    /// buffer of the right size is neither reallocated nor cleared).
    pub fn forward_into(&self, x: &[f32], n: usize, y: &mut Vec<f32>) {
        let out = self.out_features();
        y.resize(n * out, 0.0);
        self.weight.matmul(x, n, y);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                crate::model::ops::add(row, b);
            }
        }
    }
}

/// Several projections of the same input (Q, K, V; gate, up), computed as
/// one stacked matmul when their weights can be stacked (quantized, or all
/// dense), else one by one.
/// Either way the result is one buffer of `n` rows `[part 0 | part 1 | …]`.
pub struct Projections {
    widths: Vec<usize>,
    /// One stacked layer, or the parts.
    layers: Vec<Linear>,
}

impl Projections {
    pub fn new(parts: Vec<Linear>) -> Self {
        let widths = parts.iter().map(|l| l.out_features()).collect();
        let layers = match Linear::stack(parts) {
            Ok(one) => vec![one],
            Err(parts) => parts,
        };
        Projections { widths, layers }
    }

    /// Parts that a file already stores as one matrix (Phi-3's fused
    /// `attn_qkv` and gate/up): `widths` must add up to its rows.
    pub fn fused(one: Linear, widths: Vec<usize>) -> Result<Self> {
        let total: usize = widths.iter().sum();
        if total != one.out_features() {
            return Err(crate::error::Error::Invalid(format!(
                "fused projection has {} rows, its parts {widths:?}",
                one.out_features()
            )));
        }
        Ok(Projections {
            widths,
            layers: vec![one],
        })
    }

    /// Output width of each part.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Whether the parts run as one matmul.
    pub fn stacked(&self) -> bool {
        self.layers.len() == 1
    }

    pub fn in_features(&self) -> usize {
        self.layers[0].in_features()
    }

    /// Bytes of weights a forward reads.
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(Linear::weight_bytes).sum()
    }

    /// `y`: `n` rows of `Σ widths`; `part` is scratch for unstacked parts.
    pub fn forward_into(&self, x: &[f32], n: usize, y: &mut Vec<f32>, part: &mut Vec<f32>) {
        if let [one] = self.layers.as_slice() {
            return one.forward_into(x, n, y);
        }
        let total: usize = self.widths.iter().sum();
        y.resize(n * total, 0.0);
        let mut col = 0;
        for l in &self.layers {
            let w = l.out_features();
            l.forward_into(x, n, part);
            for (dst, src) in y.chunks_exact_mut(total).zip(part.chunks_exact(w)) {
                dst[col..col + w].copy_from_slice(src);
            }
            col += w;
        }
    }
}
