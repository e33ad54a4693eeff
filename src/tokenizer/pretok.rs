//! Pre-tokenizers equivalent to llama.cpp's per-`tokenizer.ggml.pre` regex
//! lists (llama-vocab.cpp): each regex splits every piece left by the previous
//! one, keeping unmatched stretches as pieces of their own, then bytes are
//! mapped to GPT-2's printable alphabet.

use tokenizers::pre_tokenizers::{
    byte_level::ByteLevel,
    sequence::Sequence,
    split::{Split, SplitPattern},
    PreTokenizerWrapper,
};
use tokenizers::SplitDelimiterBehavior;

use crate::error::{Error, Result};

/// GPT-2's pattern. llama.cpp's list ends at `\s+(?!\S)`, but its hand-written
/// matcher for this pattern then falls back to `\s+`; the trailing `|\s+` makes
/// the regex do the same.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Qwen2's pattern, with llama.cpp's case-insensitive contractions spelled out.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pattern: as Qwen2's but digits group by up to three.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre` name.
pub fn regexes_for(pre: &str) -> Result<&'static [&'static str]> {
    Ok(match pre {
        // Digits one by one first, then GPT-2's pattern.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            &[r"\p{N}", GPT2]
        }
        "gpt2" | "default" | "mpt" | "olmo" | "jais" | "trillion" => &[GPT2],
        "qwen2" | "stablelm2" => &[QWEN2],
        "llama3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" | "lfm2" => &[LLAMA3],
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (tokenizer.ggml.pre); supported: \
                 smollm, qwen2, llama3, gpt2 and their aliases"
            )))
        }
    })
}

pub fn pipeline(pre: &str) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes_for(pre)? {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("bad pre-tokenizer regex: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        pipeline(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn smollm_splits_digits_and_keeps_space_before_last_word() {
        assert_eq!(
            pieces("smollm", "ab 12  cd"),
            ["ab", "Ġ", "1", "2", "Ġ", "Ġcd"]
        );
    }

    #[test]
    fn qwen2_groups_newlines() {
        assert_eq!(pieces("qwen2", "a\n\n b"), ["a", "ĊĊ", "Ġb"]);
    }

    #[test]
    fn unknown_pre_is_an_error() {
        assert!(pipeline("no-such-pre").is_err());
    }
}
