//! Collects draft nodes in any order (best-first, merged sources) and emits
//! them as a [`DraftTree`] in the BFS order the scorer needs.

use crate::draft::{DraftTree, Proposal};

/// An unordered tree under construction. Node 0 is the root; a parent is
/// always added before its children, siblings never share a token.
#[derive(Debug, Clone, Default)]
pub struct TreeBuilder {
    tokens: Vec<u32>,
    parents: Vec<usize>,
    depths: Vec<usize>,
    order: Vec<usize>,
    new_index: Vec<usize>,
    /// Sampled children, `node` in this builder's numbering.
    proposals: Vec<Proposal>,
}

impl TreeBuilder {
    pub fn new(root: u32) -> Self {
        let mut b = TreeBuilder::default();
        b.reset(root);
        b
    }

    /// Starts over with a new root, keeping the allocations.
    pub fn reset(&mut self, root: u32) {
        self.tokens.clear();
        self.parents.clear();
        self.depths.clear();
        self.tokens.push(root);
        self.parents.push(0);
        self.depths.push(0);
        self.proposals.clear();
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn token(&self, node: usize) -> u32 {
        self.tokens[node]
    }

    /// The parent of `node` (the root is its own parent).
    pub fn parent(&self, node: usize) -> usize {
        self.parents[node]
    }

    /// The child of `parent` carrying `token`, if any. A scan: trees are a
    /// few dozen nodes.
    pub fn child(&self, parent: usize, token: u32) -> Option<usize> {
        (parent + 1..self.tokens.len())
            .find(|&i| self.parents[i] == parent && self.tokens[i] == token)
    }

    /// Adds a child of `parent` without checking for a sibling with the same
    /// token (callers check with [`TreeBuilder::child`]).
    pub fn add(&mut self, parent: usize, token: u32) -> usize {
        debug_assert!(parent < self.tokens.len());
        self.tokens.push(token);
        self.parents.push(parent);
        self.depths.push(self.depths[parent] + 1);
        self.tokens.len() - 1
    }

    /// Records that `proposal.node`'s children were sampled (the first
    /// proposal for a node wins: a second sampling source's tokens stay as
    /// ordinary children, which the verifier treats as chosen).
    pub fn add_proposal(&mut self, proposal: Proposal) {
        debug_assert!(proposal.node < self.tokens.len());
        if !self.proposals.iter().any(|p| p.node == proposal.node) {
            self.proposals.push(proposal);
        }
    }

    /// Where `node` went in the tree the last [`TreeBuilder::build`] emitted.
    pub fn built_index(&self, node: usize) -> usize {
        self.new_index[node]
    }

    /// Emits the nodes in BFS order: by depth, insertion order within a depth.
    pub fn build(&mut self) -> DraftTree {
        let n = self.tokens.len();
        self.order.clear();
        self.order.extend(0..n);
        let depths = &self.depths;
        self.order.sort_by_key(|&i| depths[i]);
        self.new_index.clear();
        self.new_index.resize(n, 0);
        for (new, &old) in self.order.iter().enumerate() {
            self.new_index[old] = new;
        }
        let mut tree = DraftTree::root(self.tokens[0]);
        for &old in &self.order[1..] {
            tree.push(self.new_index[self.parents[old]], self.tokens[old]);
        }
        tree.proposals = self
            .proposals
            .drain(..)
            .map(|p| Proposal {
                node: self.new_index[p.node],
                ..p
            })
            .collect();
        tree
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorders_best_first_insertions_into_bfs() {
        let mut b = TreeBuilder::new(9);
        let a = b.add(0, 1);
        let aa = b.add(a, 2);
        b.add(aa, 3);
        let c = b.add(0, 4);
        b.add(c, 5);
        assert_eq!(b.child(0, 4), Some(c));
        assert_eq!(b.child(a, 4), None);
        let t = b.build();
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![9, 1, 4, 2, 5, 3]);
        assert_eq!(
            t.parents,
            vec![None, Some(0), Some(0), Some(1), Some(2), Some(3)]
        );
        b.reset(7);
        assert_eq!(b.build(), DraftTree::root(7));
    }

    #[test]
    fn proposals_follow_their_node_into_bfs_order() {
        let mut b = TreeBuilder::new(9);
        let a = b.add(0, 1);
        let aa = b.add(a, 2);
        let c = b.add(0, 4); // before aa in BFS order
        let prop = |node, drawn: Vec<u32>| Proposal {
            node,
            dist: vec![(2, 0.5), (3, 0.3), (6, 0.2)],
            drawn,
        };
        b.add_proposal(prop(c, vec![6, 3]));
        b.add_proposal(prop(c, vec![2])); // a second source at `c`: ignored
        b.add(c, 6);
        let t = b.build();
        t.validate().unwrap();
        assert_eq!(t.tokens, vec![9, 1, 4, 2, 6]);
        assert_eq!((a, aa, c), (1, 2, 3));
        // `c` is node 2 of the tree: its proposal moved with it.
        assert_eq!(t.proposals, vec![prop(2, vec![6, 3])]);
        b.reset(7);
        assert!(b.build().proposals.is_empty());
    }
}
