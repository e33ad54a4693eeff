//! The SentencePiece (`tokenizer.ggml.model = llama`) tokenizer against
//! Google's sentencepiece: a BPE vocabulary trained like Llama 2's and
//! Mistral's (identity normalization, dummy prefix, byte fallback) and that
//! library's encodings of ASCII, whitespace runs, accents, CJK and emoji
//! (byte fallback), all in tests/fixtures/sentencepiece_bpe.json. No model
//! file needed. Before this tokenizer existed such a GGUF was refused.

mod common;

use candle_core::quantized::gguf_file;
use treespec::tokenizer::{ChatMessage, Tokenizer};

fn load(template: Option<&str>) -> (Tokenizer, serde_json::Value) {
    let path = std::env::temp_dir().join(format!(
        "treespec-spm-{}-{}.gguf",
        std::process::id(),
        template.is_some()
    ));
    let fx = common::write_sentencepiece_gguf(&path, template);
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf(&ct, &path).unwrap();
    let _ = std::fs::remove_file(&path);
    (tok, fx)
}

#[test]
fn encodes_as_sentencepiece_does() {
    let (tok, fx) = load(None);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut byte_fallbacks = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "encoding {text:?}");
        byte_fallbacks += got
            .iter()
            .filter(|&&id| tok.token_kind(id) == Some(treespec::tokenizer::TokenKind::Byte))
            .count();
        // Piece by piece the dummy prefix reads as a leading space (as in
        // llama.cpp's token_to_piece); sentencepiece's decode drops it.
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(tok.decode(&got).unwrap(), format!(" {decoded}"));
    }
    // CJK and emoji are not in the vocabulary: their bytes must be used.
    assert!(byte_fallbacks >= 20, "{byte_fallbacks} byte tokens");
}

#[test]
fn bos_special_tokens_and_chat_template() {
    let template =
        "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}";
    let (tok, fx) = load(Some(template));
    let bos = fx["bos_id"].as_u64().unwrap() as u32;
    // llama.cpp's default for SentencePiece vocabularies: BOS is added.
    assert_eq!(tok.bos_to_add(), Some(bos));
    assert!(tok.is_stop(fx["eos_id"].as_u64().unwrap() as u32));
    // "<s>" spelled in the text is BOS only with parse_special, and the text
    // after a special token gets its own dummy prefix (llama.cpp's rule).
    let rest = tok.encode("hello", false).unwrap();
    let mut want = vec![bos];
    want.extend(&rest);
    assert_eq!(tok.encode("<s>hello", true).unwrap(), want);
    assert_ne!(tok.encode("<s>hello", false).unwrap()[0], bos);
    let text = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "def f():".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(text, "<s>[INST] def f(): [/INST]");
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(tok.decode(&ids[1..]).unwrap(), " [INST] def f(): [/INST]");
}

/// A malformed or unsupported vocabulary is a clear error naming what is
/// wrong, not a panic or a wrong tokenizer.
#[test]
fn bad_vocabularies_are_refused_by_name() {
    use gguf_file::Value as V;
    let path = std::env::temp_dir().join(format!("treespec-spm-bad-{}.gguf", std::process::id()));
    let _ = common::write_sentencepiece_gguf(&path, None);
    let mut f = std::fs::File::open(&path).unwrap();
    let good = gguf_file::Content::read(&mut f).unwrap();
    let _ = std::fs::remove_file(&path);
    let with = |key: &str, v: V| {
        let mut ct = gguf_file::Content {
            magic: good.magic,
            metadata: good.metadata.clone(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        ct.metadata.insert(key.to_string(), v);
        Tokenizer::from_gguf(&ct, &path)
            .err()
            .map(|e| e.to_string())
    };
    let err = with("tokenizer.ggml.scores", V::Array(vec![V::F32(0.0); 3])).unwrap();
    assert!(err.contains("3 token scores for 1000 tokens"), "{err}");
    let err = with(
        "tokenizer.ggml.scores",
        V::Array(vec![V::String("x".into()); 1000]),
    )
    .unwrap();
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");
    // Unigram (T5) and WordPiece (BERT) vocabularies need other algorithms.
    let err = with("tokenizer.ggml.model", V::String("t5".into())).unwrap();
    assert!(
        err.contains("tokenizer model `t5` is not supported"),
        "{err}"
    );
    assert!(with("tokenizer.ggml.add_space_prefix", V::Bool(false)).is_none());
}
