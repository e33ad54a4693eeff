//! Tokenizer from a Hugging Face directory: tokenizer.json, plus
//! tokenizer_config.json (chat template, bos/eos, add_bos_token) and
//! generation_config.json (extra end ids) when present.

use std::path::Path;

use serde_json::Value as Json;

use super::vocab::{
    byte_level_char_to_byte, byte_level_decode, metaspace_decode, TokenKind, Vocab,
};
use super::{Parts, RawEncoder};
use crate::error::{Error, Result};

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A string, or a list of `{name, template}` where "default" wins.
fn chat_template(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |n: &Json| n.get("template")?.as_str().map(str::to_string);
            list.iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(named)
                .or_else(|| list.first().and_then(named))
        }
        _ => None,
    }
}

pub(super) fn load(dir: &Path) -> Result<Parts> {
    let tj = dir.join("tokenizer.json");
    if !tj.exists() {
        return Err(Error::model(dir, "no tokenizer.json in this directory"));
    }
    let mut tok = tokenizers::Tokenizer::from_file(&tj)
        .map_err(|e| Error::model(&tj, format!("cannot load tokenizer: {e}")))?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

    let n = tok.get_vocab_size(true);
    let added = tok.get_added_tokens_decoder();
    let mut texts = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match (tok.id_to_token(id), added.get(&id)) {
            (_, Some(a)) => {
                texts.push(a.content.clone());
                kinds.push(if a.special {
                    TokenKind::Control
                } else {
                    TokenKind::UserDefined
                });
            }
            (Some(t), None) => {
                texts.push(t);
                kinds.push(TokenKind::Normal);
            }
            (None, None) => {
                texts.push(String::new());
                kinds.push(TokenKind::Unused);
            }
        }
    }
    let byte_level = tok
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .is_some_and(|s| s.contains("ByteLevel"));
    let byte_map = byte_level_char_to_byte();
    let vocab = Vocab::new(texts, kinds, |t| {
        if byte_level {
            byte_level_decode(&byte_map, t)
        } else {
            metaspace_decode(t)
        }
    });

    let bos = token_string(config.get("bos_token")).and_then(|t| vocab.id(&t));
    let eos = token_string(config.get("eos_token")).and_then(|t| vocab.id(&t));
    let add_bos = match config.get("add_bos_token").and_then(Json::as_bool) {
        Some(b) => b,
        // Not stated: see whether the post-processor prepends something.
        None => {
            let with = tok.encode_fast("a", true).ok();
            let without = tok.encode_fast("a", false).ok();
            match (with, without, bos) {
                (Some(w), Some(wo), Some(b)) => {
                    w.get_ids().first() == Some(&b) && wo.get_ids().first() != Some(&b)
                }
                _ => false,
            }
        }
    };
    let other_stops = match gen_config.get("eos_token_id") {
        Some(Json::Number(x)) => vec![x.as_u64().and_then(|x| u32::try_from(x).ok())],
        Some(Json::Array(list)) => list
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    };
    let template = match chat_template(config.get("chat_template")) {
        Some(t) => Some(t),
        None => {
            let file = dir.join("chat_template.jinja");
            if file.exists() {
                Some(std::fs::read_to_string(file)?)
            } else {
                None
            }
        }
    };

    // Special tokens are cut out by `Vocab::partition`; the inner tokenizer
    // must treat their spelling as plain text.
    tok.set_encode_special_tokens(true);
    Ok(Parts {
        encoder: RawEncoder::Bpe(Box::new(tok)),
        vocab,
        bos,
        eos,
        add_bos,
        other_stops,
        template,
    })
}
