//! The KV cache as an explicit object (not hidden inside layers), so the
//! engine can score a draft tree and then keep only the accepted path.
//!
//! Layout per layer: `[position][kv_head][head_dim]` f32, growing with the
//! sequence. A forward appends its N new entries after the `len()` committed
//! ones as *pending*; `keep(indices)` then moves the listed pending entries
//! to sit contiguously after the committed prefix and drops the rest. The
//! committed prefix is never copied.

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct KvCache {
    n_layers: usize,
    /// Floats per position per layer: kv_heads * head_dim.
    row: usize,
    capacity: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    committed: usize,
    pending: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions. Memory is reserved lazily
    /// (the vectors grow with the sequence).
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCache {
            n_layers,
            row: n_kv_heads * head_dim,
            capacity,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
            committed: 0,
            pending: 0,
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

    /// Starts a forward of `n` new entries: drops any earlier pending ones and
    /// makes room. Fails when the context is full.
    pub(crate) fn begin(&mut self, n: usize) -> Result<()> {
        let need = self.committed + n;
        if need > self.capacity {
            return Err(Error::ContextLength {
                prompt: need,
                context: self.capacity,
                reserve: 0,
            });
        }
        let floats = need * self.row;
        for l in 0..self.n_layers {
            self.k[l].resize(floats, 0.0);
            self.v[l].resize(floats, 0.0);
        }
        self.pending = n;
        Ok(())
    }

    /// Writes pending entries of one layer: `k`, `v` hold `pending()` rows.
    /// Values are rounded to f16 precision: llama.cpp's default cache type is
    /// f16, and matching its rounding keeps our greedy output on its path
    /// (measured on the golden records: without it SmolLM2 left llama.cpp's
    /// path at a 0.09 top-2 margin). Storage stays f32 so the attention
    /// loops need no conversion.
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let start = self.committed * self.row;
        let end = start + self.pending * self.row;
        for (d, s) in self.k[layer][start..end].iter_mut().zip(k) {
            *d = half::f16::from_f32(*s).to_f32();
        }
        for (d, s) in self.v[layer][start..end].iter_mut().zip(v) {
            *d = half::f16::from_f32(*s).to_f32();
        }
    }

    /// Keys and values of one layer for committed + pending positions.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let end = (self.committed + self.pending) * self.row;
        (&self.k[layer][..end], &self.v[layer][..end])
    }

    /// Commits the pending entries listed in `indices` (ascending indices into
    /// the last forward's tokens, e.g. the accepted root-to-leaf path) and
    /// drops the others.
    pub fn keep(&mut self, indices: &[usize]) -> Result<()> {
        if indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid("KvCache::keep needs ascending indices".into()));
        }
        if let Some(&last) = indices.last() {
            if last >= self.pending {
                return Err(Error::Invalid(format!(
                    "KvCache::keep index {last} but only {} entries are pending",
                    self.pending
                )));
            }
        }
        let row = self.row;
        let base = self.committed;
        for (dst, &src) in indices.iter().enumerate() {
            if dst != src {
                // src > dst, so a forward copy never overwrites an entry still to move.
                for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
                    buf.copy_within((base + src) * row..(base + src + 1) * row, (base + dst) * row);
                }
            }
        }
        self.committed += indices.len();
        self.pending = 0;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.truncate(self.committed * row);
        }
        Ok(())
    }

    /// Commits every pending entry (prefill, plain decoding).
    pub fn keep_all(&mut self) {
        self.committed += self.pending;
        self.pending = 0;
    }

    /// Forgets everything after `len` committed positions.
    pub fn truncate(&mut self, len: usize) {
        self.committed = self.committed.min(len);
        self.pending = 0;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.truncate(self.committed * self.row);
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by the cache now.
    pub fn memory_bytes(&self) -> usize {
        self.k.iter().chain(self.v.iter()).map(|b| b.capacity() * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_compacts_the_accepted_entries() {
        let mut c = KvCache::new(1, 1, 2, 16);
        c.begin(2).unwrap();
        c.write(0, &[1., 1., 2., 2.], &[1., 1., 2., 2.]);
        c.keep_all();
        c.begin(4).unwrap();
        c.write(0, &[10., 10., 11., 11., 12., 12., 13., 13.], &[0.; 8]);
        c.keep(&[0, 2, 3]).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.layer(0).0, &[1., 1., 2., 2., 10., 10., 12., 12., 13., 13.]);
        assert!(c.keep(&[0]).is_err(), "nothing pending");
        c.begin(2).unwrap();
        assert!(c.keep(&[1, 0]).is_err());
        assert!(c.keep(&[2]).is_err());
        c.truncate(3);
        assert_eq!(c.len(), 3);
        assert!(c.begin(14).is_err(), "over capacity");
    }
}
