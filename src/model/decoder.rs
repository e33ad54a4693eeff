//! The decoder shared by Llama, Qwen2, Qwen3, Phi-3 and Gemma 2, and its one
//! entry point: a forward over N new tokens arranged as a tree, returning
//! logits for the rows asked.
//!
//! Per layer (pre-norm transformer):
//!   h = x + Wo · Attn(RoPE(Q), RoPE(K), Wv·n),  n = RMSNorm(x)
//!   x' = h + Wdown · (SiLU(Wgate·m) ⊙ Wup·m),   m = RMSNorm(h)
//! with Q = Wq·n and K = Wk·n, each head RMS-normalised first where the
//! architecture says so (Qwen3's q/k norms), and logits = Wout · RMSNorm(x_L).
//! Gemma 2's differences are parameters of the same path: x_0 scaled by
//! √hidden, the attention and FFN outputs RMS-normalised before their adds,
//! GELU for SiLU, and scores and logits soft-capped (c · tanh(s / c)).

use super::attention::{
    mass_by_chunk, tree_attention_in_window, AttentionShape, ScoreRule, TreeMask,
};
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Linear, Projections};
use super::ops::{add, gelu_tanh_mul, rms_norm, silu_mul, Rope};
use super::profile::{Clock, Stage};
use crate::error::{Error, Result};
use crate::kernels::OutPtr;

/// Activation buffers reused from one layer and one forward to the next
/// (per thread): a fresh allocation per projection cost page faults and
/// zeroing that grew with N.
#[derive(Default)]
struct Work {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    part: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    gate_up: Vec<f32>,
    gate: Vec<f32>,
    heads: Vec<f32>,
    attn: Vec<f32>,
}

thread_local! {
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::default();
    /// The buffer of the last [`Logits`] dropped on this thread, for the next
    /// forward's: a verify pass's logits are N × vocab floats (9.7 MB at N =
    /// 16 for a 152k vocabulary), and a fresh allocation paid a page fault
    /// per 4 KB and the zeroing again every step.
    static SPARE_LOGITS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K, V projections of the normed input (one stacked matmul).
    pub qkv: Projections,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    /// Gate and up projections (one stacked matmul).
    pub gate_up: Projections,
    pub w_down: Linear,
    /// Per-head RMSNorm weights of q and k (Qwen3), applied before RoPE.
    pub qk_norm: Option<QkNorm>,
    /// RMSNorms of the attention and FFN outputs (Gemma 2).
    pub post_norms: Option<PostNorms>,
}

/// Gemma 2's RMSNorm weights for the attention output and the FFN output.
pub struct PostNorms {
    pub attn: Vec<f32>,
    pub ffn: Vec<f32>,
}

/// Qwen3's per-head RMSNorm weights (`head_dim` each).
pub struct QkNorm {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

impl Layer {
    pub fn new(
        attn_norm: Vec<f32>,
        [wq, wk, wv]: [Linear; 3],
        wo: Linear,
        ffn_norm: Vec<f32>,
        [w_gate, w_up]: [Linear; 2],
        w_down: Linear,
    ) -> Layer {
        Layer::from_projections(
            attn_norm,
            Projections::new(vec![wq, wk, wv]),
            wo,
            ffn_norm,
            Projections::new(vec![w_gate, w_up]),
            w_down,
        )
    }

    /// A layer whose q/k/v and gate/up projections are already combined
    /// (fused in the file, as Phi-3 stores them).
    pub fn from_projections(
        attn_norm: Vec<f32>,
        qkv: Projections,
        wo: Linear,
        ffn_norm: Vec<f32>,
        gate_up: Projections,
        w_down: Linear,
    ) -> Layer {
        Layer {
            attn_norm,
            qkv,
            wo,
            ffn_norm,
            gate_up,
            w_down,
            qk_norm: None,
            post_norms: None,
        }
    }
}

/// `out[r] = act(gate[r]) · up[r]` for rows `[gate | up]` of `gate_up`
/// (`f` wide each), act = SiLU or (`gelu`) GELU, spread over the kernels'
/// pool when there is enough of it: at 16 rows of a 1.5B model this is
/// millions of exponentials.
fn gated_ffn(gate_up: &[f32], f: usize, gelu: bool, out: &mut Vec<f32>) {
    /// Elements per unit of work; below two units it runs here.
    const SPAN: usize = 4096;
    let rows = gate_up.len() / (2 * f);
    out.resize(rows * f, 0.0);
    let spans = f.div_ceil(SPAN);
    let dst = OutPtr(out.as_mut_ptr());
    let work = |units: std::ops::Range<usize>| {
        for u in units {
            let (r, c0) = (u / spans, u % spans * SPAN);
            let len = SPAN.min(f - c0);
            let row = &gate_up[r * 2 * f..(r + 1) * 2 * f];
            // SAFETY: each unit writes its own span of `out`, which
            // outlives the call.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * f + c0), len) };
            o.copy_from_slice(&row[c0..c0 + len]);
            if gelu {
                gelu_tanh_mul(o, &row[f + c0..f + c0 + len]);
            } else {
                silu_mul(o, &row[f + c0..f + c0 + len]);
            }
        }
    };
    crate::kernels::parallel_for(rows * spans, 1, &work);
}

/// Copies column range `cols` of each `width`-wide row of `src` into `dst`
/// (resized to `rows` rows of `cols.len()`).
fn columns(src: &[f32], width: usize, cols: std::ops::Range<usize>, dst: &mut Vec<f32>) {
    let rows = src.len() / width;
    dst.resize(rows * cols.len(), 0.0);
    for (d, s) in dst
        .chunks_exact_mut(cols.len())
        .zip(src.chunks_exact(width))
    {
        d.copy_from_slice(&s[cols.clone()]);
    }
}

/// The token embedding table, quantized (GGUF) or dense (HF).
pub enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense { table: Vec<f32>, dim: usize },
}

impl Embedding {
    fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(match self {
            Embedding::Quantized(t) => {
                let ids =
                    candle_core::Tensor::from_slice(ids, ids.len(), &candle_core::Device::Cpu)?;
                t.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?
            }
            Embedding::Dense { table, dim } => ids
                .iter()
                .flat_map(|&i| &table[i as usize * dim..(i as usize + 1) * dim])
                .copied()
                .collect(),
        })
    }
}

pub struct Decoder {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    pub lm_head: Linear,
    rope: Rope,
    /// Gemma 3's local layers' own rotation (base 10k, unscaled).
    rope_local: Option<Rope>,
}

/// Which rows of the forward need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token (scoring a draft tree).
    All,
    /// Only the last one (prefill).
    Last,
    /// None (prefill chunks before the last).
    None,
}

/// Logits of `rows` tokens, row-major `[rows, vocab]`.
#[derive(Debug, Clone)]
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Drop for Logits {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // Keep the larger of the two buffers (`try_with`: the thread may be
        // tearing down its locals).
        let _ = SPARE_LOGITS.try_with(|s| {
            let old = s.take();
            s.set(if data.capacity() >= old.capacity() {
                data
            } else {
                old
            });
        });
    }
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

impl Decoder {
    pub fn new(
        config: ModelConfig,
        embedding: Embedding,
        layers: Vec<Layer>,
        output_norm: Vec<f32>,
        lm_head: Linear,
    ) -> Result<Self> {
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.context_length.max(1),
            config.rope_interleaved,
            config.rope_freq_scale,
            config.rope_freq_factors.as_deref(),
        );
        let rope_local = config.rope_theta_local.map(|theta| {
            Rope::new(
                config.head_dim,
                theta,
                config.context_length.max(1),
                config.rope_interleaved,
                1.0,
                None,
            )
        });
        Ok(Decoder {
            config,
            embedding,
            layers,
            output_norm,
            lm_head,
            rope,
            rope_local,
        })
    }

    /// Bytes of weights one forward streams: every layer's projections and
    /// the LM head (the embedding table is only looked up, unless it is
    /// also the LM head).
    pub fn weight_bytes_per_forward(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes()
                    + l.wo.weight_bytes()
                    + l.gate_up.weight_bytes()
                    + l.w_down.weight_bytes()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// A cache sized for `capacity` positions (at most the trained context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            capacity.min(c.context_length),
        )
    }

    /// Runs N new tokens through the model.
    ///
    /// - `tokens[i]` sits at absolute position `positions[i]` (a tree node at
    ///   depth d under a root at the cache end sits at `cache.len() + d`);
    /// - `parents[i]` is its parent among the N (`None` = sees only the cache);
    ///   parents come before children;
    /// - new token i attends to the whole committed cache plus its ancestors
    ///   and itself.
    ///
    /// The N keys/values are appended to `cache` as pending entries (any
    /// earlier pending ones are dropped): follow with `cache.keep(path)` or
    /// `cache.keep_all()`.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        parents: &[Option<usize>],
        want: LogitRows,
    ) -> Result<Logits> {
        self.forward_segment(Segment {
            cache,
            tokens,
            positions,
            parents,
            want,
            extend: false,
            probe: None,
        })
    }

    /// Runs N more nodes of a tree whose earlier nodes are already pending
    /// in `cache` (a draft model growing its tree one depth per forward).
    /// `parents` covers the whole tree: `cache.pending()` earlier nodes, then
    /// the N new ones, each parent before its children. The N entries are
    /// appended after the pending ones.
    pub fn forward_extend(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        parents: &[Option<usize>],
        want: LogitRows,
    ) -> Result<Logits> {
        self.forward_segment(Segment {
            cache,
            tokens,
            positions,
            parents,
            want,
            extend: true,
            probe: None,
        })
    }

    /// The attention mass `query` (one row of a [`Segment::probe`]) puts on
    /// each chunk of `chunk` committed positions of `cache` at the last
    /// layer, averaged over heads: where the model looked, for a draft
    /// model's retrieval (SpecExtend). The last layer because its attention
    /// is the one closest to the prediction (SpecExtend reads the same).
    pub fn attention_mass(&self, cache: &KvCache, query: &[f32], chunk: usize) -> Vec<f32> {
        let c = &self.config;
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let rule = ScoreRule {
            scale: c.attn_scale,
            softcap: c.attn_softcap,
        };
        let last = self.layers.len().saturating_sub(1);
        mass_by_chunk(&shape, rule, query, &cache.layer(last), cache.len(), chunk)
    }

    /// Teacher forcing: the logits that follow each of `seq[from..]`, i.e.
    /// row `i` is the model's prediction of `seq[from + i + 1]` given
    /// `seq[..=from + i]`. Runs `seq` as a chain in chunks of `chunk` tokens
    /// in a fresh cache; what a golden-file comparison or a perplexity needs.
    pub fn teacher_forced(&self, seq: &[u32], from: usize, chunk: usize) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.new_cache(seq.len() + 1);
        let mut out = Vec::new();
        let mut start = 0;
        while start < seq.len() {
            let end = (start + chunk.max(1)).min(seq.len());
            let pos: Vec<usize> = (start..end).collect();
            let par: Vec<Option<usize>> = (0..end - start).map(|i| i.checked_sub(1)).collect();
            let want = if end > from {
                LogitRows::All
            } else {
                LogitRows::None
            };
            let l = self.forward(&mut cache, &seq[start..end], &pos, &par, want)?;
            cache.keep_all();
            for r in 0..l.rows {
                if start + r >= from {
                    out.push(l.row(r).to_vec());
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// [`Decoder::forward_batch`] of one segment.
    pub fn forward_segment(&self, seg: Segment<'_>) -> Result<Logits> {
        let mut segs = [seg];
        Ok(self.forward_batch(&mut segs)?.pop().expect("one segment"))
    }

    /// One forward over the new tokens of several sequences, each with its
    /// own cache (continuous batching): the projections run once over all
    /// rows, which is where a batch pays (the weights are streamed once,
    /// c(N) ≪ N·c(1)); attention runs per sequence, each row seeing only
    /// its own cache and tree. Every row's result is bit-identical to the
    /// same segment run alone (the kernels compute each row on its own),
    /// which is what keeps batched greedy decoding token-identical.
    /// Returns one [`Logits`] per segment, in order.
    pub fn forward_batch(&self, segs: &mut [Segment<'_>]) -> Result<Vec<Logits>> {
        let c = &self.config;
        if segs.is_empty() {
            return Ok(Vec::new());
        }
        for s in segs.iter() {
            self.check(s)?;
        }
        let mut masks = Vec::with_capacity(segs.len());
        let mut starts = Vec::with_capacity(segs.len() + 1);
        let (mut tokens, mut positions) = (Vec::new(), Vec::new());
        for s in segs.iter_mut() {
            if s.extend {
                s.cache.extend(s.tokens.len())?;
            } else {
                s.cache.begin(s.tokens.len())?;
            }
            masks.push(TreeMask::from_parents(s.parents));
            starts.push(tokens.len());
            tokens.extend_from_slice(s.tokens);
            positions.extend_from_slice(s.positions);
        }
        let n = tokens.len();
        starts.push(n);
        let rows = |i: usize| starts[i]..starts[i + 1];

        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let eps = c.rms_eps as f32;
        let mut clock = Clock::start();
        let mut x = self.embedding.lookup(&tokens)?; // [N][hidden]
        if c.embed_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= c.embed_scale);
        }
        let rule = ScoreRule {
            scale: c.attn_scale,
            softcap: c.attn_softcap,
        };
        WORK.with_borrow_mut(|w| {
            w.normed.resize(x.len(), 0.0);
            for (l, layer) in self.layers.iter().enumerate() {
                rms_norm(&x, &layer.attn_norm, eps, &mut w.normed);
                clock.lap(Stage::Elementwise);
                layer
                    .qkv
                    .forward_into(&w.normed, n, &mut w.qkv, &mut w.part);
                let [qd, kd, vd] = [0, 1, 2].map(|i| layer.qkv.widths()[i]);
                let width = qd + kd + vd;
                columns(&w.qkv, width, 0..qd, &mut w.q);
                columns(&w.qkv, width, qd..qd + kd, &mut w.k);
                columns(&w.qkv, width, qd + kd..width, &mut w.v);
                clock.lap(Stage::Qkv);
                if let Some(qk) = &layer.qk_norm {
                    // Every head of every row is one RMSNorm row.
                    w.heads.resize(w.q.len(), 0.0);
                    rms_norm(&w.q, &qk.q, eps, &mut w.heads);
                    std::mem::swap(&mut w.q, &mut w.heads);
                    w.heads.resize(w.k.len(), 0.0);
                    rms_norm(&w.k, &qk.k, eps, &mut w.heads);
                    std::mem::swap(&mut w.k, &mut w.heads);
                }
                let rope = match &self.rope_local {
                    Some(local) if c.is_local(l) => local,
                    _ => &self.rope,
                };
                rope.apply(&mut w.q, c.n_heads, &positions);
                rope.apply(&mut w.k, c.n_kv_heads, &positions);
                let last_layer = l + 1 == self.layers.len();
                for (i, s) in segs.iter_mut().enumerate() {
                    let r = rows(i);
                    if let Some(probe) = s.probe.as_deref_mut().filter(|_| last_layer) {
                        probe.clear();
                        probe.extend_from_slice(&w.q[r.start * qw..r.end * qw]);
                    }
                    s.cache.write(
                        l,
                        &w.k[r.start * kw..r.end * kw],
                        &w.v[r.start * kw..r.end * kw],
                    );
                }
                clock.lap(Stage::RopeCache);
                w.attn.clear();
                for (i, s) in segs.iter().enumerate() {
                    let r = rows(i);
                    let q = &w.q[r.start * qw..r.end * qw];
                    w.attn.extend(tree_attention_in_window(
                        &shape,
                        rule,
                        c.window_of(l),
                        q,
                        &s.cache.layer(l),
                        &masks[i],
                    ));
                }
                clock.lap(Stage::Attention);
                layer.wo.forward_into(&w.attn, n, &mut w.out);
                clock.lap(Stage::AttnOut);
                if let Some(post) = &layer.post_norms {
                    w.heads.resize(w.out.len(), 0.0);
                    rms_norm(&w.out, &post.attn, eps, &mut w.heads);
                    std::mem::swap(&mut w.out, &mut w.heads);
                }
                add(&mut x, &w.out);

                rms_norm(&x, &layer.ffn_norm, eps, &mut w.normed);
                clock.lap(Stage::Elementwise);
                layer
                    .gate_up
                    .forward_into(&w.normed, n, &mut w.gate_up, &mut w.part);
                clock.lap(Stage::GateUp);
                let f = layer.gate_up.widths()[0];
                gated_ffn(&w.gate_up, f, c.ffn_gelu, &mut w.gate);
                clock.lap(Stage::Elementwise);
                layer.w_down.forward_into(&w.gate, n, &mut w.out);
                clock.lap(Stage::Down);
                if let Some(post) = &layer.post_norms {
                    w.heads.resize(w.out.len(), 0.0);
                    rms_norm(&w.out, &post.ffn, eps, &mut w.heads);
                    std::mem::swap(&mut w.out, &mut w.heads);
                }
                add(&mut x, &w.out);
            }
        });
        clock.lap(Stage::Elementwise);

        // The rows that want logits, all segments' in one LM-head matmul.
        let hidden = c.hidden;
        let wanted: Vec<std::ops::Range<usize>> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = rows(i);
                match s.want {
                    LogitRows::None => r.end..r.end,
                    LogitRows::Last => r.end - 1..r.end,
                    LogitRows::All => r,
                }
            })
            .collect();
        let total: usize = wanted.iter().map(|r| r.len()).sum();
        // One run of rows (always so for one segment): no gather copy.
        let gathered;
        let last: &[f32] = if wanted.windows(2).all(|w| w[0].end == w[1].start) {
            let from = wanted.first().map_or(n, |r| r.start);
            &x[from * hidden..(from + total) * hidden]
        } else {
            let mut g = Vec::with_capacity(total * hidden);
            for r in &wanted {
                g.extend_from_slice(&x[r.start * hidden..r.end * hidden]);
            }
            gathered = g;
            &gathered
        };
        let mut normed = vec![0f32; last.len()];
        rms_norm(last, &self.output_norm, eps, &mut normed);
        let vocab = self.lm_head.out_features();
        let mut data = Vec::new();
        if total > 0 {
            data = SPARE_LOGITS.with(|s| s.take());
            self.lm_head.forward_into(&normed, total, &mut data);
            if let Some(cap) = c.final_softcap {
                data.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
            }
        }
        clock.lap(Stage::LmHead);
        if segs.len() == 1 {
            return Ok(vec![Logits {
                data,
                rows: total,
                vocab,
            }]);
        }
        // Split per segment: a copy of the logits (rows x vocab floats, a
        // few MB for a full batch, ~2% of its forward), cheaper than one
        // LM-head matmul per segment, which would stream the head's
        // weights once per sequence.
        let mut at = 0;
        let out = wanted
            .iter()
            .map(|r| {
                let rows = r.len();
                let part = data[at * vocab..(at + rows) * vocab].to_vec();
                at += rows;
                Logits {
                    data: part,
                    rows,
                    vocab,
                }
            })
            .collect();
        // `data` goes back to the spare buffer when this Logits drops.
        drop(Logits {
            data,
            rows: total,
            vocab,
        });
        Ok(out)
    }

    /// Checks one segment's shape against the model and its cache.
    fn check(&self, s: &Segment<'_>) -> Result<()> {
        let c = &self.config;
        let n = s.tokens.len();
        let prior = if s.extend { s.cache.pending() } else { 0 };
        if n == 0 || s.positions.len() != n || s.parents.len() != prior + n {
            return Err(Error::Invalid(
                "forward needs one position per token and one parent per token (and per pending tree node when extending)".into(),
            ));
        }
        if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        if let Some(&p) = s.positions.iter().find(|&&p| p >= c.context_length) {
            return Err(Error::ContextLength {
                prompt: p + 1,
                context: c.context_length,
                reserve: 0,
            });
        }
        for (i, p) in s.parents.iter().enumerate() {
            if matches!(p, Some(p) if *p >= i) {
                return Err(Error::Invalid(format!("token {i}'s parent comes after it")));
            }
        }
        Ok(())
    }
}

/// One sequence's part of [`Decoder::forward_batch`]: the arguments of
/// [`Decoder::forward`] (or, with `extend`, of [`Decoder::forward_extend`]).
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub positions: &'a [usize],
    pub parents: &'a [Option<usize>],
    pub want: LogitRows,
    pub extend: bool,
    /// When set, receives the last layer's rotated queries of the
    /// segment's rows (`[N][n_heads][head_dim]`), for
    /// [`Decoder::attention_mass`] after the tree is verified.
    pub probe: Option<&'a mut Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pooled SwiGLU computes exactly what one `silu_mul` per row does,
    /// across span boundaries and a ragged last span.
    #[test]
    fn swiglu_matches_rowwise_silu() {
        let (rows, f) = (3, 2 * 4096 + 100);
        let gate_up: Vec<f32> = (0..rows * 2 * f)
            .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 150.0)
            .collect();
        let mut out = vec![f32::NAN; 5];
        gated_ffn(&gate_up, f, false, &mut out);
        assert_eq!(out.len(), rows * f);
        for r in 0..rows {
            let row = &gate_up[r * 2 * f..(r + 1) * 2 * f];
            let mut want = row[..f].to_vec();
            silu_mul(&mut want, &row[f..]);
            let got = &out[r * f..(r + 1) * f];
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} differs"
            );
        }
    }

    #[test]
    fn columns_cuts_rows() {
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut dst = Vec::new();
        columns(&src, 4, 1..3, &mut dst);
        assert_eq!(dst, vec![1., 2., 5., 6., 9., 10.]);
    }
}
