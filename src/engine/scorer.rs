//! The scorer: runs a whole draft tree through the model in one forward.

use crate::draft::DraftTree;
use crate::error::Result;
use crate::model::{Decoder, KvCache, LogitRows, Logits};

/// Logits for every node of `tree`, whose root sits right after the cache.
/// The tree's keys/values are left pending in `cache` for `keep`.
pub fn score(decoder: &Decoder, cache: &mut KvCache, tree: &DraftTree) -> Result<Logits> {
    let base = cache.len();
    let positions: Vec<usize> = tree.depths.iter().map(|d| base + d).collect();
    decoder.forward(cache, &tree.tokens, &positions, &tree.parents, LogitRows::All)
}
