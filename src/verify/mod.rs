//! The verifier: given a draft tree and the model's logits for every node,
//! decides which root-to-leaf path the model itself would have produced.
//!
//! At each visited node it draws ONE token from the target's processed
//! distribution (the same [`Sampler`] plain decoding uses; with greedy
//! decoding that is the argmax). If a child carries that token, it descends;
//! otherwise that token is emitted as the bonus token and the walk stops.
//! Every emitted token is thus exactly a draw from the target model given
//! the accepted prefix, which is why this is lossless for deterministic
//! drafts (one draw per visited node, never one per root-to-leaf path).

use crate::draft::DraftTree;
use crate::model::Logits;
use crate::sampling::Sampler;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Accepted node indices, root first (`path.len() - 1` drafted tokens accepted).
    pub path: Vec<usize>,
    /// Tokens to emit: the accepted draft tokens, then the bonus token.
    pub emitted: Vec<u32>,
}

impl Verdict {
    pub fn accepted_drafts(&self) -> usize {
        self.path.len() - 1
    }

    /// The last emitted token: the root of the next tree.
    pub fn next_root(&self) -> u32 {
        *self.emitted.last().expect("a verdict always emits a token")
    }
}

/// `context`: the sequence so far with the tree's root last (used by the
/// repetition penalty). It is restored before returning.
pub fn verify(
    tree: &DraftTree,
    logits: &Logits,
    sampler: &mut Sampler,
    context: &mut Vec<u32>,
) -> Verdict {
    let restore = context.len();
    let mut node = 0;
    let mut path = vec![0];
    let mut emitted = Vec::new();
    loop {
        let token = sampler.sample(logits.row(node), context);
        emitted.push(token);
        match tree.child_with_token(node, token) {
            Some(child) => {
                path.push(child);
                context.push(token);
                node = child;
            }
            None => break,
        }
    }
    context.truncate(restore);
    Verdict { path, emitted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn logits(rows: &[u32], vocab: usize) -> Logits {
        let mut data = vec![0f32; rows.len() * vocab];
        for (i, &t) in rows.iter().enumerate() {
            data[i * vocab + t as usize] = 5.0;
        }
        Logits {
            data,
            rows: rows.len(),
            vocab,
        }
    }

    #[test]
    fn greedy_follows_the_argmax_path() {
        // root(9) -> a(1) -> c(3); root -> b(2)
        let mut t = DraftTree::root(9);
        let a = t.push(0, 1);
        let _b = t.push(0, 2);
        let c = t.push(a, 3);
        // argmax: root→1, a→3, b→0, c→4
        let l = logits(&[1, 3, 0, 4], 10);
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut ctx = vec![9];
        let v = verify(&t, &l, &mut s, &mut ctx);
        assert_eq!(v.path, vec![0, a, c]);
        assert_eq!(v.emitted, vec![1, 3, 4]);
        assert_eq!(v.accepted_drafts(), 2);
        assert_eq!(ctx, vec![9]);
        // argmax at the root matches no child: only the bonus token.
        let l = logits(&[7, 3, 0, 4], 10);
        let v = verify(&t, &l, &mut s, &mut ctx);
        assert_eq!((v.path, v.emitted), (vec![0], vec![7]));
    }
}
