//! Vocabulary facts shared by every tokenizer source: what kind each token is,
//! how it reads back as bytes, which tokens llama.cpp splits out of raw text
//! before BPE, and which ones end generation.

use std::collections::{BTreeSet, HashMap};

/// Token kinds, numbered as GGUF's `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    pub fn from_gguf(ty: i64) -> Self {
        match ty {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }

    /// Tokens that llama.cpp looks for in raw text before BPE.
    fn is_splittable(self) -> bool {
        matches!(
            self,
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
        )
    }
}

/// Names llama.cpp treats as end-of-generation (llama-vocab.cpp keeps such a
/// list because conversions rarely record end-of-turn ids in the metadata).
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle tokens that end generation too (pad, repo, file
/// separator), and the other FIM names that llama.cpp forces to control type.
const FIM_EOG_NAMES: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];
const FIM_OTHER_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<PRE>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<SUF>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<MID>",
];

/// The text and kind of every token, plus derived lookups.
pub struct Vocab {
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Bytes each token stands for when decoded.
    pieces: Vec<Vec<u8>>,
    /// Splittable tokens, longest text first (llama.cpp's match order).
    specials: Vec<u32>,
    by_text: HashMap<String, u32>,
}

/// A stretch of input: raw text still to be BPE-encoded, or a token already
/// recognised.
#[derive(Debug, PartialEq, Eq)]
pub enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Vocab {
    /// `decode_normal` turns a normal token's text into its bytes (byte-level
    /// BPE maps bytes to printable characters).
    pub fn new(
        texts: Vec<String>,
        mut kinds: Vec<TokenKind>,
        decode_normal: impl Fn(&str) -> Vec<u8>,
    ) -> Self {
        let mut by_text = HashMap::with_capacity(texts.len());
        for (id, t) in texts.iter().enumerate() {
            by_text.entry(t.clone()).or_insert(id as u32);
        }
        // llama.cpp promotes these names to control tokens whatever the
        // metadata says, so that they are parsed as special and end turns.
        for name in EOG_NAMES.iter().chain(FIM_EOG_NAMES).chain(FIM_OTHER_NAMES) {
            if let Some(&id) = by_text.get(*name) {
                kinds[id as usize] = TokenKind::Control;
            }
        }
        let pieces = texts
            .iter()
            .zip(&kinds)
            .map(|(t, k)| match k {
                TokenKind::Normal => decode_normal(t),
                TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown => {
                    t.as_bytes().to_vec()
                }
                TokenKind::Byte => byte_token(t).map(|b| vec![b]).unwrap_or_default(),
                TokenKind::Unused => Vec::new(),
            })
            .collect();
        let mut specials: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| kinds[id as usize].is_splittable() && !texts[id as usize].is_empty())
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(texts[id as usize].len()));
        Vocab {
            texts,
            kinds,
            pieces,
            specials,
            by_text,
        }
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    pub fn text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Split `text` around special tokens the way llama.cpp does: each token,
    /// longest first, is cut out of every remaining raw stretch. Control and
    /// unknown tokens only count with `parse_special`; user-defined tokens
    /// always do.
    pub fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return frags;
        }
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            if !parse_special && kind != TokenKind::UserDefined {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                match frag {
                    Fragment::Text(mut rest) => {
                        while let Some(at) = rest.find(needle) {
                            if at > 0 {
                                next.push(Fragment::Text(&rest[..at]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[at + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// End-of-generation tokens: the metadata's eos / eot / eom plus the
    /// tokens llama.cpp recognises by name.
    pub fn end_of_generation(&self, declared: &[Option<u32>]) -> Vec<u32> {
        let mut set: BTreeSet<u32> = declared
            .iter()
            .flatten()
            .copied()
            .filter(|&id| (id as usize) < self.len())
            .collect();
        for name in EOG_NAMES.iter().chain(FIM_EOG_NAMES) {
            if let Some(id) = self.id(name) {
                set.insert(id);
            }
        }
        set.into_iter().collect()
    }
}

/// The byte a SentencePiece byte-fallback token (`<0xE6>`) stands for.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// Bytes of a token from a SentencePiece (metaspace) vocabulary: `▁` is a
/// space, `<0xXX>` one byte.
pub fn metaspace_decode(text: &str) -> Vec<u8> {
    match byte_token(text) {
        Some(b) => vec![b],
        None => text.replace('\u{2581}', " ").into_bytes(),
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the
/// others are shifted to code points from 256 up.
pub fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

/// Bytes of a byte-level token text. A character outside the alphabet (which
/// a well-formed vocabulary never has) is kept as its own UTF-8.
pub fn byte_level_decode(map: &HashMap<char, u8>, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match map.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(entries: &[(&str, TokenKind)]) -> Vocab {
        let map = byte_level_char_to_byte();
        Vocab::new(
            entries.iter().map(|(t, _)| t.to_string()).collect(),
            entries.iter().map(|(_, k)| *k).collect(),
            |t| byte_level_decode(&map, t),
        )
    }

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let map = byte_level_char_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn partition_prefers_longer_tokens_and_respects_kinds() {
        let v = vocab(&[
            ("<|a|>", TokenKind::Control),
            ("<|a|><|a|>", TokenKind::Control),
            ("<tool>", TokenKind::UserDefined),
        ]);
        let f = v.partition("x<|a|><|a|>y<|a|><tool>", true);
        assert_eq!(
            f,
            vec![
                Fragment::Text("x"),
                Fragment::Token(1),
                Fragment::Text("y"),
                Fragment::Token(0),
                Fragment::Token(2)
            ]
        );
        let f = v.partition("x<|a|><tool>", false);
        assert_eq!(f, vec![Fragment::Text("x<|a|>"), Fragment::Token(2)]);
    }

    #[test]
    fn eog_names_become_control_and_stop() {
        let v = vocab(&[("a", TokenKind::Normal), ("<|im_end|>", TokenKind::Normal)]);
        assert_eq!(v.kind(1), Some(TokenKind::Control));
        assert_eq!(v.end_of_generation(&[Some(0), None]), vec![0, 1]);
    }
}
