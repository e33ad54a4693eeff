//! Bad input gets a clear error naming the file and the problem; never a panic.

mod common;

use std::io::Write;
use std::path::PathBuf;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use treespec::engine::{generate, GenerateOptions, Session};
use treespec::model::Model;
use treespec::Error;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("treespec-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn load_err(path: &std::path::Path) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "error does not name the file: {msg}"
            );
            msg
        }
    }
}

#[test]
fn truncated_gguf() {
    let src = std::fs::read(common::model_path("smollm2-135m")).unwrap();
    for cut in [10usize, 4096, 2_000_000, src.len() - 1000] {
        let p = tmp(&format!("truncated-{cut}.gguf"));
        std::fs::write(&p, &src[..cut]).unwrap();
        let msg = load_err(&p);
        println!("cut at {cut}: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("remaining") || msg.contains("short"),
            "{msg}"
        );
    }
}

#[test]
fn wrong_magic_and_empty_file() {
    let p = tmp("magic.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00 and then some bytes").unwrap();
    assert!(load_err(&p).contains("not a GGUF file"));
    let p = tmp("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert!(load_err(&p).contains("too short"));
    let p = tmp("does-not-exist.gguf");
    assert!(load_err(&p).contains("cannot open"));
}

fn write_gguf(path: &std::path::Path, arch: &str, with_tensor: bool) {
    write_gguf_with(path, arch, with_tensor, &[], None);
}

/// A one-layer llama-shaped GGUF with `extra` metadata and, optionally, a
/// `rope_freqs.weight` tensor (what Llama 3.x files carry).
fn write_gguf_with(
    path: &std::path::Path,
    arch: &str,
    with_tensor: bool,
    extra: &[(&str, gguf_file::Value)],
    extra_tensor: Option<&str>,
) {
    let mut md = vec![
        (
            "general.architecture",
            gguf_file::Value::String(arch.into()),
        ),
        ("llama.block_count", gguf_file::Value::U32(1)),
        ("llama.embedding_length", gguf_file::Value::U32(32)),
        ("llama.attention.head_count", gguf_file::Value::U32(4)),
        ("llama.feed_forward_length", gguf_file::Value::U32(64)),
        ("llama.context_length", gguf_file::Value::U32(128)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
    ];
    md.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t = QTensor::quantize(
        &Tensor::zeros((16, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut tensors: Vec<(&str, &QTensor)> = if with_tensor {
        vec![("token_embd.weight", &t)]
    } else {
        vec![]
    };
    if let Some(name) = extra_tensor {
        tensors.push((name, &t));
    }
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &tensors).unwrap();
    f.flush().unwrap();
}

#[test]
fn unknown_architecture() {
    let p = tmp("mamba.gguf");
    write_gguf(&p, "mamba", true);
    let msg = load_err(&p);
    assert!(msg.contains("unsupported architecture `mamba`"), "{msg}");
    // The list of what does run is complete (it once forgot gemma2).
    assert!(msg.contains("phi3, gemma2"), "{msg}");
}

fn config_err(p: &std::path::Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    match treespec::model::ModelConfig::from_gguf(&ct, p) {
        Ok(c) => panic!("{} accepted: {c:?}", p.display()),
        Err(e) => e.to_string(),
    }
}

/// Metadata that changes the maths and is not implemented is refused with
/// the key named (before: a Llama 3.x file's RoPE scaling was ignored and
/// every logit was subtly wrong); neutral values still load.
#[test]
fn maths_changing_metadata_is_refused_by_name() {
    use gguf_file::Value as V;
    type Case<'a> = (&'a str, Vec<(&'a str, V)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "llama.rope.scaling.type",
            vec![
                ("llama.rope.scaling.type", V::String("yarn".into())),
                ("llama.rope.scaling.factor", V::F32(4.0)),
            ],
            None,
        ),
        (
            "llama.rope.scaling.factor",
            vec![
                ("llama.rope.scaling.type", V::String("linear".into())),
                ("llama.rope.scaling.factor", V::F32(-2.0)),
            ],
            None,
        ),
        (
            "llama.rope.scaling.attn_factor",
            vec![("llama.rope.scaling.attn_factor", V::F32(1.5))],
            None,
        ),
        // Llama 3's factors are implemented (tests/arch_reference.rs); a
        // tensor of the wrong shape (16 x 32 here, not head_dim / 2) is not
        // read as them.
        ("rope_freqs.weight", vec![], Some("rope_freqs.weight")),
        (
            "llama.attention.value_length",
            vec![("llama.attention.value_length", V::U32(16))],
            None,
        ),
        (
            // A head size of its own is implemented, a rotary part of a
            // head is not.
            "llama.rope.dimension_count",
            vec![
                ("llama.attention.key_length", V::U32(16)),
                ("llama.rope.dimension_count", V::U32(8)),
            ],
            None,
        ),
        (
            "llama.rope.dimension_count",
            vec![("llama.rope.dimension_count", V::U32(4))],
            None,
        ),
        // Phi-3 128k's LongRoPE.
        (
            "rope_factors_long.weight",
            vec![],
            Some("rope_factors_long.weight"),
        ),
    ];
    for (i, (key, extra, tensor)) in cases.into_iter().enumerate() {
        let p = tmp(&format!("maths-{i}.gguf"));
        write_gguf_with(&p, "llama", true, &extra, tensor);
        let msg = config_err(&p);
        assert!(
            msg.contains(&format!("`{key}`")) && msg.contains("unsupported GGUF metadata"),
            "{key}: {msg}"
        );
    }
    // Neutral values are accepted.
    let p = tmp("maths-neutral.gguf");
    let neutral = vec![
        ("llama.rope.scaling.type", V::String("none".into())),
        ("llama.rope.dimension_count", V::U32(8)),
        ("llama.attention.key_length", V::U32(8)),
    ];
    write_gguf_with(&p, "llama", true, &neutral, None);
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let c = treespec::model::ModelConfig::from_gguf(&ct, &p).unwrap();
    assert_eq!(c.rope_freq_scale, 1.0);
    // Linear scaling is implemented: factor 2 halves every frequency.
    let p = tmp("maths-linear.gguf");
    let linear = vec![
        ("llama.rope.scaling.type", V::String("linear".into())),
        ("llama.rope.scaling.factor", V::F32(2.0)),
    ];
    write_gguf_with(&p, "llama", true, &linear, None);
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let c = treespec::model::ModelConfig::from_gguf(&ct, &p).unwrap();
    assert_eq!(c.rope_freq_scale, 0.5);
    // A sliding window shorter than the context is honoured on every layer
    // of a llama file (the context stays the trained one).
    let p = tmp("maths-window.gguf");
    write_gguf_with(
        &p,
        "llama",
        true,
        &[("llama.attention.sliding_window", V::U32(100))],
        None,
    );
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let c = treespec::model::ModelConfig::from_gguf(&ct, &p).unwrap();
    assert_eq!(c.context_length, 128, "the window does not cap the context");
    assert_eq!(c.window_of(0), Some(100));
    // Soft caps are implemented (Gemma 2, tests/arch_reference.rs); a
    // negative one is refused by name.
    let p = tmp("maths-softcap.gguf");
    let caps = [
        ("llama.attn_logit_softcapping", V::F32(50.0)),
        ("llama.final_logit_softcapping", V::F32(30.0)),
    ];
    write_gguf_with(&p, "llama", true, &caps, None);
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let c = treespec::model::ModelConfig::from_gguf(&ct, &p).unwrap();
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
    let p = tmp("maths-softcap-negative.gguf");
    write_gguf_with(
        &p,
        "llama",
        true,
        &[("llama.final_logit_softcapping", V::F32(-1.0))],
        None,
    );
    let msg = config_err(&p);
    assert!(
        msg.contains("`llama.final_logit_softcapping`") && msg.contains("positive"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_and_missing_tokenizer() {
    let p = tmp("notensor.gguf");
    write_gguf(&p, "llama", false);
    let msg = load_err(&p);
    // The tokenizer metadata is read first; either way the message names what is missing.
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn empty_and_overlong_prompts() {
    let model = Model::load(&common::model_path("smollm2-135m")).unwrap();
    let mut session = Session::new(&model, 64);
    let opts = GenerateOptions::default();
    let e = generate(&model, &mut session, None, &[], &opts, &mut |_| true).unwrap_err();
    assert!(matches!(e, Error::EmptyPrompt), "{e}");
    let long: Vec<u32> = (0..100).map(|i| 100 + i).collect();
    let e = generate(&model, &mut session, None, &long, &opts, &mut |_| true).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ContextLength {
                prompt: 100,
                context: 64,
                ..
            }
        ),
        "{e}"
    );
    println!("{e}");
    let bad = [1u32, 2, 10_000_000];
    let e = generate(&model, &mut session, None, &bad, &opts, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    // Generation near the end of the context stops cleanly instead of failing.
    let prompt: Vec<u32> = (0..60).map(|i| 100 + i).collect();
    let out = generate(
        &model,
        &mut session,
        None,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 50,
            ignore_eos: true,
            ..Default::default()
        },
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(out.stop, treespec::engine::StopReason::ContextFull);
    // 59 prompt entries + 5 steps fill the 64 slots; the last token needs no slot.
    assert_eq!(out.tokens.len(), 5);
}

#[test]
fn cli_reports_errors_without_panicking() {
    let bin = env!("CARGO_BIN_EXE_treespec");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        (out.status.success(), err)
    };
    let (ok, err) = run(&["generate", ""]);
    assert!(!ok && err.contains("empty prompt"), "{err}");
    let (ok, err) = run(&["generate", "-m", "no-such-model", "hi"]);
    assert!(!ok && err.contains("no-such-model"), "{err}");
    let (ok, err) = run(&["generate", "--temperature=-1", "hi"]);
    assert!(!ok && err.contains("temperature"), "{err}");
    let (ok, err) = run(&["generate", "--spec", "magic", "hi"]);
    assert!(!ok && err.contains("unknown speculative method"), "{err}");
    let (ok, err) = run(&["generate", "--tree", "tr-9999", "hi"]);
    assert!(!ok, "{err}");
    let (ok, err) = run(&[
        "generate",
        "-c",
        "8",
        "a long prompt that does not fit into eight tokens of context at all",
    ]);
    assert!(!ok && err.contains("context"), "{err}");
}

#[test]
fn cli_generate_json_has_every_field() {
    let bin = env!("CARGO_BIN_EXE_treespec");
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--json",
            "-n",
            "12",
            "--chat",
            "Name three colours.",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for k in ["text", "token_ids"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for k in [
        "prompt_tokens",
        "generated_tokens",
        "steps",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(v["stats"].get(k).is_some(), "missing stats.{k}");
    }
    for k in [
        "method",
        "steps",
        "drafted_tokens",
        "accepted_tokens",
        "mean_accepted_tokens",
        "accepted_per_depth",
        "draft_ms",
        "verify_ms",
    ] {
        assert!(v["spec"].get(k).is_some(), "missing spec.{k}");
    }
    assert!(!v["text"].as_str().unwrap().is_empty());
}
