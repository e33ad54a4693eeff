//! The tree attention mask: which new tokens each new token sees.

/// Which of the N new tokens each new token may see: itself and its
/// ancestors, kept as one list per token (built once per forward, read by
/// every layer).
pub struct TreeMask {
    /// Token i's list is `seen[start[i]..start[i + 1]]`, in slot order.
    seen: Vec<usize>,
    start: Vec<usize>,
}

impl TreeMask {
    /// From parent links (`None` = attends only to the cache). Parents must
    /// come before their children.
    pub fn from_parents(parents: &[Option<usize>]) -> Self {
        let mut seen = Vec::new();
        let mut start = Vec::with_capacity(parents.len() + 1);
        start.push(0);
        for (i, &parent) in parents.iter().enumerate() {
            if let Some(p) = parent {
                debug_assert!(p < i);
                seen.extend_from_within(start[p]..start[p + 1]);
            }
            seen.push(i);
            start.push(seen.len());
        }
        TreeMask { seen, start }
    }

    /// The new tokens `i` sees (its ancestors and itself) in slot order,
    /// which is depth order: the one at index t sits at sequence position
    /// `cache end + t`.
    pub fn ancestors(&self, i: usize) -> &[usize] {
        &self.seen[self.start[i]..self.start[i + 1]]
    }

    pub fn sees(&self, i: usize, j: usize) -> bool {
        self.ancestors(i).binary_search(&j).is_ok()
    }

    pub fn len(&self) -> usize {
        self.start.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
