//! Tokenizer and chat template, built from GGUF metadata (or tokenizer.json).
//!
//! Encoding matches llama.cpp token for token: special tokens are cut out of
//! the text first (llama.cpp's order and rules, see [`vocab`]), then each raw
//! stretch goes through the model's pre-tokenizer regexes ([`pretok`]) and
//! byte-level BPE (the `tokenizers` crate), or through SentencePiece BPE
//! ([`spm`]) for `llama`-type vocabularies. Decoding maps every token to its
//! bytes directly, which is what makes UTF-8-safe streaming simple.

mod chat;
mod gguf;
mod hf;
mod pretok;
mod spm;
mod stream;
mod vocab;

use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{Error, Result};
use chat::ChatTemplate;
pub use stream::StreamDecoder;
pub use vocab::TokenKind;
use vocab::{Fragment, Vocab};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    encoder: RawEncoder,
    vocab: Vocab,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    stop: Vec<u32>,
    template: Option<ChatTemplate>,
}

/// What a tokenizer source (GGUF metadata, tokenizer.json) provides.
struct Parts {
    encoder: RawEncoder,
    vocab: Vocab,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Declared end ids besides eos (eot, eom, generation config).
    other_stops: Vec<Option<u32>>,
    template: Option<String>,
}

/// Encodes raw text (no special tokens in it) to ids.
enum RawEncoder {
    /// Byte-level BPE (GPT-2 style) or whatever a tokenizer.json describes.
    Bpe(Box<tokenizers::Tokenizer>),
    SentencePiece(spm::SentencePiece),
}

impl RawEncoder {
    fn encode(&self, raw: &str, out: &mut Vec<u32>) -> Result<()> {
        match self {
            RawEncoder::Bpe(t) => {
                let enc = t
                    .encode_fast(raw, false)
                    .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
                out.extend_from_slice(enc.get_ids());
                Ok(())
            }
            RawEncoder::SentencePiece(s) => s.encode(raw, out),
        }
    }
}

impl Tokenizer {
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        Ok(Self::assemble(gguf::load(ct, path)?))
    }

    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        Ok(Self::assemble(hf::load(dir)?))
    }

    fn assemble(p: Parts) -> Self {
        let valid = |id: Option<u32>| id.filter(|&i| (i as usize) < p.vocab.len());
        let bos = valid(p.bos);
        let eos = valid(p.eos);
        let mut declared = vec![eos];
        declared.extend(p.other_stops.iter().map(|&id| valid(id)));
        let stop = p.vocab.end_of_generation(&declared);
        let text_of = |id: Option<u32>| {
            id.and_then(|i| p.vocab.text(i))
                .unwrap_or_default()
                .to_string()
        };
        let template = p
            .template
            .map(|src| ChatTemplate::new(src, text_of(bos), text_of(eos)));
        Tokenizer {
            encoder: p.encoder,
            vocab: p.vocab,
            bos,
            eos,
            add_bos: p.add_bos,
            stop,
            template,
        }
    }

    /// Token ids of `text`; with `parse_special`, text spelling a special token
    /// (`<|im_start|>`) becomes that token, as llama.cpp does. No BOS added.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        for frag in self.vocab.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(raw) => self.encoder.encode(raw, &mut ids)?,
            }
        }
        Ok(ids)
    }

    /// Text of `ids`. Special tokens read as their spelling (`<|im_end|>`);
    /// bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` stands for.
    pub fn piece(&self, id: u32) -> Result<&[u8]> {
        self.vocab.piece(id).ok_or_else(|| {
            Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.vocab.len()
            ))
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// BOS id when the model wants one prepended to a raw prompt.
    pub fn bos_to_add(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation (eos, end-of-turn).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.binary_search(&id).is_ok()
    }

    /// The token's text as stored in the vocabulary (byte-level form for
    /// normal tokens).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.vocab.kind(id)
    }

    /// Id of the token spelled exactly `text` in the vocabulary.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Err(Error::ChatTemplate(
                "this model has no chat template (tokenizer.chat_template); \
                 use a raw prompt instead"
                    .into(),
            )),
        }
    }
}
