//! The verifier: given a draft tree and the model's logits for every node,
//! decides which root-to-leaf path the model itself would have produced.
//!
//! At each visited node it draws ONE token from the target's processed
//! distribution (the same [`Sampler`] plain decoding uses; with greedy
//! decoding that is the argmax). If a child carries that token, it descends;
//! otherwise that token is emitted as the bonus token and the walk stops.
//! Every emitted token is thus exactly a draw from the target model given
//! the accepted prefix, which is why this is lossless for drafts chosen
//! without looking at the target (one draw per visited node, never one per
//! root-to-leaf path): seed for seed, it emits what plain sampling emits.
//!
//! Where a drafter *sampled* a node's children from its own distribution q
//! (a draft model under sampling: [`Proposal`]), that draw is replaced by
//! recursive rejection sampling over the drawn candidates (SpecInfer's
//! multi-round speculative sampling, in the without-replacement form of
//! Jeon et al., "Recursive Speculative Decoding", 2024): candidate c_i is
//! accepted with probability min(1, p_i(c_i) / q_i(c_i)); on a rejection the
//! target moves to the residual p_{i+1} = norm(max(0, p_i - q_i)) and the
//! proposal to q_{i+1} = q_i without c_i, renormalized (c_i was drawn without
//! replacement, so that is the distribution the next candidate came from);
//! when every candidate is rejected, the token is drawn from the last
//! residual. By the usual speculative-sampling argument each round emits
//! exactly a draw from p_i, so the node emits a draw from p: the target's
//! distribution, while accepting a candidate with probability about
//! 1 - TV(p, q) instead of p(c) for a chosen one.

use crate::draft::{DraftTree, Proposal};
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
        let row = logits.row(node);
        let token = match tree.proposal(node) {
            Some(p) if !sampler.params().is_greedy() => {
                draw_against_proposal(sampler, row, context, p, EXACT)
            }
            _ => sampler.sample(row, context),
        };
        emitted.push(token);
        match tree.child_with_token(node, token) {
            Some(child) => {
                path.push(child);
                context.push(token);
                node = child;
            }
            // A drawn candidate that the budget left out of the tree is
            // accepted all the same, as the step's last token.
            None => break,
        }
    }
    context.truncate(restore);
    Verdict { path, emitted }
}

/// The rejection rule as two switches, both on for the exact rule; the
/// tests turn one off to show that the distribution test catches it.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// On a rejection, move the target to the residual max(0, p - q).
    residual: bool,
    /// On a rejection, drop the candidate from q (it was drawn without
    /// replacement).
    without_replacement: bool,
}

const EXACT: Rule = Rule {
    residual: true,
    without_replacement: true,
};

/// One token from the target's processed distribution at this node, using
/// the candidates drawn from `proposal` (module docs).
fn draw_against_proposal(
    sampler: &mut Sampler,
    row: &[f32],
    context: &[u32],
    proposal: &Proposal,
    rule: Rule,
) -> u32 {
    let vocab = row.len();
    // Dense: one pass over the vocabulary per rejection is nothing beside
    // the forward that produced `row`.
    let mut p = vec![0f32; vocab];
    for &(id, pr) in sampler.processed(row, context).iter() {
        p[id as usize] = pr;
    }
    let mut q = vec![0f32; vocab];
    for &(id, pr) in &proposal.dist {
        if (id as usize) < vocab {
            q[id as usize] = pr.max(0.0);
        }
    }
    for &c in &proposal.drawn {
        let c = c as usize;
        if c >= vocab || q[c] <= 0.0 {
            // Not a draw from `dist`: the remaining candidates carry no
            // information the fall-through draw below lacks.
            break;
        }
        if sampler.uniform() * q[c] < p[c] {
            return c as u32;
        }
        if rule.residual {
            let mass: f32 = p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).sum();
            if mass <= 1e-9 {
                // p == q up to rounding, where a rejection had probability
                // ~0: nothing left to correct.
                break;
            }
            for (a, b) in p.iter_mut().zip(&q) {
                *a = (*a - *b).max(0.0) / mass;
            }
        }
        if rule.without_replacement {
            q[c] = 0.0;
            let rest: f32 = q.iter().sum();
            if rest <= 0.0 {
                break;
            }
            q.iter_mut().for_each(|x| *x /= rest);
        }
    }
    sampler.draw_weighted(&p) as u32
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

    // ---- rejection sampling over drawn candidates ----

    /// Target p at the root and at child `a`, the drafter's q at both.
    const P_ROOT: [f32; 6] = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04];
    const Q_ROOT: [f32; 6] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.25];
    const P_A: [f32; 6] = [0.1, 0.1, 0.5, 0.1, 0.1, 0.1];
    const Q_A: [f32; 6] = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1];

    fn ln(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    /// `m` tokens drawn from `q` without replacement.
    fn draw(q: &[f32], m: usize, rng: &mut Sampler) -> Vec<u32> {
        let mut w = q.to_vec();
        (0..m)
            .map(|_| {
                let i = rng.draw_weighted(&w);
                w[i] = 0.0;
                i as u32
            })
            .collect()
    }

    fn proposal(node: usize, q: &[f32], drawn: Vec<u32>) -> Proposal {
        Proposal {
            node,
            dist: q.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect(),
            drawn,
        }
    }

    /// One step of a drafter that samples: 3 candidates from q at the root
    /// (the first two are nodes, the third was cut by the budget), a chosen
    /// node beside them (token 5 unless drawn), and 2 candidates from q_a
    /// under the first drawn node `a`. Returns the first token, and the
    /// second one when the walk descended into `a`.
    fn one_step(
        sampler: &mut Sampler,
        drafter_rng: &mut Sampler,
        rule: Rule,
    ) -> (u32, Option<u32>) {
        let drawn = draw(&Q_ROOT, 3, drafter_rng);
        let mut t = DraftTree::root(9);
        let a = t.push(0, drawn[0]);
        t.push(0, drawn[1]);
        if !drawn.contains(&5) {
            t.push(0, 5);
        }
        let drawn_a = draw(&Q_A, 2, drafter_rng);
        for &x in &drawn_a {
            t.push(a, x);
        }
        t.proposals.push(proposal(0, &Q_ROOT, drawn));
        t.proposals.push(proposal(a, &Q_A, drawn_a));
        t.validate().unwrap();
        // Rows: the root, then a; the others' rows only serve walks that
        // this test does not measure past their first token.
        let mut data = ln(&P_ROOT);
        data.extend(ln(&P_A));
        for _ in 2..t.len() {
            data.extend(ln(&P_ROOT));
        }
        let l = Logits {
            data,
            rows: t.len(),
            vocab: 6,
        };
        // The walk of `verify`, with the rule under test.
        let at = |node: usize, s: &mut Sampler| match t.proposal(node) {
            Some(p) => draw_against_proposal(s, l.row(node), &[9], p, rule),
            None => s.sample(l.row(node), &[9]),
        };
        let first = at(0, sampler);
        let second = (t.child_with_token(0, first) == Some(a)).then(|| at(a, sampler));
        (first, second)
    }

    /// TV between the empirical first token and p at the root, and between
    /// the second token after `a` and p_a (conditional on reaching `a`).
    fn tv_of(rule: Rule, n: usize) -> (f64, f64, usize) {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let mut sampler = Sampler::new(params.clone());
        let mut drafter = Sampler::new(SamplingParams { seed: 8, ..params });
        let (mut first, mut second, mut reached) = ([0usize; 6], [0usize; 6], 0);
        for _ in 0..n {
            let (x, y) = one_step(&mut sampler, &mut drafter, rule);
            first[x as usize] += 1;
            if let Some(y) = y {
                second[y as usize] += 1;
                reached += 1;
            }
        }
        let tv = |c: &[usize; 6], p: &[f32; 6], m: usize| {
            c.iter()
                .zip(p)
                .map(|(&k, &x)| (k as f64 / m as f64 - x as f64).abs())
                .sum::<f64>()
                / 2.0
        };
        (
            tv(&first, &P_ROOT, n),
            tv(&second, &P_A, reached.max(1)),
            reached,
        )
    }

    #[test]
    fn rejection_over_drawn_candidates_keeps_the_target_distribution() {
        let n = 60_000;
        // Bretagnolle–Huber–Carol: P(||p̂ − p||₁ ≥ λ) ≤ 2^K e^{−nλ²/2},
        // K = 6 outcomes, failure probability 1e-4.
        let bound = |n: usize| (2.0 * (6.0 * 2f64.ln() + 1e4f64.ln()) / n as f64).sqrt() / 2.0;
        let (root, a, reached) = tv_of(EXACT, n);
        println!("exact: TV root {root:.4} (bound {:.4}), TV after a {a:.4} over {reached} (bound {:.4})", bound(n), bound(reached));
        assert!(
            root < bound(n),
            "the root's token is not a draw from p: TV {root}"
        );
        assert!(reached > 5_000, "the walk should often descend: {reached}");
        assert!(
            a < bound(reached),
            "the second token is not a draw from p_a: TV {a}"
        );
        for (name, rule) in [
            (
                "no residual",
                Rule {
                    residual: false,
                    ..EXACT
                },
            ),
            (
                "with-replacement q",
                Rule {
                    without_replacement: false,
                    ..EXACT
                },
            ),
        ] {
            let (root, _, _) = tv_of(rule, n);
            println!("{name}: TV root {root:.4}");
            assert!(
                root > bound(n),
                "the test cannot tell the {name} rule: TV {root}"
            );
        }
    }

    #[test]
    fn a_proposal_is_accepted_more_often_than_a_point_mass() {
        // p = q: every first candidate is accepted (min(1, p/q) = 1), where
        // the same token chosen rather than drawn is kept with p(c) < 1.
        let params = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(params.clone());
        let mut d = Sampler::new(SamplingParams { seed: 4, ..params });
        let row = ln(&P_ROOT);
        for _ in 0..1000 {
            let drawn = draw(&P_ROOT, 1, &mut d);
            let p = proposal(0, &P_ROOT, drawn.clone());
            assert_eq!(
                draw_against_proposal(&mut s, &row, &[], &p, EXACT),
                drawn[0]
            );
        }
    }
}
