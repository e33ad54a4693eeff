//! Opening a model: a GGUF file (weights kept quantized) or an HF directory
//! (config.json + *.safetensors + tokenizer.json). Every failure names the
//! file and what is wrong with it.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, ModelConfig};
use super::decoder::{Decoder, Embedding, Layer, PostNorms, QkNorm};
use super::linear::{Linear, Projections};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A loaded model: the decoder, its tokenizer, and an identity string used to
/// tag state that only makes sense for this model (the recycling matrix).
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub identity: String,
}

impl Model {
    pub fn load(path: &Path) -> Result<Model> {
        if path.is_dir() {
            load_hf_dir(path)
        } else {
            load_gguf(path)
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.config
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::model(path, format!("cannot open: {e}")))
}

struct GgufReader<'a> {
    path: &'a Path,
    content: gguf_file::Content,
    reader: BufReader<File>,
    device: Device,
}

impl GgufReader<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str, dims: &[usize]) -> Result<Arc<QTensor>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::model(self.path, format!("missing tensor `{name}`")))?;
        if info.shape.dims() != dims {
            return Err(Error::model(
                self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    info.shape.dims()
                ),
            ));
        }
        let t = self
            .content
            .tensor(&mut self.reader, name, &self.device)
            .map_err(|e| Error::model(self.path, format!("tensor `{name}`: {e}")))?;
        Ok(Arc::new(t))
    }

    fn dense(&mut self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let q = self.qtensor(name, dims)?;
        Ok(q.dequantize(&self.device)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.qtensor(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.dense(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Linear::quantized(&w, b)
    }
}

fn load_gguf(path: &Path) -> Result<Model> {
    let mut file = open(path)?;
    let mut magic = [0u8; 4];
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.read_exact(&mut magic).is_err() {
        return Err(Error::model(
            path,
            format!("file is {len} bytes: too short to be a GGUF model"),
        ));
    }
    if &magic != b"GGUF" {
        return Err(Error::model(
            path,
            format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
        ));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| Error::model(path, format!("corrupt or truncated GGUF header: {e}")))?;
    let mut config = ModelConfig::from_gguf(&content, path)?;
    let tokenizer = Tokenizer::from_gguf(&content, path)?;
    let n_tensors = content.tensor_infos.len();

    let mut g = GgufReader {
        path,
        content,
        reader,
        device: Device::Cpu,
    };
    if g.has("rope_freqs.weight") {
        // Llama 3.x RoPE scaling (its shape was checked with the metadata).
        let factors = g.dense("rope_freqs.weight", &[config.head_dim / 2])?;
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(Error::model(
                path,
                format!("`rope_freqs.weight` holds {bad}: frequency factors must be positive"),
            ));
        }
        config.rope_freq_factors = Some(factors);
    }
    let c = config.clone();
    // q and the attention output are `heads × head_dim` wide, which is the
    // hidden size except where the architecture sets its own head size.
    let (hd, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let tok_embd = g.qtensor("token_embd.weight", &[c.vocab_size, hd])?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("blk.{i}");
        let mut layer = if c.arch == Arch::Phi3 {
            // q, k, v rows in one matrix; gate rows then up rows in another.
            let qkv = g.linear(&format!("{p}.attn_qkv"), q + 2 * kv, hd, false)?;
            let gate_up = g.linear(&format!("{p}.ffn_up"), 2 * c.ffn_dim, hd, false)?;
            Layer::from_projections(
                g.dense(&format!("{p}.attn_norm.weight"), &[hd])?,
                Projections::fused(qkv, vec![q, kv, kv])?,
                g.linear(&format!("{p}.attn_output"), hd, q, false)?,
                g.dense(&format!("{p}.ffn_norm.weight"), &[hd])?,
                Projections::fused(gate_up, vec![c.ffn_dim, c.ffn_dim])?,
                g.linear(&format!("{p}.ffn_down"), hd, c.ffn_dim, false)?,
            )
        } else {
            Layer::new(
                g.dense(&format!("{p}.attn_norm.weight"), &[hd])?,
                [
                    g.linear(&format!("{p}.attn_q"), q, hd, c.qkv_bias)?,
                    g.linear(&format!("{p}.attn_k"), kv, hd, c.qkv_bias)?,
                    g.linear(&format!("{p}.attn_v"), kv, hd, c.qkv_bias)?,
                ],
                g.linear(&format!("{p}.attn_output"), hd, q, false)?,
                g.dense(&format!("{p}.ffn_norm.weight"), &[hd])?,
                [
                    g.linear(&format!("{p}.ffn_gate"), c.ffn_dim, hd, false)?,
                    g.linear(&format!("{p}.ffn_up"), c.ffn_dim, hd, false)?,
                ],
                g.linear(&format!("{p}.ffn_down"), hd, c.ffn_dim, false)?,
            )
        };
        if c.qk_norm {
            layer.qk_norm = Some(QkNorm {
                q: g.dense(&format!("{p}.attn_q_norm.weight"), &[c.head_dim])?,
                k: g.dense(&format!("{p}.attn_k_norm.weight"), &[c.head_dim])?,
            });
        }
        if c.post_norms {
            layer.post_norms = Some(PostNorms {
                attn: g.dense(&format!("{p}.post_attention_norm.weight"), &[hd])?,
                ffn: g.dense(&format!("{p}.post_ffw_norm.weight"), &[hd])?,
            });
        }
        layers.push(layer);
    }
    let output_norm = g.dense("output_norm.weight", &[hd])?;
    // Tied embeddings: a file without `output.weight` reuses the token table.
    let lm_head = if g.has("output.weight") {
        g.linear("output", c.vocab_size, hd, false)?
    } else {
        Linear::quantized(&tok_embd, None)?
    };
    let decoder = Decoder::new(
        config,
        Embedding::Quantized(tok_embd),
        layers,
        output_norm,
        lm_head,
    )?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Model {
        identity: format!(
            "gguf:{name}:{len}:{n_tensors}:{}",
            decoder.config.arch.name()
        ),
        decoder,
        tokenizer,
        path: path.to_path_buf(),
    })
}

fn load_hf_dir(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| Error::model(&cfg_path, format!("cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&cfg_path, format!("invalid JSON: {e}")))?;
    let config = ModelConfig::from_hf_config(&json, &cfg_path)?;
    let tied = json
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tokenizer = Tokenizer::from_hf_dir(dir)?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::model(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::model(dir, "no *.safetensors files"));
    }
    let device = Device::Cpu;
    let mut tensors = std::collections::HashMap::new();
    let mut total = 0u64;
    for f in &files {
        total += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let t = candle_core::safetensors::load(f, &device)
            .map_err(|e| Error::model(f, format!("cannot read safetensors: {e}")))?;
        tensors.extend(t);
    }
    let has_lm_head = tensors.contains_key("lm_head.weight");
    let mut get = |name: &str, dims: &[usize]| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::model(dir, format!("missing tensor `{name}`")))?;
        if t.dims() != dims {
            return Err(Error::model(
                dir,
                format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let vec = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let c = config.clone();
    let (hd, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let embed = get("model.embed_tokens.weight", &[c.vocab_size, hd])?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get(&format!("{p}.{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(vec(get(&format!("{p}.{name}.bias"), &[out])?)?)
            } else {
                None
            };
            Linear::dense(&w, b)
        };
        let wq = lin("self_attn.q_proj", q, hd, c.qkv_bias)?;
        let wk = lin("self_attn.k_proj", kv, hd, c.qkv_bias)?;
        let wv = lin("self_attn.v_proj", kv, hd, c.qkv_bias)?;
        let wo = lin("self_attn.o_proj", hd, q, false)?;
        let w_gate = lin("mlp.gate_proj", c.ffn_dim, hd, false)?;
        let w_up = lin("mlp.up_proj", c.ffn_dim, hd, false)?;
        let w_down = lin("mlp.down_proj", hd, c.ffn_dim, false)?;
        let mut layer = Layer::new(
            vec(get(&format!("{p}.input_layernorm.weight"), &[hd])?)?,
            [wq, wk, wv],
            wo,
            vec(get(&format!("{p}.post_attention_layernorm.weight"), &[hd])?)?,
            [w_gate, w_up],
            w_down,
        );
        if c.qk_norm {
            layer.qk_norm = Some(QkNorm {
                q: vec(get(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?)?,
                k: vec(get(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?)?,
            });
        }
        layers.push(layer);
    }
    let output_norm = vec(get("model.norm.weight", &[hd])?)?;
    let lm_head = if tied || !has_lm_head {
        Linear::dense(&embed, None)?
    } else {
        Linear::dense(&get("lm_head.weight", &[c.vocab_size, hd])?, None)?
    };
    let decoder = Decoder::new(
        config,
        Embedding::Dense {
            table: vec(embed)?,
            dim: hd,
        },
        layers,
        output_norm,
        lm_head,
    )?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Model {
        identity: format!("hf:{name}:{total}:{}", decoder.config.arch.name()),
        decoder,
        tokenizer,
        path: dir.to_path_buf(),
    })
}
