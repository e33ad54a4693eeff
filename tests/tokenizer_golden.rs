//! The tokenizer against llama.cpp's golden tokenizations of the real models,
//! plus decoding, streaming and chat-template properties.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use serde_json::Value;
use treespec::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};

const MODELS: [&str; 3] = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"];

fn load(name: &str) -> Tokenizer {
    let path = common::model_path(name);
    let mut file = BufReader::new(File::open(&path).expect("open model"));
    let ct = gguf_file::Content::read(&mut file).expect("read GGUF header");
    Tokenizer::from_gguf(&ct, &path).expect("tokenizer from GGUF")
}

fn golden(name: &str) -> Vec<Value> {
    let path = common::shared_dir().join(format!("golden/{name}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("golden line is JSON"))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Every golden tokenization must match exactly; returns how many did.
fn check_golden(name: &str) -> usize {
    let tok = load(name);
    let mut matched = 0;
    let mut failures = Vec::new();
    for line in golden(name) {
        let id = line["id"].as_str().unwrap_or("?").to_string();
        let cases: Vec<(&str, &str, bool)> = match line["kind"].as_str() {
            Some("tokenize") => vec![("text", "ids", true), ("text", "ids_no_special", false)],
            Some("generate") => vec![("prompt", "prompt_ids", true)],
            _ => continue,
        };
        for (text_key, ids_key, parse_special) in cases {
            let text = line[text_key].as_str().expect("text");
            let want = ids(&line[ids_key]);
            let got = tok.encode(text, parse_special).expect("encode");
            if got == want {
                matched += 1;
            } else {
                failures.push(format!(
                    "{id} {ids_key} {text:?}\n  want {want:?}\n  got  {got:?}"
                ));
            }
            // Decoding gives the text back whichever way it was split.
            assert_eq!(tok.decode(&got).unwrap(), text, "{name} {id} round trip");
        }
    }
    eprintln!("{name}: {matched} golden tokenizations matched");
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    matched
}

#[test]
fn golden_smollm2_135m() {
    assert!(check_golden("smollm2-135m") > 0);
}

#[test]
fn golden_qwen25_coder_05b() {
    assert!(check_golden("qwen2.5-coder-0.5b") > 0);
}

#[test]
fn golden_qwen25_coder_15b() {
    assert!(check_golden("qwen2.5-coder-1.5b") > 0);
}

fn stream_all(tok: &Tokenizer, ids: &[u32]) -> (String, Vec<String>) {
    let mut dec = StreamDecoder::new(tok);
    let mut parts: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    parts.push(dec.finish().unwrap());
    (parts.concat(), parts)
}

#[test]
fn stream_decoder_emits_whole_characters_and_matches_decode() {
    let texts = [
        "emoji: 🦀🚀😀👍🏽 and ZWJ 👨‍👩‍👧",
        "中文分词测试：巴黎是法国的首都。",
        "日本語のテキストとカタカナ、ひらがな。한국어 문장입니다.",
        "mixed ascii, café, Ёжик, مرحبا 🦀",
    ];
    for name in MODELS {
        let tok = load(name);
        for text in texts {
            let ids = tok.encode(text, true).unwrap();
            let (all, parts) = stream_all(&tok, &ids);
            assert_eq!(all, text, "{name}: stream of {text:?}");
            assert_eq!(all, tok.decode(&ids).unwrap());
            // Valid input never needs a replacement character on the way.
            assert!(parts.iter().all(|p| !p.contains('\u{FFFD}')), "{parts:?}");
        }
        // Arbitrary id sequences (lone byte tokens, cut characters) still
        // stream to exactly what `decode` gives.
        let n = tok.vocab_size() as u32;
        let arbitrary: Vec<u32> = (0..600u32).map(|i| (i * 7919 + 13) % n).collect();
        for window in arbitrary.chunks(37) {
            let (all, _) = stream_all(&tok, window);
            assert_eq!(all, tok.decode(window).unwrap(), "{name}");
        }
    }
}

#[test]
fn empty_and_odd_text_does_not_panic() {
    let odd = [
        String::new(),
        String::from_utf8_lossy(&[0xed, 0xa0, 0x80, b'a', 0xff, 0xc3]).into_owned(),
        "\u{FFFD}\u{FFFF}\u{10FFFF}\0\u{1}\u{7f}".to_string(),
        "<|im_start|><|im_start|<|im_end|>>".to_string(),
        " \t\r\n\u{a0}\u{2028}\u{3000}".repeat(50),
        "9".repeat(5000),
    ];
    for name in MODELS {
        let tok = load(name);
        for text in &odd {
            for special in [true, false] {
                let ids = tok.encode(text, special).unwrap();
                assert_eq!(&tok.decode(&ids).unwrap(), text, "{name}");
            }
        }
        assert!(tok.encode("", true).unwrap().is_empty());
        assert!(tok.decode(&[u32::MAX]).is_err());
        assert!(StreamDecoder::new(&tok)
            .push(tok.vocab_size() as u32)
            .is_err());
    }
}

#[test]
fn special_ids_and_stop_tokens_follow_llama_cpp() {
    let smol = load("smollm2-135m");
    assert_eq!(smol.bos_to_add(), None);
    // <|endoftext|>, <|im_end|>, and <reponame>: llama.cpp takes that name as
    // the fill-in-the-middle repo token, which ends generation.
    assert_eq!(smol.stop_tokens(), &[0, 2, 4]);
    for name in ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] {
        let qwen = load(name);
        assert_eq!(qwen.bos_to_add(), None);
        let im_end = qwen.token_id("<|im_end|>").unwrap();
        let eot = qwen.token_id("<|endoftext|>").unwrap();
        let im_start = qwen.token_id("<|im_start|>").unwrap();
        assert!(qwen.is_stop(im_end) && qwen.is_stop(eot), "{name}");
        assert!(!qwen.is_stop(im_start), "{name}");
        assert_eq!(qwen.vocab_size(), 151936);
    }
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
    }
}

#[test]
fn chat_template_reproduces_golden_chat_prompts() {
    for name in MODELS {
        let tok = load(name);
        assert!(tok.has_chat_template());
        let out = tok.apply_chat_template(&[user("Hi there")], true).unwrap();
        assert!(
            out.contains("<|im_start|>user\nHi there<|im_end|>\n"),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
        let no_gen = tok.apply_chat_template(&[user("Hi there")], false).unwrap();
        assert!(no_gen.ends_with("<|im_end|>\n"), "{no_gen}");

        // The golden chat prompts are the template applied to one user
        // message with the default system prompt.
        let mut checked = 0;
        for line in golden(name) {
            let Some(prompt) = line["prompt"].as_str() else {
                continue;
            };
            let Some((_, rest)) = prompt.split_once("<|im_start|>user\n") else {
                continue;
            };
            let content = rest
                .strip_suffix("<|im_end|>\n<|im_start|>assistant\n")
                .expect("chat prompt ends with the generation prompt");
            let rendered = tok.apply_chat_template(&[user(content)], true).unwrap();
            assert_eq!(rendered, prompt, "{name} {}", line["id"]);
            checked += 1;
        }
        assert!(checked > 0, "{name}: no chat prompts in the golden file");
    }
}

#[test]
fn hf_dir_tokenizer_matches_goldens() {
    let dir = std::env::temp_dir().join(format!("treespec-hf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::write_smollm2_hf_tokenizer(&dir);
    let tok = Tokenizer::from_hf_dir(&dir).expect("tokenizer from HF dir");
    let gguf = load("smollm2-135m");
    assert_eq!(tok.vocab_size(), gguf.vocab_size());
    assert_eq!(tok.bos_to_add(), None);
    assert!(tok.is_stop(2) && tok.is_stop(0));
    let mut matched = 0;
    for line in golden("smollm2-135m") {
        if line["kind"] != "tokenize" {
            continue;
        }
        let text = line["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&line["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&line["ids_no_special"]),
            "{text:?}"
        );
        assert_eq!(tok.decode(&tok.encode(text, true).unwrap()).unwrap(), text);
        matched += 2;
    }
    eprintln!("smollm2-135m via tokenizer.json: {matched} golden tokenizations matched");
    let chat = tok.apply_chat_template(&[user("Hi")], true).unwrap();
    assert_eq!(chat, gguf.apply_chat_template(&[user("Hi")], true).unwrap());
    assert!(Tokenizer::from_hf_dir(&dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
