//! Saving and loading the recycle matrix, so a model starts hot next time.
//!
//! Format (all integers little-endian):
//! ```text
//! magic    8 bytes  "TSRECYC\0"
//! version  u32      1
//! id_len   u32      length of the model identity (<= 4096)
//! model_id id_len bytes of UTF-8
//! vocab    u32
//! k        u32
//! ids      vocab * k u32
//! probs    vocab * k u16
//! checksum u64      FNV-1a 64 of every byte above
//! ```
//! (checksum and atomic write: [`crate::draft::persist`])

use std::path::Path;

use crate::draft::persist::{fnv1a64, write_atomic, Reader};

use super::{RecycleConfig, TokenRecycler};
use crate::draft::template::{TreeTemplate, MAX_K};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"TSRECYC\0";
const VERSION: u32 = 1;
const MAX_ID_LEN: usize = 4096;

fn state_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::RecycleState {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl TokenRecycler {
    /// Writes the matrix to `path` atomically: into `<path>.tmp` in the same
    /// directory, fsync, then rename over `path` (a crash leaves either the
    /// old file or the new one, never half of one). `model_id` names the
    /// model whose top-k filled the matrix (e.g. the GGUF's sha256), so
    /// another model never loads it.
    pub fn save(&self, path: &Path, model_id: &str) -> Result<()> {
        if model_id.len() > MAX_ID_LEN {
            return Err(state_err(
                path,
                format!("model identity longer than {MAX_ID_LEN} bytes"),
            ));
        }
        let cells = self.ids.len();
        let mut buf = Vec::with_capacity(32 + model_id.len() + cells * 6 + 8);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(model_id.len() as u32).to_le_bytes());
        buf.extend_from_slice(model_id.as_bytes());
        buf.extend_from_slice(&(self.vocab as u32).to_le_bytes());
        buf.extend_from_slice(&(self.k as u32).to_le_bytes());
        for &id in &self.ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        for &p in &self.probs {
            buf.extend_from_slice(&p.to_le_bytes());
        }
        let sum = fnv1a64(&buf);
        buf.extend_from_slice(&sum.to_le_bytes());

        write_atomic(path, &buf).map_err(|e| state_err(path, format!("cannot write: {e}")))
    }

    /// Loads a matrix saved by [`TokenRecycler::save`] for model `model_id`
    /// with a vocabulary of `vocab`, with the default tree shape (k comes
    /// from the file; change the shape with [`TokenRecycler::set_shape`]).
    /// Refuses another model's file, a different vocabulary, and truncated
    /// or corrupt files.
    pub fn load(path: &Path, model_id: &str, vocab: usize) -> Result<Self> {
        let (k, ids, probs) = read_state(path, model_id, vocab)?;
        let mut config = RecycleConfig {
            k,
            ..RecycleConfig::default()
        };
        if let super::TreeShape::Static(t) = &config.shape {
            if t.check_k(k).is_err() {
                // A small k: the same-size tree from tr-80's nodes that fit.
                let fitting = TreeTemplate::builtin("tr-80")
                    .and_then(|t80| t80.limited_to_k(k))
                    .map(|t80| t80.best_of(t.len()));
                config.shape = match fitting {
                    Some(t) => super::TreeShape::Static(t),
                    None => super::TreeShape::Dynamic,
                };
            }
        }
        let mut r = TokenRecycler::new(vocab, config)?;
        r.ids = ids;
        r.probs = probs;
        Ok(r)
    }

    /// Replaces this recycler's matrix with the one in `path`, keeping its
    /// configuration; the file must match `model_id`, the vocabulary and k.
    pub fn load_state(&mut self, path: &Path, model_id: &str) -> Result<()> {
        let (k, ids, probs) = read_state(path, model_id, self.vocab)?;
        if k != self.k {
            return Err(state_err(
                path,
                format!(
                    "holds k = {k} candidates per token, this recycler uses k = {}",
                    self.k
                ),
            ));
        }
        self.ids = ids;
        self.probs = probs;
        Ok(())
    }
}

type State = (usize, Vec<u32>, Vec<u16>);

fn read_state(path: &Path, model_id: &str, vocab: usize) -> Result<State> {
    let io = |e: std::io::Error| state_err(path, format!("cannot read: {e}"));
    // Bound the read by the largest file a valid state could be, so a huge
    // unrelated file is refused before it is read into memory.
    let max_len = 8 + 4 + 4 + MAX_ID_LEN as u64 + 8 + (vocab as u64) * (MAX_K as u64) * 6 + 8;
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > max_len {
        return Err(state_err(
            path,
            format!("{len} bytes is too large for a recycle state of vocabulary {vocab}"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse_state(&bytes, path, model_id, vocab)
}

fn parse_state(bytes: &[u8], path: &Path, model_id: &str, vocab: usize) -> Result<State> {
    let mut r = Reader::new(bytes);
    let truncated = || state_err(path, "truncated file");
    if r.take(8).ok_or_else(truncated)? != MAGIC {
        return Err(state_err(path, "not a treespec recycle state (bad magic)"));
    }
    let version = r.u32().ok_or_else(truncated)?;
    if version != VERSION {
        return Err(state_err(
            path,
            format!("format version {version}, this build reads version {VERSION}"),
        ));
    }
    let id_len = r.u32().ok_or_else(truncated)? as usize;
    if id_len > MAX_ID_LEN {
        return Err(state_err(path, "corrupt header (model identity too long)"));
    }
    let id_bytes = r.take(id_len).ok_or_else(truncated)?;
    let file_vocab = r.u32().ok_or_else(truncated)? as usize;
    let k = r.u32().ok_or_else(truncated)? as usize;
    if k == 0 || k > MAX_K {
        return Err(state_err(path, format!("corrupt header (k = {k})")));
    }
    let cells = file_vocab
        .checked_mul(k)
        .ok_or_else(|| state_err(path, "corrupt header (size overflows)"))?;
    let expected = (r.pos as u64) + (cells as u64) * 6 + 8;
    if (bytes.len() as u64) < expected {
        return Err(truncated());
    }
    if (bytes.len() as u64) > expected {
        return Err(state_err(path, "trailing bytes after the checksum"));
    }
    let body_end = bytes.len() - 8;
    let stored = u64::from_le_bytes(bytes[body_end..].try_into().expect("8 bytes"));
    if fnv1a64(&bytes[..body_end]) != stored {
        return Err(state_err(path, "corrupt file (checksum mismatch)"));
    }
    let file_model = std::str::from_utf8(id_bytes)
        .map_err(|_| state_err(path, "corrupt header (model identity is not UTF-8)"))?;
    if file_model != model_id {
        return Err(state_err(
            path,
            format!("belongs to model '{file_model}', not '{model_id}'"),
        ));
    }
    if file_vocab != vocab {
        return Err(state_err(
            path,
            format!("vocabulary of {file_vocab} tokens, the model has {vocab}"),
        ));
    }
    let ids_bytes = r.take(cells * 4).ok_or_else(truncated)?;
    let probs_bytes = r.take(cells * 2).ok_or_else(truncated)?;
    let ids: Vec<u32> = ids_bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(state_err(
            path,
            format!("corrupt file (token id {bad} outside the vocabulary)"),
        ));
    }
    let probs = probs_bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")))
        .collect();
    Ok((k, ids, probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draft::persist::tmp_path;
    use crate::draft::recycle::TreeShape;
    use crate::draft::{Drafter, NodeTopK};
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("treespec-recycle-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn filled(vocab: usize) -> TokenRecycler {
        let mut r = TokenRecycler::new(vocab, RecycleConfig::default()).unwrap();
        for t in 0..vocab as u32 {
            let ids: Vec<u32> = (1..=5).map(|d| (t * 7 + d) % vocab as u32).collect();
            r.write_row(
                t,
                &NodeTopK {
                    ids,
                    probs: vec![0.4, 0.2, 0.1, 0.05, 0.01],
                },
            );
        }
        r
    }

    fn msg(e: Error) -> String {
        match e {
            Error::RecycleState { msg, .. } => msg,
            other => panic!("expected a recycle-state error, got {other}"),
        }
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("rt");
        let path = dir.0.join("sub/state.bin");
        let r = filled(300);
        r.save(&path, "model-a").unwrap();
        assert!(!tmp_path(&path).exists());
        let mut back = TokenRecycler::load(&path, "model-a", 300).unwrap();
        assert_eq!(back.ids, r.ids);
        assert_eq!(back.probs, r.probs);
        assert_eq!(back.k(), 8);
        assert_eq!(back.propose(&[5], 16), r.clone().propose(&[5], 16));
        // Into an existing recycler with its own shape.
        let mut dynamic = TokenRecycler::new(
            300,
            RecycleConfig {
                shape: TreeShape::Dynamic,
                ..RecycleConfig::default()
            },
        )
        .unwrap();
        dynamic.load_state(&path, "model-a").unwrap();
        assert_eq!(dynamic.ids, r.ids);
        assert_eq!(dynamic.shape(), &TreeShape::Dynamic);
        // Saving again replaces the file.
        let empty = TokenRecycler::new(300, RecycleConfig::default()).unwrap();
        empty.save(&path, "model-a").unwrap();
        assert_eq!(
            TokenRecycler::load(&path, "model-a", 300)
                .unwrap()
                .rows_written(),
            0
        );
    }

    #[test]
    fn load_with_small_k_gets_a_fitting_template() {
        let dir = TempDir::new("k");
        let path = dir.0.join("s.bin");
        let r = TokenRecycler::new(
            50,
            RecycleConfig {
                k: 2,
                shape: TreeShape::Static(TreeTemplate::from_json("[[0],[1]]").unwrap()),
                seed_from_prompt: true,
            },
        )
        .unwrap();
        r.save(&path, "m").unwrap();
        let back = TokenRecycler::load(&path, "m", 50).unwrap();
        assert_eq!(back.k(), 2);
        match back.shape() {
            TreeShape::Static(t) => assert!(t.k_needed() <= 2 && t.len() == 16),
            other => panic!("{other:?}"),
        }
        let mut other = TokenRecycler::new(50, RecycleConfig::default()).unwrap();
        assert!(msg(other.load_state(&path, "m").unwrap_err()).contains("k = 2"));
    }

    #[test]
    fn refuses_foreign_or_broken_files() {
        let dir = TempDir::new("bad");
        let path = dir.0.join("state.bin");
        filled(64).save(&path, "model-a").unwrap();
        let good = std::fs::read(&path).unwrap();

        let m = msg(TokenRecycler::load(&path, "model-b", 64).unwrap_err());
        assert!(m.contains("model-a") && m.contains("model-b"), "{m}");
        assert!(msg(TokenRecycler::load(&path, "model-a", 65).unwrap_err()).contains("vocabulary"));
        assert!(
            msg(TokenRecycler::load(&dir.0.join("missing"), "model-a", 64).unwrap_err())
                .contains("cannot read")
        );

        // Every truncation is refused, none panics (in memory, then a few
        // through the file system).
        for cut in 0..good.len() {
            assert!(
                parse_state(&good[..cut], &path, "model-a", 64).is_err(),
                "cut {cut}"
            );
        }
        for cut in [0, 5, 20, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(
                TokenRecycler::load(&path, "model-a", 64).is_err(),
                "cut {cut}"
            );
        }
        // Every single-byte corruption is refused.
        for pos in 0..good.len() {
            let mut bad = good.clone();
            bad[pos] ^= 0x41;
            assert!(
                parse_state(&bad, &path, "model-a", 64).is_err(),
                "byte {pos}"
            );
        }
        let mut bad = good.clone();
        bad[100] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(msg(TokenRecycler::load(&path, "model-a", 64).unwrap_err()).contains("checksum"));
        let mut long = good.clone();
        long.push(0);
        std::fs::write(&path, &long).unwrap();
        assert!(msg(TokenRecycler::load(&path, "model-a", 64).unwrap_err()).contains("trailing"));
        std::fs::write(&path, b"hello world, not a state file at all").unwrap();
        assert!(msg(TokenRecycler::load(&path, "model-a", 64).unwrap_err()).contains("magic"));

        // A well-formed file (valid checksum) with an out-of-range token id.
        let mut forged = good.clone();
        let ids_at = 8 + 4 + 4 + "model-a".len() + 8;
        forged[ids_at..ids_at + 4].copy_from_slice(&1000u32.to_le_bytes());
        let body = forged.len() - 8;
        let sum = fnv1a64(&forged[..body]);
        forged[body..].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &forged).unwrap();
        assert!(msg(TokenRecycler::load(&path, "model-a", 64).unwrap_err()).contains("1000"));
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }
}
