//! Prompt text → token ids, as llama.cpp does it: the chat template for
//! messages, special tokens recognised when asked, BOS when the model wants
//! one. The CLI and the server share this so they feed the model the same ids.

use crate::error::Result;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// Raw text (a completion prompt). `parse_special` turns text such as
/// `<|im_start|>` into its special token.
pub fn text_prompt_ids(tok: &Tokenizer, text: &str, parse_special: bool) -> Result<Vec<u32>> {
    let ids = tok.encode(text, parse_special)?;
    Ok(with_bos(tok, ids))
}

/// A conversation rendered with the model's chat template, ready for the
/// assistant's reply. The rendered text's special tokens are always parsed:
/// the template itself writes them.
pub fn chat_prompt_ids(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let text = tok.apply_chat_template(messages, true)?;
    let ids = tok.encode(&text, true)?;
    Ok(with_bos(tok, ids))
}

fn with_bos(tok: &Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    if let Some(bos) = tok.bos_to_add() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}
