//! Tokenizer and chat template, built from GGUF metadata (or tokenizer.json).
//! OWNED BY THE TOKENIZER WORK: this stub only fixes the API.

use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {}

impl Tokenizer {
    pub fn from_gguf(_ct: &gguf_file::Content, _path: &Path) -> Result<Self> {
        Ok(Tokenizer {})
    }
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        Err(Error::model(dir, "tokenizer not implemented"))
    }
    /// Token ids of `text`; with `parse_special`, text spelling a special token
    /// (`<|im_start|>`) becomes that token, as llama.cpp does. No BOS added.
    pub fn encode(&self, _text: &str, _parse_special: bool) -> Result<Vec<u32>> {
        unimplemented!()
    }
    pub fn decode(&self, _ids: &[u32]) -> Result<String> {
        unimplemented!()
    }
    pub fn vocab_size(&self) -> usize {
        0
    }
    /// BOS id when the model wants one prepended to a raw prompt.
    pub fn bos_to_add(&self) -> Option<u32> {
        None
    }
    /// Tokens that end generation (eos, end-of-turn).
    pub fn stop_tokens(&self) -> &[u32] {
        &[]
    }
    pub fn has_chat_template(&self) -> bool {
        false
    }
    pub fn apply_chat_template(
        &self,
        _messages: &[ChatMessage],
        _add_generation_prompt: bool,
    ) -> Result<String> {
        unimplemented!()
    }
}

/// Incremental, UTF-8-safe detokenizer for streaming.
pub struct StreamDecoder<'a> {
    _tok: &'a Tokenizer,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder { _tok: tok }
    }
    /// Text that became complete with this token (maybe empty).
    pub fn push(&mut self, _id: u32) -> Result<String> {
        Ok(String::new())
    }
    /// Whatever is left at the end.
    pub fn finish(&mut self) -> Result<String> {
        Ok(String::new())
    }
}
