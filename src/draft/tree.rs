//! `DraftTree`: what a drafter proposes and the scorer runs through the model.
//!
//! Node 0 is the *root*: the last token the engine has produced but not yet
//! run through the model (it has no KV entry yet). Its logits predict the
//! first draft level. Every other node is a guessed continuation of its
//! parent. Nodes are stored in BFS order: a parent always comes before its
//! children, and depth never decreases along the vector. Plain decoding is the
//! tree with only a root.

use crate::error::{Error, Result};

/// Children that a drafter *sampled* at `node` from its own distribution
/// (a draft model under sampling) rather than chose: the verifier accepts
/// them by rejection sampling against `dist` ([`crate::verify`]), which
/// keeps the target's distribution while accepting far more often than a
/// chosen token's own probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub node: usize,
    /// The distribution drawn from: (token, probability), summing to 1.
    pub dist: Vec<(u32, f32)>,
    /// Tokens drawn from `dist` without replacement, in draw order. A drawn
    /// token need not be a child of `node` (the budget may have cut it):
    /// the verifier may still accept it, as the step's last token. What is
    /// drawn must not depend on what the budget then keeps.
    pub drawn: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    /// Token of each node; `tokens[0]` is the root.
    pub tokens: Vec<u32>,
    /// Parent of each node (`None` only for the root).
    pub parents: Vec<Option<usize>>,
    /// Depth of each node (root = 0). A node sits at position `cache_len + depth`.
    pub depths: Vec<usize>,
    /// Nodes whose children were sampled (empty for chosen drafts).
    pub proposals: Vec<Proposal>,
}

impl DraftTree {
    /// A tree holding only the root: plain decoding.
    pub fn root(token: u32) -> Self {
        DraftTree {
            tokens: vec![token],
            parents: vec![None],
            depths: vec![0],
            proposals: Vec::new(),
        }
    }

    /// Adds a child of `parent`; returns its index. Callers keep BFS order by
    /// adding nodes level by level (checked by [`DraftTree::validate`]).
    pub fn push(&mut self, parent: usize, token: u32) -> usize {
        debug_assert!(parent < self.tokens.len());
        self.tokens.push(token);
        self.parents.push(Some(parent));
        self.depths.push(self.depths[parent] + 1);
        self.tokens.len() - 1
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of draft nodes (everything but the root).
    pub fn num_drafted(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }

    pub fn max_depth(&self) -> usize {
        self.depths.last().copied().unwrap_or(0)
    }

    /// Index of the child of `node` that carries `token`, if any.
    pub fn child_with_token(&self, node: usize, token: u32) -> Option<usize> {
        // Children come after their parent; trees are small (<= a few hundred
        // nodes), so a scan beats maintaining child lists.
        (node + 1..self.tokens.len())
            .find(|&i| self.parents[i] == Some(node) && self.tokens[i] == token)
    }

    /// The sampled children of `node`, if a drafter sampled them.
    pub fn proposal(&self, node: usize) -> Option<&Proposal> {
        self.proposals.iter().find(|p| p.node == node)
    }

    /// Indices of `node`'s children, in order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        (node + 1..self.tokens.len()).filter(move |&i| self.parents[i] == Some(node))
    }

    /// Path from the root to `node`, root first.
    pub fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut cur = node;
        while let Some(p) = self.parents[cur] {
            path.push(p);
            cur = p;
        }
        path.reverse();
        path
    }

    /// Checks the invariants the scorer relies on.
    pub fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(Error::Draft("a tree needs a root".into()));
        }
        if self.parents.len() != n || self.depths.len() != n {
            return Err(Error::Draft(
                "tokens, parents and depths differ in length".into(),
            ));
        }
        if self.parents[0].is_some() || self.depths[0] != 0 {
            return Err(Error::Draft("node 0 must be the root".into()));
        }
        for i in 1..n {
            let p =
                self.parents[i].ok_or_else(|| Error::Draft(format!("node {i} has no parent")))?;
            if p >= i {
                return Err(Error::Draft(format!(
                    "node {i} comes before its parent {p}"
                )));
            }
            if self.depths[i] != self.depths[p] + 1 {
                return Err(Error::Draft(format!("node {i} has a wrong depth")));
            }
            if self.depths[i] < self.depths[i - 1] {
                return Err(Error::Draft(format!("node {i} breaks BFS order")));
            }
            if self.child_with_token(p, self.tokens[i]) != Some(i) {
                return Err(Error::Draft(format!(
                    "node {i} duplicates a sibling's token {}",
                    self.tokens[i]
                )));
            }
        }
        for (k, p) in self.proposals.iter().enumerate() {
            if p.node >= n || self.proposals[..k].iter().any(|o| o.node == p.node) {
                return Err(Error::Draft(format!(
                    "proposal {k} names node {} twice or out of the tree",
                    p.node
                )));
            }
            for (j, t) in p.drawn.iter().enumerate() {
                if p.drawn[..j].contains(t) || !p.dist.iter().any(|d| d.0 == *t && d.1 > 0.0) {
                    return Err(Error::Draft(format!(
                        "token {t} drawn at node {} twice or outside its distribution",
                        p.node
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_query() {
        let mut t = DraftTree::root(7);
        let a = t.push(0, 1);
        let b = t.push(0, 2);
        let c = t.push(a, 3);
        t.validate().unwrap();
        assert_eq!(t.child_with_token(0, 2), Some(b));
        assert_eq!(t.child_with_token(0, 3), None);
        assert_eq!(t.path_to(c), vec![0, a, c]);
        assert_eq!(t.children(0).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(t.max_depth(), 2);
        assert_eq!(t.num_drafted(), 3);
    }

    #[test]
    fn rejects_bad_trees() {
        let mut t = DraftTree::root(7);
        t.push(0, 1);
        t.push(0, 1);
        assert!(t.validate().is_err(), "duplicate siblings");
        let mut t = DraftTree::root(7);
        let a = t.push(0, 1);
        t.push(a, 2);
        t.push(0, 3);
        assert!(t.validate().is_err(), "not BFS");
    }
}
