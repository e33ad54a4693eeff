//! The decoder shared by Llama and Qwen2, and its one entry point: a forward
//! over N new tokens arranged as a tree, returning logits for the rows asked.
//!
//! Per layer (pre-norm transformer):
//!   h = x + Wo · Attn(RoPE(Wq·n), RoPE(Wk·n), Wv·n),  n = RMSNorm(x)
//!   x' = h + Wdown · (SiLU(Wgate·m) ⊙ Wup·m),          m = RMSNorm(h)
//! and logits = Wout · RMSNorm(x_L).

use candle_core::{DType, Device, Tensor};

use super::attention::{tree_attention, AttentionShape, TreeMask};
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use crate::error::{Error, Result};

pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// The token embedding table, quantized (GGUF) or dense (HF).
pub enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(t) => t.embedding(ids)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?,
        })
    }
}

pub struct Decoder {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub layers: Vec<Layer>,
    pub output_norm: Tensor,
    pub lm_head: Linear,
    /// RoPE tables `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Which rows of the forward need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token (scoring a draft tree).
    All,
    /// Only the last one (prefill).
    Last,
    /// None (prefill chunks before the last).
    None,
}

/// Logits of `rows` tokens, row-major `[rows, vocab]`.
#[derive(Debug, Clone)]
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

impl Decoder {
    pub fn new(
        config: ModelConfig,
        embedding: Embedding,
        layers: Vec<Layer>,
        output_norm: Tensor,
        lm_head: Linear,
        device: Device,
    ) -> Result<Self> {
        let half = config.head_dim / 2;
        let max_pos = config.context_length.max(1);
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f32 / config.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &device)?;
        let t = Tensor::arange(0u32, max_pos as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        Ok(Decoder {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            config,
            embedding,
            layers,
            output_norm,
            lm_head,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A cache sized for `capacity` positions (at most the trained context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            capacity.min(c.context_length),
        )
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // x: [1, N, heads, head_dim]
        Ok(if self.config.rope_interleaved {
            // rope_i wants [b, h, t, d]
            let xt = x.transpose(1, 2)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&xt, cos, sin)?
                .transpose(1, 2)?
                .contiguous()?
        } else {
            candle_nn::rotary_emb::rope_thd(x, cos, sin)?
        })
    }

    /// Runs N new tokens through the model.
    ///
    /// - `tokens[i]` sits at absolute position `positions[i]` (a tree node at
    ///   depth d under a root at the cache end sits at `cache.len() + d`);
    /// - `parents[i]` is its parent among the N (`None` = sees only the cache);
    ///   parents come before children;
    /// - new token i attends to the whole committed cache plus its ancestors
    ///   and itself.
    ///
    /// The N keys/values are appended to `cache` as pending entries: follow
    /// with `cache.keep(path)` or `cache.keep_all()`.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        parents: &[Option<usize>],
        want: LogitRows,
    ) -> Result<Logits> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 || positions.len() != n || parents.len() != n {
            return Err(Error::Invalid(
                "forward needs one position and one parent per token".into(),
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= c.context_length) {
            return Err(Error::ContextLength {
                prompt: p + 1,
                context: c.context_length,
                reserve: 0,
            });
        }
        for (i, p) in parents.iter().enumerate() {
            if matches!(p, Some(p) if *p >= i) {
                return Err(Error::Invalid(format!("token {i}'s parent comes after it")));
            }
        }
        cache.begin(n)?;

        let dev = &self.device;
        let ids = Tensor::from_slice(tokens, n, dev)?;
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let pos = Tensor::from_vec(pos, n, dev)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mask = TreeMask::from_parents(parents);
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let (h, kvh, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let eps = c.rms_eps as f32;

        let mut x = self.embedding.lookup(&ids)?; // [N, hidden]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = layer.wq.forward(&normed)?.reshape((1, n, h, d))?;
            let k = layer.wk.forward(&normed)?.reshape((1, n, kvh, d))?;
            let v = layer.wv.forward(&normed)?;
            let q = self.rope(&q, &cos, &sin)?;
            let k = self.rope(&k, &cos, &sin)?;
            cache.write(
                l,
                &k.flatten_all()?.to_vec1::<f32>()?,
                &v.flatten_all()?.to_vec1::<f32>()?,
            );
            let (keys, values) = cache.layer(l);
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let attn = tree_attention(&shape, &q, keys, values, &mask);
            let attn = Tensor::from_vec(attn, (n, h * d), dev)?;
            x = (x + layer.wo.forward(&attn)?)?;

            let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&normed)?)?;
            let up = layer.w_up.forward(&normed)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }

        let x = match want {
            LogitRows::None => {
                return Ok(Logits {
                    data: Vec::new(),
                    rows: 0,
                    vocab: c.vocab_size,
                })
            }
            LogitRows::Last => x.narrow(0, n - 1, 1)?,
            LogitRows::All => x,
        };
        let rows = x.dims()[0];
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.output_norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        let vocab = logits.dims()[1];
        Ok(Logits {
            data: logits.flatten_all()?.to_vec1::<f32>()?,
            rows,
            vocab,
        })
    }
}
