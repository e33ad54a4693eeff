//! Streaming detokenization: text comes out as soon as its UTF-8 is complete.

use super::Tokenizer;
use crate::error::Result;

/// Incremental, UTF-8-safe detokenizer for streaming.
///
/// A character whose bytes are spread over several tokens is emitted with the
/// token that completes it. Invalid bytes become U+FFFD exactly as
/// [`Tokenizer::decode`] does, so the concatenated output of every `push` and
/// the final `finish` equals `decode` of all the ids.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    /// Bytes of an incomplete character held back until more arrive.
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// Text that became complete with this token (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.pending.extend_from_slice(self.tok.piece(id)?);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        let held = loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break 0;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Definitely invalid: one replacement, as `decode` does.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // A character cut short by the end: wait for more.
                        None => break after.len(),
                    }
                }
            }
        };
        let keep_from = self.pending.len() - held;
        self.pending.drain(..keep_from);
        Ok(out)
    }

    /// Whatever is left at the end.
    pub fn finish(&mut self) -> Result<String> {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok(out)
    }
}
