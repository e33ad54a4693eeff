//! SpecExtend's cross-model retrieval for a draft model on long inputs
//! (Cha et al., 2025): the draft attends only to the chunks of its context
//! that the *target* attended to most at its last verify, plus the first
//! chunk and the newest positions, so a draft step's attention stops growing
//! with the context while it still sees what the target finds relevant.
//!
//! The draft keeps its full cache (every position, so any chunk can be
//! retrieved later) and a working cache gathered from it: the chosen
//! chunks, then every position from the tail on. Its forwards run on the
//! working cache at the tokens' true positions (keys carry their rotary
//! position, so a gathered key keeps its distance to the query), and what
//! they add is copied back to the full cache. Every [`RetrievalConfig::every`]
//! steps the target's last-layer attention of the last accepted token is
//! summed per chunk and the working cache rebuilt.
//!
//! Lossless whatever it chooses: the draft only proposes; the target, with
//! its full attention, verifies.

use crate::error::Result;
use crate::model::KvCache;

/// SpecExtend's defaults (its reference code: chunks of 32 positions, the
/// top 32 of them, retrieval every 8 steps); the newest 64 positions and
/// the first chunk are always kept (the first tokens draw attention in
/// every layer, the "attention sink", and the newest ones carry the local
/// context a next token depends on most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalConfig {
    pub chunk: usize,
    pub top_chunks: usize,
    pub every: usize,
    pub recent: usize,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            chunk: 32,
            top_chunks: 32,
            every: 8,
            recent: 64,
        }
    }
}

impl RetrievalConfig {
    /// Shortest context retrieval is used at: where the working cache would
    /// hold at most half the positions (below, the gathering and the copies
    /// back cost more than the attention they save).
    pub fn min_len(&self) -> usize {
        2 * ((self.top_chunks + 1) * self.chunk + self.recent)
    }

    /// The chunks to keep for a context of `len` positions, given the
    /// target's attention `mass` per chunk (shorter than the context when
    /// the target has not seen its end: missing chunks count 0), and where
    /// the tail of always-kept newest positions starts (a chunk boundary).
    /// `None` when the context is too short to pay.
    pub fn choose(&self, mass: &[f32], len: usize) -> Option<(Vec<usize>, usize)> {
        let chunk = self.chunk.max(1);
        if len < self.min_len() {
            return None;
        }
        let tail = len.saturating_sub(self.recent) / chunk * chunk;
        let before = tail / chunk;
        let score = |c: usize| {
            mass.get(c)
                .copied()
                .filter(|m| m.is_finite())
                .unwrap_or(0.0)
        };
        let mut ranked: Vec<usize> = (1..before).collect();
        ranked.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(b.cmp(&a)));
        ranked.truncate(self.top_chunks);
        ranked.push(0);
        ranked.sort_unstable();
        Some((ranked, tail))
    }
}

/// A draft's working cache: its full cache's chosen chunks, then every
/// position from `tail` on.
#[derive(Debug, Clone)]
pub struct Working {
    pub cache: KvCache,
    /// First full-cache position of the tail.
    tail: usize,
    /// Working-cache entries before the tail (the chosen chunks).
    gathered: usize,
}

impl Working {
    /// Gathers `chunks` (of `chunk` positions) and the tail from `full`
    /// into `reuse`'s buffers.
    pub fn gather(
        mut reuse: KvCache,
        full: &KvCache,
        chunks: &[usize],
        chunk: usize,
        tail: usize,
    ) -> Result<Working> {
        reuse.clear();
        for &c in chunks {
            let start = c * chunk;
            reuse.append_from(full, start..(start + chunk).min(tail))?;
        }
        let gathered = reuse.len();
        reuse.append_from(full, tail..full.len())?;
        Ok(Working {
            cache: reuse,
            tail,
            gathered,
        })
    }

    /// The working cache after the full one is cut to `len` positions, or
    /// `None` when the cut reaches into the gathered chunks (the caller
    /// then attends to everything until the next retrieval).
    pub fn truncate(mut self, len: usize) -> Option<Working> {
        if len < self.tail {
            return None;
        }
        self.cache.truncate(self.gathered + len - self.tail);
        Some(self)
    }

    /// Positions the draft attends to (committed in the working cache).
    pub fn held(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_the_most_attended_chunks_the_first_and_the_tail() {
        let cfg = RetrievalConfig {
            chunk: 4,
            top_chunks: 2,
            every: 8,
            recent: 6,
        };
        assert_eq!(cfg.min_len(), 2 * (3 * 4 + 6));
        assert_eq!(cfg.choose(&[], 35), None);
        // 40 positions: the tail starts at 32 (40 - 6 = 34, down to a
        // chunk boundary), so chunks 1..8 compete; 5 and 2 win, 0 is kept.
        let mass = [0.3, 0.01, 0.2, 0.0, 0.05, 0.4, f32::NAN];
        assert_eq!(cfg.choose(&mass, 40), Some((vec![0, 2, 5], 32)));
    }

    /// The working cache holds exactly the chosen chunks' and the tail's
    /// entries, and a cut into the gathered part drops it.
    #[test]
    fn the_working_cache_holds_the_chosen_positions() {
        let mut full = KvCache::new(2, 2, 8, 256);
        full.fill_pseudo_random(100, 9).unwrap();
        let w = Working::gather(KvCache::new(2, 2, 8, 256), &full, &[0, 3], 8, 80).unwrap();
        let positions: Vec<usize> = (0..8).chain(24..32).chain(80..100).collect();
        assert_eq!(w.held(), positions.len());
        for (q, &p) in positions.iter().enumerate() {
            assert_eq!(w.cache.entry(1, 1, q), full.entry(1, 1, p));
        }
        let w = w.truncate(90).unwrap();
        assert_eq!(w.held(), 16 + 10);
        assert!(w.truncate(79).is_none());
    }
}
