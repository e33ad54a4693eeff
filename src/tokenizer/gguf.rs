//! Tokenizers from GGUF `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`)
//! and SentencePiece BPE (`llama`).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::BPE;

use super::spm::SentencePiece;
use super::vocab::{
    byte_level_char_to_byte, byte_level_decode, metaspace_decode, TokenKind, Vocab,
};
use super::{pretok, Parts, RawEncoder};
use crate::error::{Error, Result};

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

struct Meta<'a> {
    ct: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::model(self.path, msg)
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.ct.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(format!("metadata `{key}` is not a string"))),
        }
    }

    fn id(&self, key: &str) -> Result<Option<u32>> {
        match self.ct.metadata.get(key) {
            None => Ok(None),
            // A negative id is how some converters write "none".
            Some(v) => match as_i64(v) {
                Some(x) if x < 0 => Ok(None),
                Some(x) => u32::try_from(x)
                    .map(Some)
                    .map_err(|_| self.err(format!("metadata `{key}` = {x} is not a token id"))),
                None => Err(self.err(format!("metadata `{key}` is not an integer"))),
            },
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.ct.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_i64(v)
                .map(|x| Some(x != 0))
                .ok_or_else(|| self.err(format!("metadata `{key}` is not a boolean"))),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.ct.metadata.get(key) {
            None => Err(self.err(format!("metadata `{key}` is missing"))),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.err(format!("metadata `{key}` is not an array"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.err(format!("metadata `{key}` holds a non-string"))),
            })
            .collect()
    }
}

pub(super) fn load(ct: &Content, path: &Path) -> Result<Parts> {
    let m = Meta { ct, path };
    let sentencepiece = match m.str("tokenizer.ggml.model")? {
        Some("gpt2") => false,
        Some("llama") => true,
        Some(other) => {
            return Err(m.err(format!(
                "tokenizer model `{other}` is not supported (byte-level BPE `gpt2` \
                 and SentencePiece `llama` are)"
            )))
        }
        None => return Err(m.err("no tokenizer in the metadata (tokenizer.ggml.model)")),
    };
    let texts = m.strings("tokenizer.ggml.tokens")?;
    let kinds: Vec<TokenKind> = match ct.metadata.get("tokenizer.ggml.token_type") {
        None => vec![TokenKind::Normal; texts.len()],
        Some(_) => m
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| as_i64(v).map(TokenKind::from_gguf))
            .collect::<Option<_>>()
            .ok_or_else(|| m.err("tokenizer.ggml.token_type holds a non-integer"))?,
    };
    if kinds.len() != texts.len() {
        return Err(m.err(format!(
            "{} token types for {} tokens",
            kinds.len(),
            texts.len()
        )));
    }
    let (encoder, vocab, default_add_bos) = if sentencepiece {
        sentencepiece_parts(&m, texts, kinds)?
    } else {
        byte_level_parts(&m, texts, kinds)?
    };
    Ok(Parts {
        encoder,
        vocab,
        bos: m.id("tokenizer.ggml.bos_token_id")?,
        eos: m.id("tokenizer.ggml.eos_token_id")?,
        add_bos: m
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos),
        other_stops: vec![
            m.id("tokenizer.ggml.eot_token_id")?,
            m.id("tokenizer.ggml.eom_token_id")?,
        ],
        template: m.str("tokenizer.chat_template")?.map(str::to_string),
    })
}

/// Byte-level BPE: merges and pre-tokenizer regexes from the metadata.
/// Returns whether BOS is added when the metadata does not say.
fn byte_level_parts(
    m: &Meta,
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
) -> Result<(RawEncoder, Vocab, bool)> {
    let pre = m
        .str("tokenizer.ggml.pre")?
        .unwrap_or("default")
        .to_string();
    let merges = m
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|s| match s.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(m.err(format!("malformed merge `{s}`"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let llama3_like =
        pretok::regexes_for(&pre).is_ok_and(|r| r.iter().any(|x| x.contains("{1,3}")));
    // llama.cpp lets a whole pre-token that is already in the vocabulary skip
    // merging for Llama 3 style vocabularies (`ignore_merges`).
    let ignore_merges = m
        .bool("tokenizer.ggml.ignore_merges")?
        .unwrap_or(llama3_like);
    let mut vocab_map = tokenizers::models::bpe::Vocab::with_capacity(texts.len());
    for (id, t) in texts.iter().enumerate() {
        vocab_map.entry(t.clone()).or_insert(id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| m.err(format!("bad BPE vocabulary: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(
        pretok::pipeline(&pre).map_err(|e| m.err(e.to_string()))?,
    ));

    let byte_map = byte_level_char_to_byte();
    let vocab = Vocab::new(texts, kinds, |t| byte_level_decode(&byte_map, t));
    // llama.cpp's default for byte-level BPE: only Llama 3 style adds BOS.
    Ok((RawEncoder::Bpe(Box::new(tok)), vocab, llama3_like))
}

/// SentencePiece BPE: per-token scores decide the merges. llama.cpp's
/// defaults for this type: a dummy-prefix space and a BOS.
fn sentencepiece_parts(
    m: &Meta,
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
) -> Result<(RawEncoder, Vocab, bool)> {
    let scores = match m.ct.metadata.get("tokenizer.ggml.scores") {
        // Without scores every merge ties and the leftmost wins (llama.cpp).
        None => vec![0.0; texts.len()],
        Some(_) => m
            .array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Some(*x),
                Value::F64(x) => Some(*x as f32),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| m.err("tokenizer.ggml.scores holds a non-float"))?,
    };
    let add_space_prefix = m.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let spm = SentencePiece::new(
        &texts,
        scores,
        m.id("tokenizer.ggml.unknown_token_id")?,
        add_space_prefix,
    )
    .map_err(|e| m.err(e.to_string()))?;
    let vocab = Vocab::new(texts, kinds, metaspace_decode);
    Ok((RawEncoder::SentencePiece(spm), vocab, true))
}
