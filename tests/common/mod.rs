//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The treespec home: `$TREESPEC_HOME`, else `~/.cache/treespec`.
pub fn treespec_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TREESPEC_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("treespec")
}

/// True under CI (`CI=true`, as CI runs `.ci/run`): a test that would skip
/// for want of a file must fail there instead.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Path of a catalogued model's GGUF; panics with the command that fetches it.
pub fn model_path(name: &str) -> PathBuf {
    let path = treespec_home().join("models").join(format!("{name}.gguf"));
    if !path.exists() {
        panic!(
            "model file {} is missing: run `treespec pull {name}`",
            path.display()
        );
    }
    path
}

/// The shared data folder (golden outputs, datasets): `../shared` from the
/// crate root as CI lays it out, or `$TREESPEC_SHARED`.
pub fn shared_dir() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if beside.exists() {
        return beside;
    }
    match std::env::var_os("TREESPEC_SHARED") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "{} is missing; set TREESPEC_SHARED to the shared data folder",
            beside.display()
        ),
    }
}

/// The golden llama.cpp records of one model.
pub fn golden(name: &str) -> Vec<serde_json::Value> {
    let path = shared_dir().join("golden").join(format!("{name}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("golden line is JSON"))
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Writes SmolLM2's tokenizer as a Hugging Face directory (tokenizer.json in
/// the shape its model card ships, tokenizer_config.json with the template)
/// from the GGUF metadata, so `from_hf_dir` can be held to the same goldens.
pub fn write_smollm2_hf_tokenizer(dir: &std::path::Path) {
    let path = model_path("smollm2-135m");
    let mut file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let strings = |key: &str| -> Vec<String> {
        ct.metadata[key]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let types: Vec<u32> = ct.metadata["tokenizer.ggml.token_type"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap() as u32)
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3)
        .map(|(i, (t, _))| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer_json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": strings("tokenizer.ggml.merges")}
    });
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": ct.metadata["tokenizer.chat_template"].to_string().unwrap(),
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// `text` as one user turn in the model's chat template, tokenized.
/// A base model without a chat template (Gemma 3 270M) gets the text
/// itself after its BOS, as `treespec generate` gives it.
pub fn chat_prompt(model: &treespec::model::Model, text: &str) -> Vec<u32> {
    let msgs = [treespec::tokenizer::ChatMessage {
        role: "user".into(),
        content: text.into(),
    }];
    match model.tokenizer.apply_chat_template(&msgs, true) {
        Ok(t) => model.tokenizer.encode(&t, true).unwrap(),
        Err(_) => {
            let mut ids: Vec<u32> = model.tokenizer.bos_to_add().into_iter().collect();
            ids.extend(model.tokenizer.encode(text, false).unwrap());
            ids
        }
    }
}

/// The SentencePiece BPE vocabulary of tests/fixtures/sentencepiece_bpe.json
/// (written by scripts/fixtures/sentencepiece_bpe.py with Google's
/// sentencepiece) as GGUF `tokenizer.ggml.*` metadata, the way llama.cpp's
/// converter writes a Llama 2 / Mistral tokenizer; with `chat_template`
/// when given. Returns the fixture.
#[allow(dead_code)]
pub fn write_sentencepiece_gguf(
    path: &std::path::Path,
    chat_template: Option<&str>,
) -> serde_json::Value {
    use candle_core::quantized::gguf_file::{self, Value as V};
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sentencepiece_bpe.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let arr = |k: &str| fx[k].as_array().unwrap().clone();
    let id = |k: &str| V::U32(fx[k].as_u64().unwrap() as u32);
    let mut md: Vec<(&str, V)> = vec![
        ("tokenizer.ggml.model", V::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(
                arr("pieces")
                    .iter()
                    .map(|p| V::String(p.as_str().unwrap().into()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores",
            V::Array(
                arr("scores")
                    .iter()
                    .map(|s| V::F32(s.as_f64().unwrap() as f32))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(
                arr("types")
                    .iter()
                    .map(|t| V::I32(t.as_i64().unwrap() as i32))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", id("bos_id")),
        ("tokenizer.ggml.eos_token_id", id("eos_id")),
        ("tokenizer.ggml.unknown_token_id", id("unk_id")),
    ];
    if let Some(t) = chat_template {
        md.push(("tokenizer.chat_template", V::String(t.into())));
    }
    let refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
    fx
}

/// A c(N) curve with the given ms at each candidate budget's N (no growth
/// with context), for tests of the budget controller's decisions that must
/// not depend on the host's speed.
pub fn synthetic_cost(
    ms: [f64; treespec::engine::budget::CANDIDATE_BUDGETS.len()],
) -> treespec::engine::budget::CostModel {
    use treespec::engine::budget::{CostModel, CostPoint, CANDIDATE_BUDGETS};
    CostModel {
        curve: CANDIDATE_BUDGETS
            .iter()
            .zip(ms)
            .map(|(&b, ms)| CostPoint { n: b + 1, ms })
            .collect(),
        ms_per_kctx: vec![0.0; CANDIDATE_BUDGETS.len()],
    }
}
