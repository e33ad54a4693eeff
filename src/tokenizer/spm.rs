//! SentencePiece BPE encoding (`tokenizer.ggml.model = llama`: Llama 1/2,
//! Mistral v0.1-v0.3, Phi-3, Gemma), token for token as llama.cpp and
//! Google's sentencepiece do it.
//!
//! Spaces become `▁` (U+2581) and, with `add_space_prefix`, one `▁` is put in
//! front of every raw stretch of text (the "dummy prefix"). The text starts as
//! one symbol per character; repeatedly, of all adjacent pairs whose
//! concatenation is a vocabulary token, the one with the highest score is
//! merged (the leftmost on equal scores). A character left over that is not a
//! token becomes its UTF-8 bytes as `<0xXX>` tokens (byte fallback).
//!
//! Written here rather than through `tokenizers`' BPE: that model needs an
//! ordered merge list, which a GGUF SentencePiece vocabulary does not carry,
//! and a list derived from scores breaks equal-score ties by rank, not by
//! position as llama.cpp does.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};

pub struct SentencePiece {
    /// Token text (with `▁` for spaces) to id; on duplicate texts the last id
    /// wins, as in llama.cpp's `token_to_id`.
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// `<0xXX>` token of every byte, for characters that are not tokens.
    byte_tokens: Vec<Option<u32>>,
    unk: Option<u32>,
    add_space_prefix: bool,
}

/// A candidate merge of the symbols starting at `left` and `right`.
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text: a pair is stale once either symbol
    /// has changed, which always changes this sum (symbols only grow).
    len: usize,
    id: u32,
}

impl Ord for Pair {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}

/// A stretch `start..start + len` of the escaped text; `len == 0` once merged
/// into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// The token this symbol is, once it came out of a merge.
    id: Option<u32>,
}

impl SentencePiece {
    pub fn new(
        texts: &[String],
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self> {
        if scores.len() != texts.len() {
            return Err(Error::Tokenizer(format!(
                "{} token scores for {} tokens",
                scores.len(),
                texts.len()
            )));
        }
        let mut ids = HashMap::with_capacity(texts.len());
        for (id, t) in texts.iter().enumerate() {
            ids.insert(t.clone(), id as u32);
        }
        let byte_tokens = (0..=255u8)
            .map(|b| {
                ids.get(&format!("<0x{b:02X}>"))
                    .or_else(|| {
                        // llama.cpp's second choice: the byte as a one-byte text.
                        b.is_ascii()
                            .then(|| ids.get(&(b as char).to_string()))
                            .flatten()
                    })
                    .copied()
            })
            .collect();
        Ok(SentencePiece {
            ids,
            scores,
            byte_tokens,
            unk,
            add_space_prefix,
        })
    }

    /// Token ids of one raw stretch of text (no special tokens in it).
    pub fn encode(&self, raw: &str, out: &mut Vec<u32>) -> Result<()> {
        if raw.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(raw.len() * 3 / 2 + 3);
        if self.add_space_prefix {
            text.push('\u{2581}');
        }
        for c in raw.chars() {
            text.push(if c == ' ' { '\u{2581}' } else { c });
        }

        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
                id: None,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }

        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let pair = |symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (symbols[left], symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            let id = *self.ids.get(merged)?;
            Some(Pair {
                score: self.scores[id as usize],
                left,
                right,
                len: merged.len(),
                id,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(pair(&symbols, i - 1, i));
        }
        while let Some(p) = queue.pop() {
            let (l, r) = (symbols[p.left], symbols[p.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != p.len {
                continue;
            }
            symbols[p.left].len = p.len;
            symbols[p.left].id = Some(p.id);
            symbols[p.left].next = r.next;
            symbols[p.right].len = 0;
            if let Some(n) = r.next {
                symbols[n].prev = Some(p.left);
            }
            if let Some(prev) = l.prev {
                queue.extend(pair(&symbols, prev, p.left));
            }
            if let Some(next) = r.next {
                queue.extend(pair(&symbols, p.left, next));
            }
        }

        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            at = s.next;
            let piece = &text[s.start..s.start + s.len];
            match s.id.or_else(|| self.ids.get(piece).copied()) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        let id = self.byte_tokens[b as usize].or(self.unk).ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "cannot encode {piece:?}: the vocabulary has neither \
                                 <0x{b:02X}> nor an unknown token"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(entries: &[(&str, f32)]) -> SentencePiece {
        let texts: Vec<String> = entries.iter().map(|(t, _)| t.to_string()).collect();
        let scores = entries.iter().map(|(_, s)| *s).collect();
        SentencePiece::new(&texts, scores, Some(0), true).unwrap()
    }

    fn encode(s: &SentencePiece, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        s.encode(text, &mut out).unwrap();
        out
    }

    #[test]
    fn highest_score_merges_first_and_ties_go_left() {
        // "▁abc": "ab" (-1) beats "bc" (-2), then "▁ab" is not a token, so
        // the result is ▁ | ab | c.
        let s = spm(&[
            ("<unk>", 0.0),
            ("\u{2581}", -5.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -1.0),
            ("bc", -2.0),
        ]);
        assert_eq!(encode(&s, "abc"), vec![1, 5, 4]);
        // Equal scores: "aa" at the left wins, "▁" stays alone.
        let s = spm(&[
            ("<unk>", 0.0),
            ("\u{2581}", -5.0),
            ("a", -5.0),
            ("aa", -1.0),
        ]);
        assert_eq!(encode(&s, "aaa"), vec![1, 3, 2]);
    }

    #[test]
    fn spaces_become_the_metaspace_and_unknown_chars_fall_back_to_bytes() {
        let mut entries = vec![("<unk>".to_string(), 0.0), ("\u{2581}".to_string(), -1.0)];
        entries.push(("x".to_string(), -1.0));
        entries.push(("\u{2581}x".to_string(), -0.5));
        for b in [0xe6u8, 0x97, 0xa5] {
            entries.push((format!("<0x{b:02X}>"), 0.0));
        }
        let texts: Vec<String> = entries.iter().map(|(t, _)| t.clone()).collect();
        let scores = entries.iter().map(|(_, s)| *s).collect();
        let s = SentencePiece::new(&texts, scores, Some(0), true).unwrap();
        // " x日" -> ▁ ▁x then 日 as its three bytes.
        assert_eq!(encode(&s, " x日"), vec![1, 3, 4, 5, 6]);
        // A byte with no <0xXX> token becomes <unk>.
        assert_eq!(encode(&s, "é"), vec![1, 0, 0]);
        let s = SentencePiece::new(&texts, vec![0.0; texts.len()], None, false).unwrap();
        assert_eq!(encode(&s, "x"), vec![2]);
        let mut out = Vec::new();
        assert!(s.encode("é", &mut out).is_err());
    }
}
