//! Architectures checked against an independent implementation:
//! candle-transformers' model of the same architecture, run on a small
//! synthetic GGUF this test writes (random weights in the real tensor
//! layout and metadata keys, SmolLM2's tokenizer metadata so the file loads
//! as a model). A prefill and two decode steps, logits compared.
//!
//! The bound: both engines read the same Q8_0 weights and quantize the
//! activations to 8 bits before each integer dot product (candle per block
//! of 32 values, treespec per block of 32 or 256), so they round different
//! values: a logit differs by a few rounding steps of its activations, i.e.
//! a small multiple of 1/127 of its magnitude. Measured on these shapes:
//! max |Δ| 1.2–1.7% of the largest logit; the bound is 4% of it, and the
//! top-1 token must agree wherever the reference's top-2 gap exceeds that
//! bound. Leaving out Qwen3's q/k norms makes the difference 19% (checked).

mod common;

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use treespec::model::{LogitRows, Model};

/// Deterministic uniform values in [-a, a].
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, a: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }

    fn tensor(&mut self, dims: &[usize], center: f32, a: f32, dtype: GgmlDType) -> QTensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| center + self.next(a)).collect();
        let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }
}

struct Shape {
    arch: &'static str,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    /// Llama 3 RoPE factors, written as `rope_freqs.weight`.
    rope_freqs: Option<Vec<f32>>,
}

/// Writes a GGUF of `shape` with random weights (Q8_0 matrices, f32 norms,
/// no `output.weight`: the LM head is the token table, as both engines read
/// it) and the tokenizer of `tokenizer_from`.
fn write_model(path: &Path, s: &Shape, tokenizer_from: &Path) {
    write_model_with(path, s, tokenizer_from, &[]);
}

/// [`write_model`] with `extra` metadata (a Gemma 3 window, say).
fn write_model_with(
    path: &Path,
    s: &Shape,
    tokenizer_from: &Path,
    extra: &[(&str, gguf_file::Value)],
) {
    let mut f = std::fs::File::open(tokenizer_from).unwrap();
    let src = gguf_file::Content::read(&mut f).unwrap();
    let vocab = src
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len())
        .unwrap();
    let a = s.arch;
    let mut md: Vec<(String, gguf_file::Value)> = src
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    use gguf_file::Value as V;
    md.extend([
        ("general.architecture".into(), V::String(a.into())),
        // candle: 0 = f32 rotary tables (its default f16 would round them).
        ("general.dtype".into(), V::U32(0)),
        (format!("{a}.block_count"), V::U32(s.layers as u32)),
        (format!("{a}.embedding_length"), V::U32(s.hidden as u32)),
        (format!("{a}.attention.head_count"), V::U32(s.heads as u32)),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(s.kv_heads as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            V::U32(s.head_dim as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            V::U32(s.head_dim as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            V::U32(s.head_dim as u32),
        ),
        (format!("{a}.feed_forward_length"), V::U32(s.ffn as u32)),
        (format!("{a}.context_length"), V::U32(512)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-6),
        ),
        // candle's Phi-3 fixes the base at 10k (Phi-3 mini's own value).
        (
            format!("{a}.rope.freq_base"),
            V::F32(if a == "phi3" { 10_000.0 } else { 1_000_000.0 }),
        ),
    ]);
    if a == "gemma2" {
        md.extend([
            // Gemma 2's final cap; an attention cap low enough to matter
            // on these scores (the real 50 barely bends them).
            (format!("{a}.attn_logit_softcapping"), V::F32(2.0)),
            (format!("{a}.final_logit_softcapping"), V::F32(60.0)),
            (format!("{a}.attention.sliding_window"), V::U32(256)),
        ]);
    }
    md.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut rng = Lcg(0x005e_ed0f_7e57);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let q8 = GgmlDType::Q8_0;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            rng.tensor(&[vocab, s.hidden], 0.0, 0.5, q8),
        ),
        (
            "output_norm.weight".into(),
            rng.tensor(&[s.hidden], 1.0, 0.1, GgmlDType::F32),
        ),
    ];
    // Spread like trained weights: outputs of unit-ish size per layer.
    let w = |inp: usize| 1.7 / (inp as f32).sqrt();
    for l in 0..s.layers {
        let p = format!("blk.{l}");
        let mut put = |name: &str, t: QTensor| tensors.push((format!("{p}.{name}"), t));
        put(
            "attn_norm.weight",
            rng.tensor(&[s.hidden], 1.0, 0.1, GgmlDType::F32),
        );
        if a == "phi3" {
            // One fused matrix: q rows, then k, then v.
            put(
                "attn_qkv.weight",
                rng.tensor(&[q + 2 * kv, s.hidden], 0.0, w(s.hidden), q8),
            );
        } else {
            put(
                "attn_q.weight",
                rng.tensor(&[q, s.hidden], 0.0, w(s.hidden), q8),
            );
            put(
                "attn_k.weight",
                rng.tensor(&[kv, s.hidden], 0.0, w(s.hidden), q8),
            );
            put(
                "attn_v.weight",
                rng.tensor(&[kv, s.hidden], 0.0, w(s.hidden), q8),
            );
        }
        put(
            "attn_output.weight",
            rng.tensor(&[s.hidden, q], 0.0, w(q), q8),
        );
        if a == "qwen3" || a == "gemma3" {
            put(
                "attn_q_norm.weight",
                rng.tensor(&[s.head_dim], 1.0, 0.3, GgmlDType::F32),
            );
            put(
                "attn_k_norm.weight",
                rng.tensor(&[s.head_dim], 1.0, 0.3, GgmlDType::F32),
            );
        }
        put(
            "ffn_norm.weight",
            rng.tensor(&[s.hidden], 1.0, 0.1, GgmlDType::F32),
        );
        if a == "phi3" {
            // Gate rows, then up rows.
            put(
                "ffn_up.weight",
                rng.tensor(&[2 * s.ffn, s.hidden], 0.0, w(s.hidden), q8),
            );
        } else {
            put(
                "ffn_gate.weight",
                rng.tensor(&[s.ffn, s.hidden], 0.0, w(s.hidden), q8),
            );
            put(
                "ffn_up.weight",
                rng.tensor(&[s.ffn, s.hidden], 0.0, w(s.hidden), q8),
            );
        }
        put(
            "ffn_down.weight",
            rng.tensor(&[s.hidden, s.ffn], 0.0, w(s.ffn), q8),
        );
        if a == "gemma2" || a == "gemma3" {
            put(
                "post_attention_norm.weight",
                rng.tensor(&[s.hidden], 1.0, 0.1, GgmlDType::F32),
            );
            put(
                "post_ffw_norm.weight",
                rng.tensor(&[s.hidden], 1.0, 0.1, GgmlDType::F32),
            );
        }
    }
    if a == "phi3" {
        // candle's Phi-3 reads an untied LM head.
        tensors.push((
            "output.weight".into(),
            rng.tensor(&[vocab, s.hidden], 0.0, 0.5, q8),
        ));
    }
    if let Some(f) = &s.rope_freqs {
        let t = Tensor::from_vec(f.clone(), f.len(), &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
    out.flush().unwrap();
}

/// The vocabulary size of the GGUF at `path` and a reader of its tensors,
/// dequantized to f32 (for the HF-layout references).
fn dequantized(path: &Path) -> (usize, impl FnMut(&str) -> Tensor) {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let vocab = ct.tensor_infos["token_embd.weight"].shape.dims()[0];
    let get = move |name: &str| {
        ct.tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    (vocab, get)
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("treespec-ref-{}-{name}", std::process::id()))
}

/// Logits of the reference implementation for the last position of each
/// step: the prompt, then each of `next` one at a time.
type Reference = Box<dyn FnMut(&[u32], usize) -> Vec<f32>>;

fn candle_reference(path: &Path, arch: &str) -> Reference {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    f.rewind().unwrap();
    let dev = Device::Cpu;
    // The two models' types differ; their loading and forward read alike.
    macro_rules! reference {
        ($model:ty) => {{
            let mut m = <$model>::from_gguf(ct, &mut f, &dev).unwrap();
            Box::new(move |ids: &[u32], offset: usize| {
                let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
                let out = m.forward(&input, offset).unwrap();
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
        }};
    }
    use candle_transformers::models::{
        quantized_gemma3, quantized_llama, quantized_phi3, quantized_qwen3,
    };
    match arch {
        "phi3" => {
            let mut m = quantized_phi3::ModelWeights::from_gguf(false, ct, &mut f, &dev).unwrap();
            Box::new(move |ids: &[u32], offset: usize| {
                let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
                let out = m.forward(&input, offset).unwrap();
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
        }
        "qwen3" => reference!(quantized_qwen3::ModelWeights),
        "llama" => reference!(quantized_llama::ModelWeights),
        "gemma3" => reference!(quantized_gemma3::ModelWeights),
        other => panic!("no reference for {other}"),
    }
}

/// Token ids for the prefill and two decode steps, within SmolLM2's
/// vocabulary.
const TOKENS: [u32; 12] = [
    1, 504, 3_000, 17, 9_999, 42, 271, 12_345, 88, 7, 2_024, 31_000,
];

fn compare(arch: &str, shape: Shape) {
    let tok = common::model_path("smollm2-135m");
    compare_on(arch, arch, shape, &tok, |_| TOKENS.to_vec());
}

/// `tokens(model)` gives the ids to run: all but the last two are the
/// prefill.
fn compare_on(
    file: &str,
    arch: &str,
    shape: Shape,
    tokenizer_from: &Path,
    tokens: impl Fn(&Model) -> Vec<u32>,
) {
    let path = temp(&format!("{file}.gguf"));
    write_model(&path, &shape, tokenizer_from);
    let model = Model::load(&path).unwrap_or_else(|e| panic!("treespec loads {arch}: {e}"));
    assert_eq!(model.config().arch.name(), arch);
    assert_eq!(model.config().head_dim, shape.head_dim);
    let reference = candle_reference(&path, arch);
    let diffs = compare_with(&model, reference, arch, &tokens(&model));
    let _ = std::fs::remove_file(&path);
    for (k, (diff, bound)) in diffs.iter().enumerate() {
        assert!(
            diff <= bound,
            "{arch} step {k}: logits differ by {diff} (bound {bound})"
        );
    }
}

/// Runs a 10-token prefill and two decode steps through `model` and
/// `reference`; returns (max |Δ|, bound) per step, having checked the top
/// token wherever the reference's top-2 gap exceeds the bound.
fn compare_with(
    model: &Model,
    reference: Reference,
    arch: &str,
    tokens: &[u32],
) -> Vec<(f32, f32)> {
    compare_within(model, reference, arch, tokens, 0.04)
}

/// [`compare_with`] with the bound `bound_frac` of the largest logit.
fn compare_within(
    model: &Model,
    mut reference: Reference,
    arch: &str,
    tokens: &[u32],
    bound_frac: f32,
) -> Vec<(f32, f32)> {
    let mut out = Vec::new();
    let (prompt, next) = tokens.split_at(tokens.len() - 2);
    let mut cache = model.decoder.new_cache(64);
    let mut steps: Vec<(Vec<u32>, usize)> = vec![(prompt.to_vec(), 0)];
    for (pos, &t) in (prompt.len()..).zip(next) {
        steps.push((vec![t], pos));
    }
    for (k, (ids, offset)) in steps.iter().enumerate() {
        let positions: Vec<usize> = (*offset..offset + ids.len()).collect();
        let parents: Vec<Option<usize>> = (0..ids.len()).map(|i| i.checked_sub(1)).collect();
        let got = model
            .decoder
            .forward(&mut cache, ids, &positions, &parents, LogitRows::Last)
            .unwrap();
        cache.keep_all();
        let got = got.row(0).to_vec();
        let want = reference(ids, *offset);
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{arch} step {k}: max |logit| {scale:.3}, max |Δ| {diff:.4}");
        assert!(scale > 1.0, "degenerate logits ({scale})");
        let bound = bound_frac * scale;
        out.push((diff, bound));
        if diff > bound {
            continue;
        }
        let top = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap()
        };
        let mut sorted = want.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > bound {
            assert_eq!(top(&got), top(&want), "{arch} step {k}: top token");
        }
    }
    out
}

/// Qwen3: per-head q/k RMSNorm before RoPE, no q/k/v biases, and a head
/// size of its own (4 heads of 128 over a hidden size of 256).
#[test]
fn qwen3_matches_candle_transformers() {
    compare(
        "qwen3",
        Shape {
            arch: "qwen3",
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 128,
            ffn: 512,
            rope_freqs: None,
        },
    );
}

/// Llama (GGUF layout: rotary pairs interleaved, q/k rows permuted as
/// llama.cpp writes them), grouped-query attention: the decoder every
/// other architecture shares, against an independent implementation.
#[test]
fn llama_matches_candle_transformers() {
    compare(
        "llama",
        Shape {
            arch: "llama",
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            ffn: 512,
            rope_freqs: None,
        },
    );
}

/// Mistral 7B (v0.1-v0.3) as llama.cpp converts it: the llama layout with
/// 8 KV heads per 32 query heads and a SentencePiece BPE vocabulary
/// (`tokenizer.ggml.model = llama`, tested token for token against
/// sentencepiece in tests/sentencepiece.rs). The prompt is a real chat
/// prompt encoded by treespec's tokenizer, so the file is used end to end.
#[test]
fn mistral_layout_with_sentencepiece_vocab_matches_candle_transformers() {
    let tok = temp("spm-tokenizer.gguf");
    let template =
        "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}";
    common::write_sentencepiece_gguf(&tok, Some(template));
    let shape = Shape {
        arch: "llama",
        layers: 2,
        hidden: 256,
        heads: 8,
        kv_heads: 2,
        head_dim: 32,
        ffn: 512,
        rope_freqs: None,
    };
    compare_on("mistral", "llama", shape, &tok, |model| {
        let text = model
            .tokenizer
            .apply_chat_template(
                &[treespec::tokenizer::ChatMessage {
                    role: "user".into(),
                    content: "Rename wrap(text) to fill(text), café 日本".into(),
                }],
                true,
            )
            .unwrap();
        let ids = model.tokenizer.encode(&text, true).unwrap();
        assert_eq!(ids[0], 1, "BOS from the template");
        assert!(ids.len() > 12, "{ids:?}");
        ids
    });
    let _ = std::fs::remove_file(&tok);
}

/// Phi-3 (mini's layout): q/k/v fused in `attn_qkv`, gate and up fused in
/// `ffn_up`, halves rotated, an untied LM head, head size 96 as in the real
/// model (3072 / 32).
#[test]
fn phi3_matches_candle_transformers() {
    compare(
        "phi3",
        Shape {
            arch: "phi3",
            layers: 2,
            hidden: 384,
            heads: 4,
            kv_heads: 4,
            head_dim: 96,
            ffn: 512,
            rope_freqs: None,
        },
    );
}

/// Llama 3.x RoPE scaling (`rope_freqs.weight`, as llama.cpp's converter
/// writes it for Llama 3.1/3.2) against candle-transformers' HF Llama with
/// its own `rope_scaling = llama3` computation, fed the same (dequantized)
/// weights. The original context is set to 64 so that the scaled band
/// turns by a large angle within the test's 12 positions; the same file
/// without the factors must then miss the reference (so the test has
/// teeth: ignoring `rope_freqs`, as treespec once did, fails it).
#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    use candle_transformers::models::llama as hf;
    let (factor, low, high, orig) = (8.0f32, 1.0f32, 4.0f32, 64usize);
    let (theta, hd) = (1_000_000f32, 64usize);
    // The converter's formula: factor_i = f_i / scaled f_i.
    let freqs: Vec<f32> = (0..hd / 2)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f32 / hd as f32);
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < orig as f32 / high {
                1.0
            } else if wavelen > orig as f32 / low {
                factor
            } else {
                let s = (orig as f32 / wavelen - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            }
        })
        .collect();
    assert!(freqs.iter().filter(|&&f| f > 1.0).count() >= 8);
    let shape = |rope_freqs| Shape {
        arch: "llama",
        layers: 2,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: hd,
        ffn: 512,
        rope_freqs,
    };
    let tok = common::model_path("smollm2-135m");
    let path = temp("llama3.gguf");
    write_model(&path, &shape(Some(freqs)), &tok);
    let plain = temp("llama3-plain.gguf");
    write_model(&plain, &shape(None), &tok);

    // The reference: HF names, q/k rows un-permuted to rotate-half.
    let dev = Device::Cpu;
    let (vocab, mut get) = dequantized(&path);
    let unpermute = |t: Tensor, heads: usize| {
        let dim = t.dims()[1];
        t.reshape((heads, hd / 2, 2, dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * hd, dim))
            .unwrap()
    };
    let mut w = std::collections::HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        get("token_embd.weight"),
    );
    w.insert("model.norm.weight".to_string(), get("output_norm.weight"));
    for l in 0..2 {
        let (p, b) = (format!("model.layers.{l}"), format!("blk.{l}"));
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            unpermute(get(&format!("{b}.attn_q.weight")), 4),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            unpermute(get(&format!("{b}.attn_k.weight")), 2),
        );
        for (h, g) in [
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ] {
            w.insert(format!("{p}.{h}.weight"), get(&format!("{b}.{g}.weight")));
        }
    }
    let cfg = hf::Config {
        hidden_size: 256,
        intermediate_size: 512,
        vocab_size: vocab,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        use_flash_attn: false,
        rms_norm_eps: 1e-6,
        rope_theta: theta,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: Some(hf::Llama3RopeConfig {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
            rope_type: hf::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: 512,
        tie_word_embeddings: true,
    };
    let reference = || -> Reference {
        let vb = candle_nn::VarBuilder::from_tensors(w.clone(), candle_core::DType::F32, &dev);
        let m = hf::Llama::load(vb, &cfg).unwrap();
        let mut cache = hf::Cache::new(true, candle_core::DType::F32, &cfg, &dev).unwrap();
        Box::new(move |ids: &[u32], offset: usize| {
            let input = Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let out = m.forward(&input, offset, &mut cache).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
    };

    let model = Model::load(&path).unwrap();
    assert!(model.config().rope_freq_factors.is_some());
    let diffs = compare_with(&model, reference(), "llama3", &TOKENS);
    for (k, (diff, bound)) in diffs.iter().enumerate() {
        assert!(
            diff <= bound,
            "llama3 step {k}: logits differ by {diff} (bound {bound})"
        );
    }
    // Without the factors the same weights miss the reference.
    let unscaled = Model::load(&plain).unwrap();
    let worst = worst_ratio(&compare_with(
        &unscaled,
        reference(),
        "llama3 without rope_freqs",
        &TOKENS,
    ));
    assert!(
        worst > 1.0,
        "ignoring rope_freqs stayed within the bound ({worst:.2} of it): the test has no teeth"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&plain);
}

/// Gemma 2 (GGUF layout, norm weights with Gemma's `1 +` baked in as
/// llama.cpp's converter writes them) against candle-transformers' HF
/// Gemma 2 fed the same dequantized weights (norms minus one): embeddings
/// scaled by √hidden, post-attention and post-FFN norms, GELU(tanh) gate,
/// attention and final soft caps. The window (256, on the even layers) is
/// longer than the test.
#[test]
fn gemma2_matches_candle_transformers() {
    use candle_transformers::models::gemma2 as hf;
    let shape = Shape {
        arch: "gemma2",
        layers: 2,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        rope_freqs: None,
    };
    let tok = common::model_path("smollm2-135m");
    let path = temp("gemma2.gguf");
    write_model(&path, &shape, &tok);
    let model = Model::load(&path).unwrap_or_else(|e| panic!("treespec loads gemma2: {e}"));
    let c = model.config();
    assert_eq!(c.arch.name(), "gemma2");
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(2.0), Some(60.0)));
    assert_eq!(
        (c.window_of(0), c.window_of(1)),
        (Some(256), None),
        "even layers are local"
    );

    let dev = Device::Cpu;
    let (vocab, w) = hf_gemma_weights(&path, shape.layers, false);
    let cfg = hf::Config {
        attention_bias: false,
        head_dim: shape.head_dim,
        hidden_activation: candle_nn::Activation::GeluPytorchTanh,
        hidden_size: shape.hidden,
        intermediate_size: shape.ffn,
        num_attention_heads: shape.heads,
        num_hidden_layers: shape.layers,
        num_key_value_heads: shape.kv_heads,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        vocab_size: vocab,
        final_logit_softcapping: Some(60.0),
        attn_logit_softcapping: Some(2.0),
        query_pre_attn_scalar: shape.head_dim,
        sliding_window: Some(256),
        max_position_embeddings: 512,
    };
    let reference = || -> Reference {
        let vb = candle_nn::VarBuilder::from_tensors(w.clone(), candle_core::DType::F32, &dev);
        let mut m = hf::Model::new(false, &cfg, vb).unwrap();
        let dev = dev.clone();
        Box::new(move |ids: &[u32], offset: usize| {
            let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
            let out = m.forward(&input, offset).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
    };
    // The bound: Gemma's √hidden embedding scale inflates the logits (max
    // ~49 here) without inflating the rounding differences, so 4% of the
    // largest logit would hide whole features: measured, the match is
    // 0.24% and leaving out the attention cap 1.8-2.4%, SiLU for GELU
    // 1.6-2.2%. 1% separates them.
    let frac = 0.01;
    let diffs = compare_within(&model, reference(), "gemma2", &TOKENS, frac);
    for (k, (diff, bound)) in diffs.iter().enumerate() {
        assert!(
            diff <= bound,
            "gemma2 step {k}: logits differ by {diff} (bound {bound})"
        );
    }
    // Control: the same model without the attention soft cap must miss.
    let mut uncapped = model;
    uncapped.decoder.config.attn_softcap = None;
    let worst = worst_ratio(&compare_within(
        &uncapped,
        reference(),
        "gemma2 without attention cap",
        &TOKENS,
        frac,
    ));
    let _ = std::fs::remove_file(&path);
    assert!(
        worst > 1.0,
        "ignoring the attention cap went unnoticed ({worst})"
    );
}

/// A Gemma GGUF's weights under HF names, dequantized, for candle's HF
/// Gemma 2/3 models: norm weights minus the `1 +` that llama.cpp's
/// converter baked in (HF's Gemma norm adds it back), and Gemma 3's
/// per-head q/k norms when `qk_norm`.
fn hf_gemma_weights(
    path: &Path,
    layers: usize,
    qk_norm: bool,
) -> (usize, std::collections::HashMap<String, Tensor>) {
    let (vocab, mut get) = dequantized(path);
    let mut w = std::collections::HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        get("token_embd.weight"),
    );
    let minus_one = |t: Tensor| (t - 1.0).unwrap();
    w.insert(
        "model.norm.weight".to_string(),
        minus_one(get("output_norm.weight")),
    );
    for l in 0..layers {
        let (p, b) = (format!("model.layers.{l}"), format!("blk.{l}"));
        for (h, g) in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            w.insert(format!("{p}.{h}.weight"), get(&format!("{b}.{g}.weight")));
        }
        let mut norms = vec![
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        ];
        if qk_norm {
            norms.extend([
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
            ]);
        }
        for (h, g) in norms {
            w.insert(
                format!("{p}.{h}.weight"),
                minus_one(get(&format!("{b}.{g}.weight"))),
            );
        }
    }
    (vocab, w)
}

fn gemma3_shape() -> Shape {
    Shape {
        arch: "gemma3",
        // Six layers: five local (base 10k) and one global (base 1M), the
        // real pattern.
        layers: 6,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        rope_freqs: None,
    }
}

fn worst_ratio(diffs: &[(f32, f32)]) -> f32 {
    diffs.iter().map(|(d, b)| d / b).fold(0f32, f32::max)
}

/// candle-transformers' HF Gemma 3 fed `path`'s dequantized weights, with
/// a window of `window` positions.
fn gemma3_reference(path: &Path, shape: &Shape, window: usize) -> Reference {
    use candle_transformers::models::gemma3 as hf;
    let (vocab, w) = hf_gemma_weights(path, shape.layers, true);
    let cfg = hf::Config {
        attention_bias: false,
        head_dim: shape.head_dim,
        hidden_activation: candle_nn::Activation::GeluPytorchTanh,
        hidden_size: shape.hidden,
        intermediate_size: shape.ffn,
        num_attention_heads: shape.heads,
        num_hidden_layers: shape.layers,
        num_key_value_heads: shape.kv_heads,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_local_base_freq: 10_000.0,
        vocab_size: vocab,
        final_logit_softcapping: None,
        attn_logit_softcapping: None,
        query_pre_attn_scalar: shape.head_dim,
        sliding_window: window,
        sliding_window_pattern: 6,
        max_position_embeddings: 512,
    };
    let dev = Device::Cpu;
    let vb = candle_nn::VarBuilder::from_tensors(w, candle_core::DType::F32, &dev);
    let mut m = hf::Model::new(false, &cfg, vb).unwrap();
    // One token per forward: candle's HF Gemma 3 appends its transposed
    // (non-contiguous) values to the cache, which fails for more than one
    // row ("slice-set only supports contiguous tensors").
    Box::new(move |ids: &[u32], offset: usize| {
        let mut last = Vec::new();
        for (k, &id) in ids.iter().enumerate() {
            let input = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
            let out = m.forward(&input, offset + k).unwrap();
            last = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        }
        last
    })
}

/// Gemma 3 against candle-transformers' HF Gemma 3 (candle's quantized
/// Gemma 3 gates its FFN with SiLU, not Gemma's GELU, so it is no
/// reference): per-head q/k norms,
/// post norms, GELU, √hidden embedding scale, and the local layers' own
/// RoPE base. The window (512) is longer than the test. Controls: without
/// the q/k norms, or with the local layers rotated at the global base (a
/// file whose `rope.freq_base_swa` says 1M), the match must fail.
#[test]
fn gemma3_matches_candle_transformers() {
    use gguf_file::Value as V;
    let shape = gemma3_shape();
    let tok = common::model_path("smollm2-135m");
    let path = temp("gemma3.gguf");
    let window = [("gemma3.attention.sliding_window", V::U32(512))];
    write_model_with(&path, &shape, &tok, &window);
    let model = Model::load(&path).unwrap_or_else(|e| panic!("treespec loads gemma3: {e}"));
    let c = model.config();
    assert_eq!(c.arch.name(), "gemma3");
    assert!(c.qk_norm && c.post_norms && c.ffn_gelu);
    assert_eq!(c.rope_theta_local, Some(10_000.0));
    assert_eq!(
        (0..6).map(|l| c.is_local(l)).collect::<Vec<_>>(),
        [true, true, true, true, true, false]
    );
    // The bound as for Gemma 2 (√hidden inflates the logits, not the
    // rounding): 1% of the largest logit.
    let frac = 0.01;
    let diffs = compare_within(
        &model,
        gemma3_reference(&path, &shape, 512),
        "gemma3",
        &TOKENS,
        frac,
    );
    for (k, (diff, bound)) in diffs.iter().enumerate() {
        assert!(
            diff <= bound,
            "gemma3 step {k}: logits differ by {diff} (bound {bound})"
        );
    }
    let mut no_qk = Model::load(&path).unwrap();
    for l in &mut no_qk.decoder.layers {
        l.qk_norm = None;
    }
    let worst = worst_ratio(&compare_within(
        &no_qk,
        gemma3_reference(&path, &shape, 512),
        "gemma3 without q/k norms",
        &TOKENS,
        frac,
    ));
    assert!(
        worst > 1.0,
        "leaving out the q/k norms went unnoticed ({worst})"
    );
    let global = temp("gemma3-global-base.gguf");
    write_model_with(
        &global,
        &shape,
        &tok,
        &[
            window[0].clone(),
            ("gemma3.rope.freq_base_swa", V::F32(1e6)),
        ],
    );
    let one_base = Model::load(&global).unwrap();
    let worst = worst_ratio(&compare_within(
        &one_base,
        gemma3_reference(&path, &shape, 512),
        "gemma3 with one RoPE base",
        &TOKENS,
        frac,
    ));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&global);
    assert!(worst > 1.0, "the local RoPE base went unnoticed ({worst})");
}

/// Gemma 3's sliding window, against candle's rotating cache of W keys
/// (the reference runs one token at a time): 12 tokens through a window
/// of 7, so every local layer's last rows see only part of the past
/// (HF's and llama.cpp's i - j < W). Without the window
/// the match fails; and the window holds across the cache: decoding the
/// 12 tokens one at a time gives the prefill's logits bit for bit.
#[test]
fn gemma3_sliding_window_matches_candle_transformers() {
    use gguf_file::Value as V;
    let shape = gemma3_shape();
    let tok = common::model_path("smollm2-135m");
    let path = temp("gemma3-window.gguf");
    write_model_with(
        &path,
        &shape,
        &tok,
        &[("gemma3.attention.sliding_window", V::U32(7))],
    );
    let model = Model::load(&path).unwrap();
    assert_eq!(model.config().window_of(0), Some(7));
    assert_eq!(model.config().window_of(5), None, "the global layer");
    let prefill = |m: &Model| -> Vec<f32> {
        let mut cache = m.decoder.new_cache(64);
        let pos: Vec<usize> = (0..TOKENS.len()).collect();
        let par: Vec<Option<usize>> = (0..TOKENS.len()).map(|i| i.checked_sub(1)).collect();
        m.decoder
            .forward(&mut cache, &TOKENS, &pos, &par, LogitRows::Last)
            .unwrap()
            .row(0)
            .to_vec()
    };
    let mut reference = gemma3_reference(&path, &shape, 7);
    let want = reference(&TOKENS, 0);
    let diff = |got: &[f32]| -> f32 {
        got.iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    };
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let bound = 0.01 * scale;
    let got = prefill(&model);
    eprintln!(
        "gemma3 window: max |logit| {scale:.3}, max |Δ| {:.4}",
        diff(&got)
    );
    assert!(diff(&got) <= bound, "{} > {bound}", diff(&got));
    let stepwise = model
        .decoder
        .teacher_forced(&TOKENS, TOKENS.len() - 1, 1)
        .unwrap();
    assert!(
        stepwise[0]
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "one token at a time differs from the prefill"
    );
    let mut unwindowed = model;
    unwindowed.decoder.config.sliding_window = None;
    let off = diff(&prefill(&unwindowed));
    let _ = std::fs::remove_file(&path);
    assert!(
        off > bound,
        "ignoring the window went unnoticed ({off} <= {bound})"
    );
}
