//! The KV cache as an explicit object (not hidden inside layers), so the
//! engine can score a draft tree and then keep only the accepted path.
//!
//! Layout, per layer and per kv head (so one head's history is contiguous
//! for the attention that streams it):
//! - keys in tiles of [`KEY_TILE`] positions, each tile `[head_dim][KEY_TILE]`
//!   (transposed): the attention scores 16 positions at once with the
//!   positions in SIMD lanes, so every score is one plain multiply-add chain
//!   over `head_dim` — no horizontal reduction per key, and the same
//!   arithmetic for a key whether it is cached or new in this forward;
//! - values `[position][head_dim]`.
//!
//! Entries are stored as f16 (llama.cpp's default cache type, see
//! [`to_f16`]): the attention converts on load, which is exact, and reads
//! half the bytes — at long context the cache, not the weights, is what a
//! forward streams.
//!
//! A forward appends its N new entries after the `len()` committed ones as
//! *pending*; `keep(indices)` then moves the listed pending entries to sit
//! contiguously after the committed prefix and drops the rest. The committed
//! prefix is never copied.

use crate::error::{Error, Result};

/// Positions per key tile (= f32 lanes of a 512-bit register).
pub const KEY_TILE: usize = 16;

#[derive(Debug, Clone)]
pub struct KvCache {
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// `[layer * n_kv_heads + head]`: key tiles (see the module docs), f16 bits.
    k: Vec<Vec<u16>>,
    /// `[layer * n_kv_heads + head]`: `[position][head_dim]`, f16 bits.
    v: Vec<Vec<u16>>,
    committed: usize,
    pending: usize,
    /// The last `fresh` pending entries are the ones the current forward
    /// writes (the rest were appended by earlier forwards of one draft tree).
    fresh: usize,
}

/// Committed keys and values of a run of positions, every layer and head
/// (f16 bits, as the cache stores them), copied out by
/// [`KvCache::copy_block`].
#[derive(Debug, Clone)]
pub struct KvBlock {
    positions: usize,
    data: Vec<u16>,
}

impl KvBlock {
    pub fn positions(&self) -> usize {
        self.positions
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// One layer's keys and values for the committed + pending positions.
pub struct LayerKv<'a> {
    keys: &'a [Vec<u16>],
    values: &'a [Vec<u16>],
    len: usize,
    head_dim: usize,
}

impl<'a> LayerKv<'a> {
    /// Positions visible to the forward (committed + pending).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Head `g`'s key tiles covering every position (the last tile may hold
    /// stale lanes past `len()`), as f16 bits.
    pub fn keys(&self, g: usize) -> &'a [u16] {
        &self.keys[g][..self.len.div_ceil(KEY_TILE) * KEY_TILE * self.head_dim]
    }

    /// Head `g`'s values, `[len()][head_dim]`, as f16 bits.
    pub fn values(&self, g: usize) -> &'a [u16] {
        &self.values[g][..self.len * self.head_dim]
    }
}

/// llama.cpp's default cache type is f16, and matching its rounding keeps our
/// greedy output on its path (measured on the golden records: with f32
/// entries SmolLM2 left llama.cpp's path at a 0.09 top-2 margin).
#[inline]
fn to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

#[inline]
fn from_f16(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

impl KvCache {
    /// A cache for up to `capacity` positions. Memory is reserved lazily
    /// (the buffers grow with the sequence).
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCache {
            n_kv_heads,
            head_dim,
            capacity,
            k: vec![Vec::new(); n_layers * n_kv_heads],
            v: vec![Vec::new(); n_layers * n_kv_heads],
            committed: 0,
            pending: 0,
            fresh: 0,
        }
    }

    /// Committed positions: the sequence the model has seen.
    pub fn len(&self) -> usize {
        self.committed
    }

    pub fn is_empty(&self) -> bool {
        self.committed == 0
    }

    /// Entries appended by the last forward and not yet kept.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Index of position `p`, dimension `c` in a head's key tiles.
    #[inline]
    fn key_at(&self, p: usize, c: usize) -> usize {
        ((p / KEY_TILE) * self.head_dim + c) * KEY_TILE + p % KEY_TILE
    }

    /// Starts a forward of `n` new entries: drops any earlier pending ones and
    /// makes room. Fails when the context is full.
    pub fn begin(&mut self, n: usize) -> Result<()> {
        self.pending = 0;
        self.extend(n)
    }

    /// Starts a forward of `n` more entries after the pending ones, which
    /// stay (a draft tree grown one depth per forward: each level attends to
    /// the levels already pending). Fails when the context is full.
    pub fn extend(&mut self, n: usize) -> Result<()> {
        let need = self.committed + self.pending + n;
        if need > self.capacity {
            return Err(Error::ContextLength {
                prompt: need,
                context: self.capacity,
                reserve: 0,
            });
        }
        let key_floats = need.div_ceil(KEY_TILE) * KEY_TILE * self.head_dim;
        let value_floats = need * self.head_dim;
        for buf in &mut self.k {
            if buf.len() < key_floats {
                buf.resize(key_floats, 0);
            }
        }
        for buf in &mut self.v {
            if buf.len() < value_floats {
                buf.resize(value_floats, 0);
            }
        }
        self.pending += n;
        self.fresh = n;
        Ok(())
    }

    /// Writes the current forward's entries of one layer (the last `n` pending
    /// ones of [`KvCache::begin`]/[`KvCache::extend`]): `k`, `v` hold `n` rows of
    /// `[n_kv_heads][head_dim]`, stored rounded to f16 precision.
    ///
    /// # Panics
    /// If `k` or `v` is shorter than that, or `layer` is out of range (a
    /// caller's bug, not input: the decoder sizes both).
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (h, d) = (self.n_kv_heads, self.head_dim);
        let first = self.committed + self.pending - self.fresh;
        for i in 0..self.fresh {
            let p = first + i;
            for g in 0..h {
                let src = (i * h + g) * d;
                let key_base = self.key_at(p, 0);
                let keys = &mut self.k[layer * h + g];
                for c in 0..d {
                    keys[key_base + c * KEY_TILE] = to_f16(k[src + c]);
                }
                let values = &mut self.v[layer * h + g][p * d..(p + 1) * d];
                for (dst, &s) in values.iter_mut().zip(&v[src..src + d]) {
                    *dst = to_f16(s);
                }
            }
        }
    }

    /// Keys and values of one layer for committed + pending positions.
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        let h = self.n_kv_heads;
        LayerKv {
            keys: &self.k[layer * h..(layer + 1) * h],
            values: &self.v[layer * h..(layer + 1) * h],
            len: self.committed + self.pending,
            head_dim: self.head_dim,
        }
    }

    /// Key and value of `(layer, head, position)` (for tests and debugging).
    pub fn entry(&self, layer: usize, head: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let buf = layer * self.n_kv_heads + head;
        let key = (0..d)
            .map(|c| from_f16(self.k[buf][self.key_at(pos, c)]))
            .collect();
        let value = self.v[buf][pos * d..(pos + 1) * d]
            .iter()
            .map(|&b| from_f16(b))
            .collect();
        (key, value)
    }

    /// Commits the pending entries listed in `indices` (ascending indices into
    /// the last forward's tokens, e.g. the accepted root-to-leaf path) and
    /// drops the others.
    pub fn keep(&mut self, indices: &[usize]) -> Result<()> {
        if indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid(
                "KvCache::keep needs ascending indices".into(),
            ));
        }
        if let Some(&last) = indices.last() {
            if last >= self.pending {
                return Err(Error::Invalid(format!(
                    "KvCache::keep index {last} but only {} entries are pending",
                    self.pending
                )));
            }
        }
        let d = self.head_dim;
        let base = self.committed;
        for (dst, &src) in indices.iter().enumerate() {
            if dst == src {
                continue;
            }
            // src > dst, so a forward copy never overwrites an entry still to move.
            let (from, to) = (base + src, base + dst);
            let (kf, kt) = (self.key_at(from, 0), self.key_at(to, 0));
            for keys in &mut self.k {
                for c in 0..d {
                    keys[kt + c * KEY_TILE] = keys[kf + c * KEY_TILE];
                }
            }
            for values in &mut self.v {
                values.copy_within(from * d..(from + 1) * d, to * d);
            }
        }
        self.committed += indices.len();
        self.pending = 0;
        Ok(())
    }

    /// Appends `n` committed positions of pseudo-random keys and values in
    /// [-1, 1) (deterministic), in steps of at most `step` positions: a
    /// context to measure forward costs over without prefilling it (a
    /// forward's cost does not depend on what the cache holds).
    pub fn fill_pseudo_random(&mut self, n: usize, step: usize) -> Result<()> {
        let layers = self.k.len() / self.n_kv_heads.max(1);
        let row = self.n_kv_heads * self.head_dim;
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        let mut done = 0;
        while done < n {
            let m = step.max(1).min(n - done);
            self.begin(m)?;
            for layer in 0..layers {
                let k: Vec<f32> = (0..m * row).map(|_| next()).collect();
                let v: Vec<f32> = (0..m * row).map(|_| next()).collect();
                self.write(layer, &k, &v);
            }
            self.keep_all();
            done += m;
        }
        Ok(())
    }

    /// Commits every pending entry (prefill, plain decoding).
    pub fn keep_all(&mut self) {
        self.committed += self.pending;
        self.pending = 0;
    }

    /// A copy of committed positions `start..start + n` (both multiples of
    /// [`KEY_TILE`], so whole key tiles: a block is then one contiguous run
    /// of every head's key and value buffers). For the prefix cache.
    pub fn copy_block(&self, start: usize, n: usize) -> Result<KvBlock> {
        if !start.is_multiple_of(KEY_TILE)
            || !n.is_multiple_of(KEY_TILE)
            || start + n > self.committed
        {
            return Err(Error::Invalid(format!(
                "KvCache::copy_block {start}..{} of {} committed positions (tile {KEY_TILE})",
                start + n,
                self.committed
            )));
        }
        let d = self.head_dim;
        let (from, to) = (start * d, (start + n) * d);
        let mut data = Vec::with_capacity(2 * self.k.len() * n * d);
        // Whole tiles: keys of positions start.. are the same run of
        // `n * d` entries as values (tiles of KEY_TILE positions x d dims).
        for keys in &self.k {
            data.extend_from_slice(&keys[from..to]);
        }
        for values in &self.v {
            data.extend_from_slice(&values[from..to]);
        }
        Ok(KvBlock { positions: n, data })
    }

    /// Appends `block` as committed positions after the committed ones
    /// (which must end on a key tile), dropping anything pending: the
    /// inverse of [`KvCache::copy_block`], for a prefix the prefix cache
    /// holds. Fails when the block is of another shape or the context full.
    pub fn append_block(&mut self, block: &KvBlock) -> Result<()> {
        let n = block.positions;
        let run = n * self.head_dim;
        if !self.committed.is_multiple_of(KEY_TILE) || block.data.len() != 2 * self.k.len() * run {
            return Err(Error::Invalid(format!(
                "KvCache::append_block: a block of {} entries for {n} positions does not fit \
                 this cache ({} committed)",
                block.data.len(),
                self.committed
            )));
        }
        self.begin(n)?;
        let at = self.committed * self.head_dim;
        let (keys, values) = block.data.split_at(self.k.len() * run);
        for (buf, src) in self.k.iter_mut().zip(keys.chunks_exact(run)) {
            buf[at..at + run].copy_from_slice(src);
        }
        for (buf, src) in self.v.iter_mut().zip(values.chunks_exact(run)) {
            buf[at..at + run].copy_from_slice(src);
        }
        self.keep_all();
        Ok(())
    }

    /// Appends `src`'s committed positions `range` after this cache's
    /// committed ones, dropping anything pending: a draft model's working
    /// cache gathered from its full one (SpecExtend's retrieval), and the
    /// working cache's new entries copied back. Positions need no tile
    /// alignment; whole aligned tiles are copied as runs. Fails when the
    /// caches differ in shape, `range` is not committed in `src`, or the
    /// context is full.
    pub fn append_from(&mut self, src: &KvCache, range: std::ops::Range<usize>) -> Result<()> {
        if src.k.len() != self.k.len() || src.head_dim != self.head_dim || range.end > src.committed
        {
            return Err(Error::Invalid(format!(
                "KvCache::append_from {}..{} of {} committed positions into a cache of another shape or past its end",
                range.start, range.end, src.committed
            )));
        }
        let n = range.len();
        self.begin(n)?;
        let d = self.head_dim;
        let at = self.committed;
        let aligned = at.is_multiple_of(KEY_TILE)
            && range.start.is_multiple_of(KEY_TILE)
            && n.is_multiple_of(KEY_TILE);
        for (dst, from) in self.k.iter_mut().zip(&src.k) {
            if aligned {
                dst[at * d..(at + n) * d].copy_from_slice(&from[range.start * d..range.end * d]);
                continue;
            }
            for (i, p) in range.clone().enumerate() {
                let (q, sp) = (at + i, p);
                let qb = ((q / KEY_TILE) * d) * KEY_TILE + q % KEY_TILE;
                let sb = ((sp / KEY_TILE) * d) * KEY_TILE + sp % KEY_TILE;
                for c in 0..d {
                    dst[qb + c * KEY_TILE] = from[sb + c * KEY_TILE];
                }
            }
        }
        for (dst, from) in self.v.iter_mut().zip(&src.v) {
            dst[at * d..(at + n) * d].copy_from_slice(&from[range.start * d..range.end * d]);
        }
        self.keep_all();
        Ok(())
    }

    /// Forgets everything after `len` committed positions.
    pub fn truncate(&mut self, len: usize) {
        self.committed = self.committed.min(len);
        self.pending = 0;
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by the cache now.
    pub fn memory_bytes(&self) -> usize {
        self.k
            .iter()
            .chain(self.v.iter())
            .map(|b| b.capacity() * 2)
            .sum()
    }
}

/// How many leading tokens `a` and `b` share: the part of a cached sequence
/// that a new one may reuse, or where two decodes first differ.
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions gathered from another cache, aligned or not, hold the
    /// source's entries; a shape mismatch or a range past the committed
    /// end is refused.
    #[test]
    fn gathered_positions_hold_the_source_entries() {
        let mut src = KvCache::new(2, 3, 8, 256);
        src.fill_pseudo_random(100, 7).unwrap();
        let mut dst = KvCache::new(2, 3, 8, 256);
        let ranges = [0..32, 64..96, 97..100, 40..45];
        for r in &ranges {
            dst.append_from(&src, r.clone()).unwrap();
        }
        let from: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(dst.len(), from.len());
        for (q, &p) in from.iter().enumerate() {
            for layer in 0..2 {
                for head in 0..3 {
                    assert_eq!(
                        dst.entry(layer, head, q),
                        src.entry(layer, head, p),
                        "{q} <- {p}"
                    );
                }
            }
        }
        assert!(dst.append_from(&src, 90..101).is_err());
        let other = KvCache::new(2, 3, 16, 256);
        assert!(dst.append_from(&other, 0..0).is_err());
    }

    /// A block copied out and appended to another cache reproduces every
    /// entry; misaligned or oversized blocks are refused.
    #[test]
    fn blocks_round_trip_between_caches() {
        let mut a = KvCache::new(2, 3, 8, 128);
        a.fill_pseudo_random(50, 7).unwrap();
        let b0 = a.copy_block(0, 32).unwrap();
        let b1 = a.copy_block(32, 16).unwrap();
        assert_eq!(b0.positions(), 32);
        assert_eq!(b0.bytes(), 2 * 2 * 6 * 32 * 8);
        assert!(a.copy_block(8, 16).is_err());
        assert!(a.copy_block(48, 16).is_err());
        let mut c = KvCache::new(2, 3, 8, 128);
        c.append_block(&b0).unwrap();
        c.append_block(&b1).unwrap();
        assert_eq!(c.len(), 48);
        for layer in 0..2 {
            for head in 0..3 {
                for p in 0..48 {
                    assert_eq!(c.entry(layer, head, p), a.entry(layer, head, p));
                }
            }
        }
        // Another shape, or a cache not ending on a tile, is refused.
        let mut other = KvCache::new(2, 3, 4, 128);
        assert!(other.append_block(&b0).is_err());
        let mut odd = KvCache::new(2, 3, 8, 128);
        odd.fill_pseudo_random(5, 5).unwrap();
        assert!(odd.append_block(&b0).is_err());
        let mut small = KvCache::new(2, 3, 8, 40);
        small.append_block(&b0).unwrap();
        assert!(small.append_block(&b1).is_err());
        assert_eq!(small.len(), 32);
    }

    #[test]
    fn keep_compacts_the_accepted_entries() {
        let mut c = KvCache::new(1, 2, 2, 40);
        // Two heads: head 0 holds (x, x), head 1 holds (-x, -x).
        let rows = |xs: &[f32]| -> Vec<f32> { xs.iter().flat_map(|&x| [x, x, -x, -x]).collect() };
        c.begin(14).unwrap();
        let first: Vec<f32> = (1..=14).map(|x| x as f32).collect();
        c.write(0, &rows(&first), &rows(&first));
        c.keep_all();
        c.begin(6).unwrap();
        let tree = [20., 21., 22., 23., 24., 25.];
        c.write(0, &rows(&tree), &rows(&tree));
        // Kept entries cross the 16-position tile boundary.
        c.keep(&[0, 2, 3, 5]).unwrap();
        assert_eq!(c.len(), 18);
        let seen: Vec<f32> = (0..18).map(|p| c.entry(0, 0, p).0[1]).collect();
        let mut want = first.clone();
        want.extend([20., 22., 23., 25.]);
        assert_eq!(seen, want);
        for (p, w) in want.iter().enumerate() {
            let (k, v) = c.entry(0, 1, p);
            assert_eq!(k, vec![-w; 2]);
            assert_eq!(v, vec![-w; 2]);
        }
        let l = c.layer(0);
        assert_eq!(l.len(), 18);
        assert_eq!(l.keys(0).len(), 32 * 2);
        let v: Vec<f32> = l.values(1)[34..36].iter().map(|&b| from_f16(b)).collect();
        assert_eq!(v, [-25., -25.]);
        assert!(c.keep(&[0]).is_err(), "nothing pending");
        c.begin(2).unwrap();
        assert!(c.keep(&[1, 0]).is_err());
        assert!(c.keep(&[2]).is_err());
        c.truncate(3);
        assert_eq!(c.len(), 3);
        assert!(c.begin(38).is_err(), "over capacity");
    }
}
