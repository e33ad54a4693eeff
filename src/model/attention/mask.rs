//! The tree attention mask: which new tokens each new token sees.

/// Which of the N new tokens each new token may see: bit `j` of row `i` is set
/// when `j` is `i` or one of its ancestors. Rows are `words` u64 long.
pub struct TreeMask {
    n: usize,
    words: usize,
    bits: Vec<u64>,
}

impl TreeMask {
    /// From parent links (`None` = attends only to the cache). Parents must
    /// come before their children.
    pub fn from_parents(parents: &[Option<usize>]) -> Self {
        let n = parents.len();
        let words = n.div_ceil(64).max(1);
        let mut bits = vec![0u64; n * words];
        for i in 0..n {
            if let Some(p) = parents[i] {
                debug_assert!(p < i);
                let (lo, hi) = bits.split_at_mut(i * words);
                hi[..words].copy_from_slice(&lo[p * words..(p + 1) * words]);
            }
            bits[i * words + i / 64] |= 1 << (i % 64);
        }
        TreeMask { n, words, bits }
    }

    /// The new tokens `i` sees (its ancestors and itself) in slot order,
    /// which is depth order: the one at index t sits at sequence position
    /// `cache end + t`.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        (0..=i).filter(|&j| self.sees(i, j)).collect()
    }

    #[inline]
    pub fn sees(&self, i: usize, j: usize) -> bool {
        self.bits[i * self.words + j / 64] >> (j % 64) & 1 == 1
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}
