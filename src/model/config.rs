//! Hyperparameters of the decoder, read from GGUF metadata or an HF
//! `config.json`. Llama, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 share one decoder; what differs
//! between them is data here (biases, per-head q/k norms, a head size of its
//! own, tied embeddings, rope layout), not code.

use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, with an RMSNorm over each head
    /// of q and k before RoPE, and a head size of its own (128 whatever the
    /// hidden size).
    Qwen3,
    /// Llama's maths with q, k, v in one fused matrix (`attn_qkv`) and gate
    /// and up in one (`ffn_up`, gate rows first), rotating halves; Phi-3
    /// mini's 4k files also declare a sliding window (see `context_length`).
    Phi3,
    /// Gemma 2: Llama's attention with soft-capped scores and logits, a
    /// GELU-gated FFN, RMSNorms after attention and FFN too, embeddings
    /// scaled by √hidden, halves rotated; every other layer has a sliding
    /// window (see `context_length`). GGUF norm weights have Gemma's `1 +`
    /// already added by the converter.
    Gemma2,
    /// Gemma 3: Gemma 2's layout without soft caps, with Qwen3's per-head
    /// q/k RMSNorm; five of every six layers have a sliding window (512
    /// positions on the 270M and 1B, 1024 above) and rotate with a local
    /// base of 10k, the sixth is global with the file's base (1M) and any
    /// linear RoPE scaling (the 4B+ files' factor 8), as llama.cpp runs it.
    Gemma3,
}

impl Arch {
    /// Every architecture a GGUF file may name, for error messages.
    pub const ALL: [Arch; 6] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma2,
        Arch::Gemma3,
    ];

    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "phi3" => Some(Arch::Phi3),
            "gemma2" => Some(Arch::Gemma2),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Size of one attention head; `n_heads * head_dim` may differ from
    /// `hidden` (Qwen3: 16 heads of 128 over a 1024 hidden size).
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// Trained context length.
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    /// Qwen2 has biases on q, k and v.
    pub qkv_bias: bool,
    /// Qwen3: q and k are RMS-normalised per head (learned `head_dim`
    /// weights) before RoPE.
    pub qk_norm: bool,
    /// GGUF llama files store q/k rows permuted so that rotary pairs are
    /// adjacent (llama.cpp's "normal" rope); HF files and qwen2 rotate halves.
    pub rope_interleaved: bool,
    /// Linear RoPE scaling (position interpolation): every rotary frequency
    /// is multiplied by this, i.e. positions are divided by the scaling
    /// factor (`rope.scaling.type = linear`). 1 = none.
    pub rope_freq_scale: f32,
    /// Per-pair frequency divisors, `head_dim / 2` of them: Llama 3.x's
    /// RoPE scaling, which GGUF files carry as the `rope_freqs.weight`
    /// tensor (llama.cpp's converter computes it from `rope_scaling`) and
    /// HF configs as `rope_scaling.rope_type = llama3`. Pair i rotates by
    /// `pos · scale · theta^(-2i/d) / factors[i]`.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Gemma: the FFN gate goes through GELU (tanh form), not SiLU.
    pub ffn_gelu: bool,
    /// Gemma multiplies the token embeddings by √hidden; 1 elsewhere.
    pub embed_scale: f32,
    /// Multiplies q·k before the softmax: 1/√head_dim except where the
    /// architecture says otherwise.
    pub attn_scale: f32,
    /// Gemma 2: attention scores s become `cap · tanh(s / cap)`.
    pub attn_softcap: Option<f32>,
    /// Gemma 2: the same on the output logits.
    pub final_softcap: Option<f32>,
    /// Gemma 2/3: RMSNorm on the attention and FFN outputs (weights
    /// `post_attention_norm`, `post_ffw_norm`) before each residual add.
    pub post_norms: bool,
    /// Sliding-window attention: on a windowed layer position p sees keys
    /// at positions p-W+1..=p (HF's and llama.cpp's mask), W this. `None`:
    /// no window shorter than the context.
    pub sliding_window: Option<usize>,
    /// Which layers are local (`n_layers` flags; empty: none): all of them
    /// (Mistral, Phi-3), every other one from layer 0 (Gemma 2), five of
    /// six (Gemma 3).
    pub windowed_layers: Vec<bool>,
    /// Gemma 3: the RoPE base of the windowed layers (10k), which also
    /// rotate unscaled; the other layers use `rope_theta` and the scaling.
    pub rope_theta_local: Option<f32>,
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::model(path, format!("missing GGUF metadata key `{key}`")))
}

fn meta_usize(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    use gguf_file::Value::*;
    let v = meta(ct, key, path)?;
    let n: i128 = match v {
        U8(x) => *x as i128,
        I8(x) => *x as i128,
        U16(x) => *x as i128,
        I16(x) => *x as i128,
        U32(x) => *x as i128,
        I32(x) => *x as i128,
        U64(x) => *x as i128,
        I64(x) => *x as i128,
        _ => return Err(Error::model(path, format!("`{key}` is not an integer"))),
    };
    usize::try_from(n).map_err(|_| Error::model(path, format!("`{key}` = {n} is out of range")))
}

fn meta_f64(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<f64> {
    use gguf_file::Value::*;
    match meta(ct, key, path)? {
        F32(x) => Ok(*x as f64),
        F64(x) => Ok(*x),
        _ => Err(Error::model(path, format!("`{key}` is not a float"))),
    }
}

impl ModelConfig {
    /// Multiply-adds of the weight matmuls for one token: q, k, v and output
    /// projections, gate, up and down, in every layer, and the LM head.
    pub fn matmul_macs_per_token(&self) -> u64 {
        let attn = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let layer =
            self.hidden * (attn + 2 * kv) + attn * self.hidden + 3 * self.hidden * self.ffn_dim;
        (self.n_layers * layer + self.hidden * self.vocab_size) as u64
    }

    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch_name = meta(ct, "general.architecture", path)?
            .to_string()
            .map_err(|_| Error::model(path, "`general.architecture` is not a string"))?
            .clone();
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "unsupported architecture `{arch_name}` (treespec runs {})",
                    Arch::ALL.map(Arch::name).join(", ")
                ),
            )
        })?;
        let a = arch.name();
        let hidden = meta_usize(ct, &format!("{a}.embedding_length"), path)?;
        let n_heads = meta_usize(ct, &format!("{a}.attention.head_count"), path)?;
        let n_kv_heads =
            meta_usize(ct, &format!("{a}.attention.head_count_kv"), path).unwrap_or(n_heads);
        // The head size: `key_length` where the file gives it (Qwen3 does),
        // else hidden / heads. A different `value_length` is refused below.
        let head_dim = match meta_usize(ct, &format!("{a}.attention.key_length"), path) {
            Ok(k) => k,
            Err(_) => hidden.checked_div(n_heads).unwrap_or(0),
        };
        let vocab_size = match meta_usize(ct, &format!("{a}.vocab_size"), path) {
            Ok(v) => v,
            Err(_) => ct
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| Error::model(path, "missing tensor `token_embd.weight`"))?,
        };
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        let cfg = ModelConfig {
            arch,
            n_layers: meta_usize(ct, &format!("{a}.block_count"), path)?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: meta_usize(ct, &format!("{a}.feed_forward_length"), path)?,
            vocab_size,
            context_length: meta_usize(ct, &format!("{a}.context_length"), path)?,
            rope_theta: meta_f64(ct, &format!("{a}.rope.freq_base"), path).unwrap_or(10_000.0)
                as f32,
            rms_eps: meta_f64(ct, &format!("{a}.attention.layer_norm_rms_epsilon"), path)?,
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            rope_interleaved: arch == Arch::Llama,
            rope_freq_scale: 1.0,
            // Read from the tensor by the loader (`rope_freqs_shape` checks it).
            rope_freq_factors: None,
            ffn_gelu: gemma,
            embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            post_norms: gemma,
            sliding_window: None,
            windowed_layers: Vec::new(),
            // llama.cpp's value for Gemma 3 (its GGUF files do not carry
            // it); a file that does (`rope.freq_base_swa`) overrides it.
            rope_theta_local: (arch == Arch::Gemma3).then(|| {
                meta_f64(ct, &format!("{a}.rope.freq_base_swa"), path).unwrap_or(10_000.0) as f32
            }),
        };
        cfg.check(path)?;
        let mut cfg = cfg;
        cfg.rope_freq_scale = gguf_rope_scaling(ct, a, path)?;
        if (arch == Arch::Gemma2 && cfg.n_layers == 46)
            || (arch == Arch::Gemma3 && cfg.n_layers == 62)
        {
            // Gemma 2 27B and Gemma 3 27B scale queries by 1/√(hidden/heads)
            // (1/√144, 1/√168), not 1/√head_dim (their
            // `query_pre_attn_scalar`); GGUF files do not record it, and
            // llama.cpp recognises the 27Bs by their layer counts.
            cfg.attn_scale = 1.0 / ((cfg.hidden / cfg.n_heads) as f32).sqrt();
        }
        let cap = |key: &str| -> Result<Option<f32>> {
            let key = format!("{a}.{key}");
            match ct.metadata.get(&key).and_then(value_f64) {
                None => Ok(None),
                Some(0.0) => Ok(None),
                Some(c) if c > 0.0 && c.is_finite() => Ok(Some(c as f32)),
                Some(c) => Err(Error::model(
                    path,
                    format!("`{key}` = {c}: a soft cap must be positive"),
                )),
            }
        };
        cfg.attn_softcap = cap("attn_logit_softcapping")?;
        cfg.final_softcap = cap("final_logit_softcapping")?;
        let window_key = format!("{a}.attention.sliding_window");
        if let Some(w) = ct.metadata.get(&window_key).and_then(value_f64) {
            // llama.cpp's layer patterns: Gemma 2 windows the even layers,
            // Gemma 3 all but every sixth; elsewhere a declared window
            // covers every layer.
            let period = match arch {
                Arch::Gemma2 => 2,
                Arch::Gemma3 => 6,
                _ => 1,
            };
            cfg.set_window(w, period, &window_key, path)?;
        }
        refuse_unimplemented_gguf_maths(ct, a, cfg.head_dim, path)?;
        Ok(cfg)
    }

    pub fn from_hf_config(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let get = |k: &str| -> Result<usize> {
            json.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| Error::model(path, format!("config.json lacks integer `{k}`")))
        };
        let archs = json
            .get("architectures")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let arch = match (archs, model_type) {
            // Mistral is the llama layout (its window is read below).
            ("LlamaForCausalLM" | "MistralForCausalLM", _) | (_, "llama" | "mistral") => {
                Arch::Llama
            }
            ("Qwen2ForCausalLM", _) | (_, "qwen2") => Arch::Qwen2,
            ("Qwen3ForCausalLM", _) | (_, "qwen3") => Arch::Qwen3,
            _ => {
                return Err(Error::model(
                    path,
                    format!("unsupported architecture `{archs}` / model_type `{model_type}` (treespec runs llama, mistral, qwen2 and qwen3)"),
                ))
            }
        };
        let hidden = get("hidden_size")?;
        let n_heads = get("num_attention_heads")?;
        let cfg = ModelConfig {
            arch,
            n_layers: get("num_hidden_layers")?,
            hidden,
            n_heads,
            n_kv_heads: get("num_key_value_heads").unwrap_or(n_heads),
            head_dim: get("head_dim").unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
            ffn_dim: get("intermediate_size")?,
            vocab_size: get("vocab_size")?,
            context_length: get("max_position_embeddings").unwrap_or(4096),
            rope_theta: json
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0) as f32,
            rms_eps: json
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            rope_interleaved: false,
            rope_freq_scale: 1.0,
            rope_freq_factors: None,
            ffn_gelu: false,
            embed_scale: 1.0,
            attn_scale: 1.0 / (hidden.checked_div(n_heads).unwrap_or(1).max(1) as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            post_norms: false,
            sliding_window: None,
            windowed_layers: Vec::new(),
            rope_theta_local: None,
        };
        cfg.check(path)?;
        let mut cfg = cfg;
        cfg.attn_scale = 1.0 / (cfg.head_dim as f32).sqrt();
        if let Some(rs) = json.get("rope_scaling").filter(|v| !v.is_null()) {
            let (scale, factors) = hf_rope_scaling(rs, &cfg, path)?;
            cfg.rope_freq_scale = scale;
            cfg.rope_freq_factors = factors;
        }
        // Qwen2 configs carry a window with `use_sliding_window: false`.
        let window_used = json.get("use_sliding_window").and_then(|v| v.as_bool()) != Some(false);
        if let Some(w) = json.get("sliding_window").and_then(|v| v.as_f64()) {
            if window_used {
                cfg.set_window(w, 1, "sliding_window", path)?;
            }
        }
        Ok(cfg)
    }

    /// A sliding window of W on the layers `l` with `l % period` other
    /// than `period - 1` (period 1: every layer). A window at least the
    /// context long masks nothing and is dropped.
    fn set_window(&mut self, w: f64, period: usize, key: &str, path: &Path) -> Result<()> {
        if !(w.is_finite() && w >= 0.0) {
            return Err(Error::model(
                path,
                format!("`{key}` = {w} is not a window size"),
            ));
        }
        let w = w as usize;
        // The pattern stays even when the window masks nothing: Gemma 3's
        // local layers keep their own RoPE base.
        self.windowed_layers = (0..self.n_layers)
            .map(|l| period <= 1 || l % period != period - 1)
            .collect();
        if w >= 1 && w < self.context_length {
            self.sliding_window = Some(w);
        }
        Ok(())
    }

    /// Whether layer `l` is a local (sliding-window) layer.
    pub fn is_local(&self, l: usize) -> bool {
        self.windowed_layers.get(l).copied().unwrap_or(false)
    }

    /// The window of layer `l`, if it has one shorter than the context.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_local(l))
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::model(path, m));
        if self.n_layers == 0 || self.hidden == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad(format!("implausible hyperparameters: {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        // Even: RoPE rotates pairs. `n_heads * head_dim` need not be the
        // hidden size (Qwen3, Mistral Nemo): q and the attention output are
        // shaped by the heads, the projections map between the two.
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dim {} (hidden size {}, {} heads) is not a positive even number",
                self.head_dim, self.hidden, self.n_heads
            ));
        }
        Ok(())
    }
}

/// Refuses a GGUF whose metadata asks for maths this decoder does not do,
/// naming the key: loading it anyway would give subtly wrong logits with no
/// warning (a Llama 3.x file's `rope_freqs` ignored, say). A key set to its
/// neutral value (scaling type `none`, factor 1, a head size equal to
/// the head size) is accepted.
fn refuse_unimplemented_gguf_maths(
    ct: &gguf_file::Content,
    a: &str,
    head_dim: usize,
    path: &Path,
) -> Result<()> {
    let refuse = |key: &str, why: &str| {
        Err(Error::model(
            path,
            format!("unsupported GGUF metadata `{key}`: {why}; treespec would compute wrong logits, so it refuses the file"),
        ))
    };
    let num = |key: &str| ct.metadata.get(key).and_then(value_f64);
    let key = format!("{a}.rope.scaling.attn_factor");
    if let Some(f) = num(&key) {
        if f != 1.0 && f != 0.0 {
            return refuse(
                &key,
                &format!("RoPE attention factor {f} is not implemented"),
            );
        }
    }
    // Phi-3's 128k "longrope": two factor sets switched by context length.
    for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
        if ct.tensor_infos.contains_key(t) {
            return refuse(t, "LongRoPE frequency factors are not implemented");
        }
    }
    if let Some(info) = ct.tensor_infos.get("rope_freqs.weight") {
        if info.shape.dims() != [head_dim / 2] {
            return refuse(
                "rope_freqs.weight",
                &format!(
                    "shape {:?}, expected [{}] (one factor per rotary pair)",
                    info.shape.dims(),
                    head_dim / 2
                ),
            );
        }
    }
    // `key_length` is the head size itself (read above).
    for key in ["attention.value_length", "rope.dimension_count"] {
        let key = format!("{a}.{key}");
        if let Some(n) = num(&key) {
            if n as usize != head_dim {
                return refuse(
                    &key,
                    &format!("{n} differs from the head size {head_dim} (separate key and value sizes and partial rotary are not implemented)"),
                );
            }
        }
    }
    Ok(())
}

/// The linear RoPE frequency scale a GGUF asks for (1 = none): llama.cpp's
/// `rope.scaling.type` = `none` | `linear` with `rope.scaling.factor` (older
/// files give only `rope.scale_linear`). Other types (YaRN) are refused by
/// name: they also change the attention's temperature.
fn gguf_rope_scaling(ct: &gguf_file::Content, a: &str, path: &Path) -> Result<f32> {
    let num = |key: &str| ct.metadata.get(key).and_then(value_f64);
    let type_key = format!("{a}.rope.scaling.type");
    let kind = match ct.metadata.get(&type_key) {
        Some(v) => v.to_string().map(|s| s.to_lowercase()).unwrap_or_default(),
        None => String::new(),
    };
    let factor_key = format!("{a}.rope.scaling.factor");
    let factor = num(&factor_key)
        .or_else(|| num(&format!("{a}.rope.scale_linear")))
        .unwrap_or(1.0);
    let factor = if factor == 0.0 { 1.0 } else { factor };
    match kind.as_str() {
        "none" => Ok(1.0),
        "" | "linear" if factor > 0.0 && factor.is_finite() => Ok((1.0 / factor) as f32),
        "" | "linear" => Err(Error::model(
            path,
            format!("unsupported GGUF metadata `{factor_key}`: RoPE scaling factor {factor} is not a positive number"),
        )),
        other => Err(Error::model(
            path,
            format!("unsupported GGUF metadata `{type_key}`: RoPE scaling `{other}` (factor {factor}) is not implemented; treespec would compute wrong logits, so it refuses the file"),
        )),
    }
}

/// An HF `rope_scaling` object as (linear scale, per-pair divisors):
/// `linear` (or `type`) divides positions by `factor`; `llama3` divides the
/// low frequencies by `factor` and blends the middle band, as Meta's
/// reference and llama.cpp's converter compute it:
/// wavelength λ = 2π/f; λ < L/high → f; λ > L/low → f/factor; between,
/// (1-s)·f/factor + s·f with s = (L/λ - low)/(high - low), L the original
/// context. Anything else is refused.
fn hf_rope_scaling(
    rs: &serde_json::Value,
    cfg: &ModelConfig,
    path: &Path,
) -> Result<(f32, Option<Vec<f32>>)> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let num = |k: &str| {
        rs.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
            Error::model(path, format!("`rope_scaling` ({kind}) lacks number `{k}`"))
        })
    };
    match kind {
        "default" => Ok((1.0, None)),
        "linear" => {
            let f = num("factor")?;
            if !(f > 0.0 && f.is_finite()) {
                return Err(Error::model(path, format!("`rope_scaling.factor` {f} is not positive")));
            }
            Ok(((1.0 / f) as f32, None))
        }
        "llama3" => {
            let (factor, low, high) = (num("factor")?, num("low_freq_factor")?, num("high_freq_factor")?);
            let orig = num("original_max_position_embeddings")?;
            if !(factor > 0.0 && high > low && low > 0.0 && orig > 0.0) {
                return Err(Error::model(path, format!("implausible llama3 `rope_scaling`: {rs}")));
            }
            let d = cfg.head_dim as f64;
            let factors = (0..cfg.head_dim / 2)
                .map(|i| {
                    let f = (cfg.rope_theta as f64).powf(-((2 * i) as f64) / d);
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen < orig / high {
                        f
                    } else if wavelen > orig / low {
                        f / factor
                    } else {
                        let s = (orig / wavelen - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    };
                    (f / scaled) as f32
                })
                .collect();
            Ok((1.0, Some(factors)))
        }
        other => Err(Error::model(
            path,
            format!("unsupported `rope_scaling` type `{other}` in config.json (treespec implements linear and llama3); it would compute wrong logits, so it refuses the model"),
        )),
    }
}

/// A numeric metadata value as f64 (any integer or float type).
fn value_f64(v: &gguf_file::Value) -> Option<f64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as f64,
        V::I8(x) => *x as f64,
        V::U16(x) => *x as f64,
        V::I16(x) => *x as f64,
        V::U32(x) => *x as f64,
        V::I32(x) => *x as f64,
        V::U64(x) => *x as f64,
        V::I64(x) => *x as f64,
        V::F32(x) => *x as f64,
        V::F64(x) => *x,
        V::Bool(b) => *b as u8 as f64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(extra: serde_json::Value) -> Result<ModelConfig> {
        let mut j = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 512, "vocab_size": 100, "rope_theta": 500000.0,
        });
        j.as_object_mut()
            .unwrap()
            .insert("rope_scaling".into(), extra);
        ModelConfig::from_hf_config(&j, Path::new("config.json"))
    }

    /// HF Mistral is the llama layout; its window (v0.1: 4096) applies to
    /// every layer, while Qwen2's declared-but-disabled window does not.
    #[test]
    fn hf_mistral_and_sliding_windows() {
        let base = serde_json::json!({
            "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 512, "vocab_size": 100, "max_position_embeddings": 32768,
        });
        let with = |pairs: serde_json::Value| {
            let mut j = base.clone();
            for (k, v) in pairs.as_object().unwrap() {
                j.as_object_mut().unwrap().insert(k.clone(), v.clone());
            }
            ModelConfig::from_hf_config(&j, Path::new("config.json")).unwrap()
        };
        let c = with(
            serde_json::json!({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}),
        );
        assert_eq!((c.arch, c.context_length), (Arch::Llama, 32768));
        assert_eq!((c.window_of(0), c.window_of(1)), (Some(4096), Some(4096)));
        let c = with(serde_json::json!({"model_type": "mistral", "sliding_window": null}));
        assert_eq!((c.context_length, c.window_of(0)), (32768, None));
        let c = with(
            serde_json::json!({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false}),
        );
        assert_eq!((c.arch, c.window_of(0)), (Arch::Qwen2, None));
        let e = ModelConfig::from_hf_config(
            &serde_json::json!({"model_type": "gemma2", "hidden_size": 256}),
            Path::new("config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported architecture"), "{e}");
    }

    /// HF `rope_scaling`: llama3 leaves the high frequencies alone and
    /// divides the low ones by `factor` (Llama 3.2's values); linear scales
    /// all; unknown types are refused by name, not ignored.
    #[test]
    fn hf_rope_scaling_is_read_or_refused() {
        let c = hf(serde_json::json!({"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}))
        .unwrap();
        let f = c.rope_freq_factors.unwrap();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert!((f[31] - 32.0).abs() < 1e-3, "{}", f[31]);
        assert!(f.windows(2).all(|w| w[0] <= w[1] + 1e-6), "monotone: {f:?}");
        let c = hf(serde_json::json!({"type": "linear", "factor": 4.0})).unwrap();
        assert_eq!(c.rope_freq_scale, 0.25);
        let e = hf(serde_json::json!({"rope_type": "yarn", "factor": 4.0})).unwrap_err();
        assert!(e.to_string().contains("`yarn`"), "{e}");
        assert!(hf(serde_json::Value::Null)
            .unwrap()
            .rope_freq_factors
            .is_none());
    }
}
