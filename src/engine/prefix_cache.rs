//! A prefix cache across requests: KV blocks of [`BLOCK`] positions in a
//! tree keyed by token ids (a block's node is reached through the blocks
//! before it, so one node stands for one whole prefix), LRU-evicted under a
//! byte budget (`--cache-mb`). A request starts from the longest run of
//! cached blocks that begins its prompt and prefills only the rest; a
//! finished request's blocks join the tree. System prompts, multi-turn
//! histories and repeated few-shot headers are then prefilled once.
//!
//! Blocks are copied into the sequence's own [`KvCache`] at admission (a
//! memcpy: ~2 MB per block on the 1.5B, against tens of milliseconds of
//! prefill per block) rather than referenced from it: the attention then
//! reads one contiguous history per head, as it does without the cache.
//! The price is that a prefix shared by running sequences is held once per
//! sequence plus once here; `--cache-mb` bounds only the latter.
//!
//! Keys are cached after RoPE at their absolute positions, so a block is
//! only ever reused at the same positions: a prefix starts at position 0.

use std::collections::HashMap;

use crate::model::{KvBlock, KvCache, KEY_TILE};

/// Positions per block: a multiple of the cache's key tile (so a block is
/// a contiguous run of every head's buffers), small enough that a chat's
/// shared system prompt fills whole blocks, large enough that the tree
/// stays small (vLLM uses 16, SGLang one token, the ChunkAttention
/// 64; 64 keeps per-block bookkeeping negligible next to its ~1-2 MB).
pub const BLOCK: usize = 64;
const _: () = assert!(BLOCK.is_multiple_of(KEY_TILE));

struct Node {
    parent: Option<usize>,
    tokens: Vec<u32>,
    kv: KvBlock,
    children: usize,
    used: u64,
}

/// What the cache holds and has done, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub blocks: usize,
    pub bytes: usize,
    /// Prompt tokens restored from cached blocks instead of prefilled.
    pub hit_tokens: u64,
    pub evictions: u64,
}

pub struct PrefixCache {
    budget: usize,
    nodes: Vec<Option<Node>>,
    free: Vec<usize>,
    /// (parent node, the block's tokens) -> node.
    index: HashMap<(Option<usize>, Vec<u32>), usize>,
    tick: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// A cache of at most `budget_bytes` of blocks (0: holds nothing).
    pub fn new(budget_bytes: usize) -> Self {
        PrefixCache {
            budget: budget_bytes,
            nodes: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            tick: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("indexed nodes are live")
    }

    /// The chain of cached blocks that begins `tokens`, longest first-to-last.
    fn chain(&self, tokens: &[u32]) -> Vec<usize> {
        let mut chain = Vec::new();
        let mut parent = None;
        for block in tokens.chunks_exact(BLOCK) {
            match self.index.get(&(parent, block.to_vec())) {
                Some(&i) => {
                    chain.push(i);
                    parent = Some(i);
                }
                None => break,
            }
        }
        chain
    }

    /// Positions of `tokens` the cache can restore (a multiple of [`BLOCK`]).
    pub fn cached_len(&self, tokens: &[u32]) -> usize {
        self.chain(tokens).len() * BLOCK
    }

    /// Brings `cache`, which holds the first `held` tokens of `tokens`, to
    /// hold as much of `tokens` as cached blocks give, when that is more
    /// than it holds. Returns the positions it now holds of `tokens`
    /// (`held` when the blocks give nothing more; less only when a block
    /// could not be appended).
    pub fn restore(&mut self, tokens: &[u32], cache: &mut KvCache, held: usize) -> usize {
        let chain = self.chain(tokens);
        let have = chain.len() * BLOCK;
        if have <= held {
            return held;
        }
        self.tick += 1;
        // Keep the whole blocks the cache already holds; copy the rest.
        let keep = held / BLOCK;
        cache.truncate(keep * BLOCK);
        for &i in &chain[keep..] {
            if let Err(e) = cache.append_block(&self.node(i).kv) {
                // A cache of another shape or a full context: prefill instead.
                tracing::warn!("prefix cache: cannot restore a block: {e}");
                break;
            }
        }
        for &i in &chain {
            if let Some(n) = self.nodes[i].as_mut() {
                n.used = self.tick;
            }
        }
        let restored = cache.len();
        self.stats.hit_tokens += restored.saturating_sub(held) as u64;
        restored
    }

    /// Adds the whole blocks of `tokens` (which `cache` holds, committed,
    /// from position 0) that the tree does not hold yet, evicting least
    /// recently used leaves to make room; stops at the first block that
    /// cannot fit.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache) {
        if self.budget == 0 {
            return;
        }
        self.tick += 1;
        let usable = tokens.len().min(cache.len());
        let mut parent = None;
        for (b, block) in tokens[..usable].chunks_exact(BLOCK).enumerate() {
            let key = (parent, block.to_vec());
            let i = match self.index.get(&key) {
                Some(&i) => i,
                None => {
                    let Ok(kv) = cache.copy_block(b * BLOCK, BLOCK) else {
                        break;
                    };
                    if !self.make_room(kv.bytes(), parent) {
                        break;
                    }
                    self.stats.bytes += kv.bytes();
                    self.stats.blocks += 1;
                    let node = Node {
                        parent,
                        tokens: block.to_vec(),
                        kv,
                        children: 0,
                        used: 0,
                    };
                    let i = match self.free.pop() {
                        Some(i) => {
                            self.nodes[i] = Some(node);
                            i
                        }
                        None => {
                            self.nodes.push(Some(node));
                            self.nodes.len() - 1
                        }
                    };
                    if let Some(p) = parent {
                        if let Some(n) = self.nodes[p].as_mut() {
                            n.children += 1;
                        }
                    }
                    self.index.insert(key, i);
                    i
                }
            };
            if let Some(n) = self.nodes[i].as_mut() {
                n.used = self.tick;
            }
            parent = Some(i);
        }
    }

    /// Evicts least recently used leaves until `bytes` more fit in the
    /// budget, never `keep` (the block the new one extends; its own
    /// ancestors have children, so they are not leaves). False when that
    /// is impossible: the prefix being inserted stops there.
    fn make_room(&mut self, bytes: usize, keep: Option<usize>) -> bool {
        while self.stats.bytes + bytes > self.budget {
            let victim = (0..self.nodes.len())
                .filter(|&i| Some(i) != keep)
                .filter_map(|i| self.nodes[i].as_ref().map(|n| (i, n)))
                .filter(|(_, n)| n.children == 0)
                .min_by_key(|(_, n)| n.used)
                .map(|(i, _)| i);
            let Some(i) = victim else { return false };
            let node = self.nodes[i].take().expect("live victim");
            self.free.push(i);
            self.index.remove(&(node.parent, node.tokens));
            if let Some(p) = node.parent {
                if let Some(n) = self.nodes[p].as_mut() {
                    n.children -= 1;
                }
            }
            self.stats.bytes -= node.kv.bytes();
            self.stats.blocks -= 1;
            self.stats.evictions += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(n: usize) -> KvCache {
        let mut c = KvCache::new(2, 1, 16, 1024);
        c.fill_pseudo_random(n, 64).unwrap();
        c
    }

    #[test]
    fn restores_the_longest_cached_prefix_and_evicts_lru_leaves() {
        let a: Vec<u32> = (0..200).collect();
        let src = cache_with(200);
        let block_bytes = src.copy_block(0, BLOCK).unwrap().bytes();
        let mut pc = PrefixCache::new(10 * block_bytes);
        pc.insert(&a, &src);
        assert_eq!(pc.stats().blocks, 3, "200 tokens hold 3 whole blocks");
        // Same first 130 tokens, then different: 2 blocks match.
        let mut b: Vec<u32> = (0..130).collect();
        b.extend(900..1000);
        assert_eq!(pc.cached_len(&b), 128);
        let mut dst = KvCache::new(2, 1, 16, 1024);
        assert_eq!(pc.restore(&b, &mut dst, 0), 128);
        assert_eq!(dst.len(), 128);
        for p in [0, 63, 64, 127] {
            assert_eq!(dst.entry(1, 0, p), src.entry(1, 0, p));
        }
        assert_eq!(pc.stats().hit_tokens, 128);
        // A cache already holding more than the blocks give is left alone.
        let mut long = cache_with(150);
        assert_eq!(pc.restore(&b, &mut long, 140), 140);
        assert_eq!(long.len(), 150);
        // A different first block matches nothing.
        let c: Vec<u32> = (1..200).collect();
        assert_eq!(pc.cached_len(&c), 0);

        // Budget of 4 blocks: inserting 3 more evicts the oldest leaves,
        // never a block with children, never the newest.
        let mut pc = PrefixCache::new(4 * block_bytes);
        pc.insert(&a, &src);
        let other: Vec<u32> = (5000..5200).collect();
        pc.insert(&other, &src);
        let s = pc.stats();
        assert_eq!(s.blocks, 4);
        assert_eq!(s.evictions, 2);
        assert!(s.bytes <= 4 * block_bytes);
        assert_eq!(pc.cached_len(&other), 192);
        assert_eq!(
            pc.cached_len(&a),
            64,
            "a's deeper blocks were the LRU leaves"
        );
        // Nothing is kept at budget 0.
        let mut none = PrefixCache::new(0);
        none.insert(&a, &src);
        assert_eq!(none.stats().blocks, 0);
    }
}
