//! Attention of N new tokens over the committed KV cache plus the new tokens
//! that are their ancestors (tree attention). Hand-written rather than built
//! from candle ops because (a) the mask is a tree over the new tokens only,
//! while every new token sees the whole committed prefix, and (b) the cache
//! grows in place: materialising `[heads, N, ctx]` masks or copying the cache
//! into a contiguous tensor every step would cost more than the attention.
//!
//! All query heads that share a kv head are processed together, so every
//! key/value row loaded from the cache is used by the whole group (GQA) and
//! by all the tree's tokens. The softmax runs by fixed chunks of positions
//! (see [`CHUNK`]): the committed prefix is split over threads chunk by
//! chunk, then each row's last chunk and its ancestors among the new tokens
//! are added and the chunks merged.

mod kernels;
mod mask;
mod mass;
mod window;

pub use mask::TreeMask;
pub use mass::mass_by_chunk;

use super::kv_cache::{LayerKv, KEY_TILE};
#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512};
use super::lanes::{F32x16, Scalar, LANES};
use crate::kernels::{parallel_for, OutPtr};
use kernels::{
    add_scaled, add_values, score_groups, weigh_groups, widen_block, KEY_PREFETCH_TILES,
    VALUE_PREFETCH_ROWS,
};

/// Positions per chunk, the unit of the softmax. Each (row, chunk) gets its
/// own max, sum of exponentials and P·V partial, and a row's chunks are then
/// merged in position order. Chunks are fixed by *sequence position*, not by
/// what a forward happens to hold, and every partial is computed by the same
/// arithmetic whichever task computes it, so a token's result does not
/// depend on which other draft nodes share the forward, on whether its
/// ancestors are cached or new, or on how the work was split (tree forward
/// == sequential forward bit for bit, see tests/tree_forward.rs: int8
/// activation rounding downstream turns a 1-ulp difference into visible
/// logit changes). This is what lets one token's attention be split over
/// threads by position (it has only `n_heads` query rows, over a couple of
/// kv heads).
///
/// 1024: a chunk's keys and values (128 KB each at head_dim 64, in f16) stay
/// in L2 while all of its rows use them, 8k of context still makes 7
/// chunks per kv head for the pool to balance, and the per-(row, chunk)
/// work (reductions, the partial, the merge) stays small: with 256-position
/// chunks it made 4–64-token forwards at 8k ~8% slower than one pass per
/// row (benches/attention.rs), with 1024 they are faster.
const CHUNK: usize = 1024;

/// Query rows scored against one key tile at once (registers held: this many
/// 16-lane accumulators).
const QK_ROWS: usize = 8;
/// Query rows accumulated over one stretch of values at once (64 output
/// dimensions each: 16 accumulators).
const PV_ROWS: usize = 4;
/// Key tiles per block of positions (64 positions: 8 KB of keys or values
/// at head_dim 64) that every row of a task uses before the next block.
const BLOCK_TILES: usize = 4;
/// Longest run of rows one task takes (a multiple of `QK_ROWS`): bounds a
/// task's score buffer (rows × CHUNK floats, 1 MB at 256 rows, L2-sized) and
/// leaves the pool tasks to balance when a forward has many rows (a
/// 512-token prefill chunk has thousands).
const ROW_RUN: usize = 256;

pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Where one forward's new rows sit: `n` tokens, the first of them at mask
/// index `first`, after `ctx` committed cache positions.
#[derive(Clone, Copy)]
struct NewRows {
    n: usize,
    first: usize,
    ctx: usize,
}

impl NewRows {
    fn of(shape: &AttentionShape, q: &[f32], kv: &LayerKv, mask: &TreeMask) -> Self {
        let n = q.len() / (shape.n_heads * shape.head_dim);
        debug_assert!(n >= 1 && n <= mask.len() && q.len() == n * shape.n_heads * shape.head_dim);
        NewRows {
            n,
            first: mask.len() - n,
            ctx: kv.len() - mask.len(),
        }
    }
}

/// How a query·key product becomes a score before the softmax.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRule {
    /// Multiplies q·k: 1/√head_dim, or the architecture's own (Gemma 2 27B
    /// scales by 1/√(hidden/heads)).
    pub scale: f32,
    /// Gemma 2's soft cap: a score s becomes `cap · tanh(s / cap)`.
    pub softcap: Option<f32>,
}

impl ScoreRule {
    pub fn standard(head_dim: usize) -> Self {
        ScoreRule {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
        }
    }
}

/// `q`: `[N][n_heads][head_dim]` (rotated). `kv`: the layer's cache, whose
/// last `mask.len()` positions are pending tree nodes: the N new tokens are
/// the last N of them (the ones before were appended by earlier forwards of
/// the same tree, [`crate::model::KvCache::extend`]). Returns
/// `[N][n_heads][head_dim]`.
pub fn tree_attention(
    shape: &AttentionShape,
    q: &[f32],
    kv: &LayerKv,
    mask: &TreeMask,
) -> Vec<f32> {
    tree_attention_with(shape, ScoreRule::standard(shape.head_dim), q, kv, mask)
}

/// [`tree_attention_with`] on a layer with a sliding window of `window`
/// positions (`None`: none): rows whose window starts after position 0
/// take the windowed path, the others the chunked kernel (see
/// `window.rs` for why the choice per row keeps results bit-stable).
pub fn tree_attention_in_window(
    shape: &AttentionShape,
    rule: ScoreRule,
    window: Option<usize>,
    q: &[f32],
    kv: &LayerKv,
    mask: &TreeMask,
) -> Vec<f32> {
    let Some(w) = window.filter(|&w| w > 0) else {
        return tree_attention_with(shape, rule, q, kv, mask);
    };
    let NewRows { n, first, ctx } = NewRows::of(shape, q, kv, mask);
    let far: Vec<usize> = (0..n)
        .filter(|&i| ctx + mask.ancestors(first + i).len() > w)
        .collect();
    if far.is_empty() {
        return tree_attention_with(shape, rule, q, kv, mask);
    }
    let mut out = if far.len() < n {
        tree_attention_with(shape, rule, q, kv, mask)
    } else {
        vec![0f32; q.len()]
    };
    window::attend_rows(shape, rule, w, q, kv, mask, &far, &mut out);
    out
}

/// [`tree_attention`] with scores computed by `rule`.
pub fn tree_attention_with(
    shape: &AttentionShape,
    rule: ScoreRule,
    q: &[f32],
    kv: &LayerKv,
    mask: &TreeMask,
) -> Vec<f32> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = *shape;
    let NewRows { n, first, ctx } = NewRows::of(shape, q, kv, mask);
    let group = n_heads / n_kv_heads;
    let rows_per_head = n * group;
    let full = ctx / CHUNK;

    // A row is one (new token, query head of the group) pair: every key and
    // value loaded from the cache serves all rows of a task (GQA and the
    // tree's tokens alike). Queries are laid out once per call, per kv head
    // in groups of QK_ROWS rows `[c][row]`: the score kernel then broadcasts
    // a group's values for dimension c from one pointer at constant offsets.
    let mut qs = vec![0f32; n_kv_heads * rows_per_head * d];
    for g in 0..n_kv_heads {
        let qg = &mut qs[g * rows_per_head * d..(g + 1) * rows_per_head * d];
        for r in 0..rows_per_head {
            let (i, h) = (r / group, g * group + r % group);
            let g0 = r - r % QK_ROWS;
            let take = QK_ROWS.min(rows_per_head - g0);
            for (c, &x) in q[(i * n_heads + h) * d..][..d].iter().enumerate() {
                qg[g0 * d + c * take + (r - g0)] = x;
            }
        }
    }
    let mut out = vec![0f32; n * n_heads * d];
    let mut prefix_parts = vec![0f32; n_kv_heads * rows_per_head * full * (PART_HEAD + d)];
    let call = Call {
        qs: &qs,
        kv,
        mask,
        first,
        n_heads,
        d,
        ctx,
        group,
        rows_per_head,
        full,
        scale: rule.scale,
        softcap: rule.softcap,
        out: OutPtr(out.as_mut_ptr()),
        parts: OutPtr(prefix_parts.as_mut_ptr()),
    };
    let level = simd_level();

    // The chunks wholly in the committed prefix, split over tasks by chunk
    // (and by runs of rows when there are many): each chunk's keys and
    // values are read once for all the rows of a task.
    let runs = rows_per_head.div_ceil(ROW_RUN);
    let units = n_kv_heads * full * runs;
    let work = |range: std::ops::Range<usize>| {
        for t in range {
            let (g, k, run) = (t / (full * runs), t / runs % full, t % runs);
            let r0 = run * ROW_RUN;
            let r1 = (r0 + ROW_RUN).min(rows_per_head);
            // SAFETY: the wrappers only enable features `simd_level` found;
            // tasks write disjoint partials.
            unsafe { dispatch(level, &call, Task::PrefixChunk { g, k, r0, r1 }) }
        }
    };
    // Consecutive chunks go to the same thread in groups: the prefetches
    // that run past a chunk's end then serve the next one (8 groups per
    // thread leave the pool room to balance a slow core).
    parallel_for(units, units.div_ceil(8 * crate::kernels::threads()), &work);

    // Then runs of rows: the rest of each row's sequence (the chunk holding
    // the cache end, and the new tokens) and the merge. Runs are cut so
    // that both pool threads get work.
    let want_tasks = 2 * crate::kernels::threads();
    let mut run = 64;
    while run > QK_ROWS && n_kv_heads * rows_per_head.div_ceil(run) < want_tasks {
        run /= 2;
    }
    let tasks: Vec<(usize, usize)> = (0..n_kv_heads)
        .flat_map(|g| (0..rows_per_head).step_by(run).map(move |r0| (g, r0)))
        .collect();
    let work = |range: std::ops::Range<usize>| {
        for &(g, r0) in &tasks[range] {
            let r1 = (r0 + run).min(rows_per_head);
            // SAFETY: as above; each (token, head) row belongs to one task.
            unsafe { dispatch(level, &call, Task::Rows { g, r0, r1 }) }
        }
    };
    parallel_for(tasks.len(), 1, &work);
    out
}

/// Floats of a partial before its `head_dim` P·V sums: the chunk's max
/// score and its sum of exponentials.
const PART_HEAD: usize = 2;

/// What every task reads, and where tasks write (disjoint ranges).
struct Call<'a> {
    qs: &'a [f32],
    kv: &'a LayerKv<'a>,
    mask: &'a TreeMask,
    /// The mask's node of query row 0 (pending nodes before it came from
    /// earlier forwards of the tree).
    first: usize,
    n_heads: usize,
    d: usize,
    ctx: usize,
    group: usize,
    rows_per_head: usize,
    /// Chunks wholly inside the committed prefix.
    full: usize,
    scale: f32,
    softcap: Option<f32>,
    out: OutPtr,
    /// Partials of the `full` chunks: `[kv head][row][chunk][PART_HEAD + d]`.
    parts: OutPtr,
}

#[derive(Clone, Copy)]
enum Task {
    /// Partials of prefix chunk `k` for rows `r0..r1` of kv head `g`.
    PrefixChunk {
        g: usize,
        k: usize,
        r0: usize,
        r1: usize,
    },
    /// Rows `r0..r1` of kv head `g` from the last chunk to the output.
    Rows { g: usize, r0: usize, r1: usize },
}

/// 2 = AVX-512F, 1 = AVX2 + FMA + F16C, 0 = baseline. The crate is built for plain
/// x86-64, so the task body is compiled once per level and picked at run
/// time, as the matmul kernels are. All levels run the same arithmetic
/// (multiply-adds fused everywhere), so they agree bit for bit.
fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return 1;
            }
        }
        0
    })
}

/// # Safety
/// `level` must be what [`simd_level`] returned.
unsafe fn dispatch(level: u8, c: &Call, task: Task) {
    match level {
        #[cfg(target_arch = "x86_64")]
        2 => task_avx512(c, task),
        #[cfg(target_arch = "x86_64")]
        1 => task_avx2(c, task),
        _ => run_task::<Scalar>(c, task),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn task_avx512(c: &Call, task: Task) {
    run_task::<Avx512>(c, task)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2(c: &Call, task: Task) {
    run_task::<Avx2>(c, task)
}

#[inline(always)]
unsafe fn run_task<V: F32x16>(c: &Call, task: Task) {
    let row_stride = c.full * (PART_HEAD + c.d);
    match task {
        Task::PrefixChunk { g, k, r0, r1 } => {
            let base = c
                .parts
                .at((g * c.rows_per_head + r0) * row_stride + k * (PART_HEAD + c.d));
            prefix_chunk::<V>(c, g, r0, r1, k, base, row_stride);
        }
        Task::Rows { g, r0, r1 } => {
            let prefix = c.parts.at((g * c.rows_per_head + r0) * row_stride);
            rows_to_end::<V>(c, g, r0, r1, prefix, row_stride);
        }
    }
}

/// Query rows `r0..r1` of kv head `g` (laid out by groups from row 0, so
/// `r0` is a multiple of QK_ROWS) scored against the key tiles `keys`:
/// `s[r][j]` for the tiles' positions, rows `stride` apart.
#[inline(always)]
unsafe fn score_rows<V: F32x16>(
    c: &Call,
    g: usize,
    r0: usize,
    r1: usize,
    keys: &[u16],
    stride: usize,
    s: &mut [f32],
) {
    let d = c.d;
    let q = &c.qs[g * c.rows_per_head * d..(g + 1) * c.rows_per_head * d];
    let tiles = keys.len() / (KEY_TILE * d);
    // Blocks of positions outer, rows inner: a block of keys is read from
    // memory once and then serves every row of the task from L1, widened
    // to f32 first when more than one group of rows will use it.
    let widen = r1 - r0 > 2 * QK_ROWS;
    let mut wide = take_scratch(
        Scratch::Widened,
        if widen { BLOCK_TILES * KEY_TILE * d } else { 0 },
    );
    for t0 in (0..tiles).step_by(BLOCK_TILES) {
        let t1 = (t0 + BLOCK_TILES).min(tiles);
        let kb = &keys[t0 * KEY_TILE * d..t1 * KEY_TILE * d];
        let s = &mut s[t0 * KEY_TILE..];
        if widen {
            let kw = &mut wide[..kb.len()];
            widen_block::<V>(kb, kw, KEY_PREFETCH_TILES * d * KEY_TILE);
            score_groups::<V, f32>(q, r0, r1, kw, d, stride, c.scale, s);
        } else {
            score_groups::<V, u16>(q, r0, r1, kb, d, stride, c.scale, s);
        }
    }
    put_scratch(Scratch::Widened, wide);
    // Before any masking (masked scores are set to -inf afterwards, which
    // the cap must not turn into a finite -cap).
    if let Some(cap) = c.softcap {
        for r in 0..r1 - r0 {
            for x in &mut s[r * stride..r * stride + tiles * KEY_TILE] {
                *x = cap * (*x / cap).tanh();
            }
        }
    }
}

/// `acc[r] += Σ_j p[r][j] · values[j]` for `rows` rows (`p` rows `stride`
/// apart), a block of positions at a time for all rows.
#[inline(always)]
unsafe fn weigh_values<V: F32x16>(
    p: &[f32],
    stride: usize,
    rows: usize,
    values: &[u16],
    d: usize,
    acc: &mut [f32],
) {
    let len = values.len() / d;
    let block = BLOCK_TILES * KEY_TILE;
    let widen = rows > PV_ROWS;
    let mut wide = take_scratch(Scratch::Widened, if widen { block * d } else { 0 });
    for j0 in (0..len).step_by(block) {
        let j1 = (j0 + block).min(len);
        let vb = &values[j0 * d..j1 * d];
        let p = &p[j0..];
        if widen {
            let vw = &mut wide[..vb.len()];
            widen_block::<V>(vb, vw, VALUE_PREFETCH_ROWS * d);
            weigh_groups::<V, f32>(p, stride, rows, vw, d, acc);
        } else {
            weigh_groups::<V, u16>(p, stride, rows, vb, d, acc);
        }
    }
    put_scratch(Scratch::Widened, wide);
}

/// The max of a chunk's scores `s` (a whole number of 16-lane tiles, lane =
/// position % 16; masked or padding entries are -inf), then `s` replaced by
/// e^(s − max), and the sum of those: each lane adds its entries in
/// position order, then the lanes are added in order. Returns (max, sum).
#[inline(always)]
unsafe fn chunk_softmax<V: F32x16>(s: &mut [f32]) -> (f32, f32) {
    let tiles = s.len() / LANES;
    let mut m = V::splat(f32::NEG_INFINITY);
    for t in 0..tiles {
        m = m.max(V::load(s.as_ptr().add(t * LANES)));
    }
    let mut lanes = [0f32; LANES];
    m.store(lanes.as_mut_ptr());
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let neg_max = V::splat(-max);
    let mut sum = V::zero();
    for t in 0..tiles {
        let p = s.as_mut_ptr().add(t * LANES);
        let e = V::load(p).add(neg_max).exp();
        e.store(p);
        sum = sum.add(e);
    }
    sum.store(lanes.as_mut_ptr());
    (max, lanes.iter().sum())
}

/// Partials of prefix chunk `k` (positions `k·CHUNK..(k + 1)·CHUNK`, all
/// committed, all visible) for rows `r0..r1` of kv head `g`: row r's goes
/// to `parts + (r − r0)·row_stride`.
#[inline(always)]
unsafe fn prefix_chunk<V: F32x16>(
    c: &Call,
    g: usize,
    r0: usize,
    r1: usize,
    k: usize,
    parts: *mut f32,
    row_stride: usize,
) {
    let d = c.d;
    let rows = r1 - r0;
    let keys = &c.kv.keys(g)[k * CHUNK * d..(k + 1) * CHUNK * d];
    let values = &c.kv.values(g)[k * CHUNK * d..(k + 1) * CHUNK * d];
    let stride = score_stride(CHUNK);
    let mut buf = take_scratch(Scratch::Scores, rows * (stride + d));
    let (s, acc) = buf.split_at_mut(rows * stride);
    score_rows::<V>(c, g, r0, r1, keys, stride, s);
    for r in 0..rows {
        let (m, l) = chunk_softmax::<V>(&mut s[r * stride..r * stride + CHUNK]);
        let dst = parts.wrapping_add(r * row_stride);
        // SAFETY: the caller owns these rows' partials of chunk k.
        *dst = m;
        *dst.add(1) = l;
    }
    let acc = &mut acc[..rows * d];
    acc.fill(0.0);
    weigh_values::<V>(s, stride, rows, values, d, acc);
    for r in 0..rows {
        let dst = parts.wrapping_add(r * row_stride + PART_HEAD);
        std::ptr::copy_nonoverlapping(acc.as_ptr().add(r * d), dst, d);
    }
    put_scratch(Scratch::Scores, buf);
}

/// Floats from one row's scores to the next for `len` positions: one tile
/// more, so that rows are not 4 KB apart (1024 positions), where the loads
/// of 8 rows' scores fight over one L1 set and alias the stores.
fn score_stride(len: usize) -> usize {
    len + LANES
}

/// Per-thread scratch buffers, reused from task to task: allocating (and
/// zeroing) a chunk's score buffer per task cost more than its
/// exponentials. One slot for a task's scores and sums, one for a widened
/// block of keys or values.
#[derive(Clone, Copy)]
enum Scratch {
    Scores = 0,
    Widened = 1,
}

thread_local! {
    static SCRATCH: [std::cell::Cell<Vec<f32>>; 2] =
        const { [std::cell::Cell::new(Vec::new()), std::cell::Cell::new(Vec::new())] };
}

/// At least `len` floats of this thread's scratch `slot` (taken out until
/// [`put_scratch`]; not a closure, which would not inherit the caller's
/// target features). The contents are whatever an earlier task left: write
/// before reading.
fn take_scratch(slot: Scratch, len: usize) -> Vec<f32> {
    let mut buf = SCRATCH.with(|s| s[slot as usize].take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

fn put_scratch(slot: Scratch, buf: Vec<f32>) {
    SCRATCH.with(|s| s[slot as usize].set(buf));
}

/// Rows `r0..r1` of kv head `g` from chunk `full` (the one holding the cache
/// end) to the end of each row's sequence, then the merge of all its
/// partials (`prefix`: row r's prefix chunks at `prefix + (r − r0)·row_stride`)
/// into the output.
///
/// A row's sequence past the prefix is its ancestors among the new tokens,
/// at positions `ctx + depth`: each row's scores are first rearranged by
/// position (the "virtual row"), so the chunks and lanes are the ones the
/// same tokens have once committed.
#[inline(always)]
unsafe fn rows_to_end<V: F32x16>(
    c: &Call,
    g: usize,
    r0: usize,
    r1: usize,
    prefix: *const f32,
    row_stride: usize,
) {
    let (d, ctx, group) = (c.d, c.ctx, c.group);
    let rows = r1 - r0;
    let token = |r: usize| (r0 + r) / group;
    let last_token = token(rows - 1);
    let start = c.full * CHUNK;
    let span = (ctx + c.first + last_token + 1 - start).div_ceil(KEY_TILE) * KEY_TILE;
    let keys = &c.kv.keys(g)[start * d..(start + span) * d];
    let stride = score_stride(span);
    let mut scratch = take_scratch(Scratch::Scores, rows * stride);
    let s = &mut scratch[..rows * stride];
    score_rows::<V>(c, g, r0, r1, keys, stride, s);
    let values = c.kv.values(g);

    // Virtual rows: position p at index p − start. The committed part stays
    // where it is; ancestor of depth t moves from its slot to ctx + t (slots
    // come in depth order and a slot is never below its depth, so moving
    // forward in place is safe); the rest is -inf.
    let pre = ctx - start;
    let ancestors = |r: usize| c.mask.ancestors(c.first + token(r));
    for r in 0..rows {
        let row = &mut s[r * stride..(r + 1) * stride];
        let anc = ancestors(r);
        for (t, &j) in anc.iter().enumerate() {
            row[pre + t] = row[pre + j];
        }
        row[pre + anc.len()..].fill(f32::NEG_INFINITY);
    }

    // Per row and chunk of its virtual row: max and sum of exponentials.
    let chunks_of = |r: usize| (pre + ancestors(r).len()).div_ceil(CHUNK);
    let most = (0..rows).map(chunks_of).max().unwrap_or(1);
    let part = PART_HEAD + d;
    let mut tail = vec![0f32; rows * most * part];
    for r in 0..rows {
        let len = (pre + ancestors(r).len()).div_ceil(LANES) * LANES;
        for k in 0..chunks_of(r) {
            let end = ((k + 1) * CHUNK).min(len);
            let (m, l) = chunk_softmax::<V>(&mut s[r * stride + k * CHUNK..r * stride + end]);
            tail[(r * most + k) * part] = m;
            tail[(r * most + k) * part + 1] = l;
        }
    }
    // P·V: the committed part of the first chunk for all rows at once, then
    // each row's ancestors in position order, a new partial at each chunk
    // boundary.
    let mut acc = vec![0f32; rows * d];
    weigh_values::<V>(s, stride, rows, &values[start * d..ctx * d], d, &mut acc);
    for r in 0..rows {
        let row = &s[r * stride..(r + 1) * stride];
        let anc = ancestors(r);
        let a = &mut acc[r * d..(r + 1) * d];
        // Ancestors t0..t1 sit in the row's chunk k (pre < CHUNK: the
        // first continues the committed part's sums).
        let (mut t0, mut k) = (0, 0);
        loop {
            let t1 = ((k + 1) * CHUNK - pre).min(anc.len());
            add_values::<V>(
                a,
                &row[pre + t0..pre + t1],
                &anc[t0..t1],
                &values[ctx * d..],
                d,
            );
            tail[(r * most + k) * part + PART_HEAD..][..d].copy_from_slice(a);
            if t1 == anc.len() {
                break;
            }
            a.fill(0.0);
            (t0, k) = (t1, k + 1);
        }
    }

    // Merge: every chunk's partial rescaled to the row's overall max, in
    // position order.
    let mut a = vec![0f32; d];
    for r in 0..rows {
        let pre_parts = (0..c.full).map(|k| {
            // SAFETY: the caller's prefix partials cover chunks 0..full.
            std::slice::from_raw_parts(prefix.add(r * row_stride + k * part), part)
        });
        let tail_parts = (0..chunks_of(r)).map(|k| &tail[(r * most + k) * part..][..part]);
        let parts = || pre_parts.clone().chain(tail_parts.clone());
        let max = parts().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
        a.fill(0.0);
        let mut l = 0f32;
        for p in parts() {
            let f = super::lanes::exp_lane(p[0] - max);
            l = f.mul_add(p[1], l);
            add_scaled::<V>(&mut a, f, &p[PART_HEAD..]);
        }
        let inv = 1.0 / l;
        let (i, h) = (token(r), g * group + (r0 + r) % group);
        let dst = c.out.at((i * c.n_heads + h) * d);
        for (cc, &x) in a.iter().enumerate() {
            // SAFETY: each (token, head) row belongs to exactly one task, so
            // tasks write disjoint ranges of `out`, which outlives them.
            *dst.add(cc) = x * inv;
        }
    }
    put_scratch(Scratch::Scores, scratch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_follows_ancestors() {
        // 0 -> 1 -> 3, 0 -> 2
        let m = TreeMask::from_parents(&[None, Some(0), Some(0), Some(1)]);
        assert!(m.sees(3, 0) && m.sees(3, 1) && m.sees(3, 3));
        assert!(!m.sees(3, 2));
        assert!(!m.sees(2, 1));
        assert!(!m.sees(0, 1));
        let chain: Vec<_> = (0..130)
            .map(|i| if i == 0 { None } else { Some(i - 1) })
            .collect();
        let m = TreeMask::from_parents(&chain);
        assert!(m.sees(129, 0) && m.sees(129, 70) && !m.sees(70, 129));
    }

    #[test]
    fn attention_matches_naive() {
        // head_dim 24: one 16-wide pass plus the odd rest; 88: a 64-wide
        // pass, a 16-wide one and the rest. ctx 37 crosses key tiles; GQA
        // group of 3 (15 query rows per kv head: row groups of 8 and 7).
        // ctx 2100: two whole chunks and the start of a third.
        check_against_naive(6, 2, 24, 37, None);
        check_against_naive(6, 2, 88, 37, None);
        check_against_naive(6, 2, 24, 2100, None);
    }

    /// A sliding window of W: a row at position p sees p-W+1..=p. With
    /// ctx 37 and the tree's depths 0..=2, W = 38 leaves the root (p 37)
    /// on the chunked kernel and moves its children to the windowed path
    /// (one forward, both paths); W = 4 cuts into the tree's own ancestors
    /// never (depth < 4) but into the prefix for every row; W = 2 drops the
    /// grandchildren's root; 2100 positions with W = 1500 crosses chunks.
    #[test]
    fn windowed_attention_matches_naive() {
        for w in [38, 4, 2] {
            check_against_naive(6, 2, 24, 37, Some(w));
        }
        check_against_naive(6, 2, 88, 37, Some(20));
        check_against_naive(6, 2, 24, 2100, Some(1500));
    }

    fn check_against_naive(
        heads: usize,
        kv_heads: usize,
        d: usize,
        ctx: usize,
        window: Option<usize>,
    ) {
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: d,
        };
        let n = 5;
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let f = |i: usize| ((i * 7919 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..n * heads * d).map(f).collect();
        let row = kv_heads * d;
        let kv_of =
            |p: usize, o: usize| -> Vec<f32> { (0..row).map(|c| f(p * row + c + o)).collect() };
        let mut cache = crate::model::KvCache::new(1, kv_heads, d, ctx + n);
        cache.begin(ctx).unwrap();
        let (pk, pv): (Vec<f32>, Vec<f32>) = (
            (0..ctx).flat_map(|p| kv_of(p, 3)).collect(),
            (0..ctx).flat_map(|p| kv_of(p, 11)).collect(),
        );
        cache.write(0, &pk, &pv);
        cache.keep_all();
        cache.begin(n).unwrap();
        let (nk, nv): (Vec<f32>, Vec<f32>) = (
            (ctx..ctx + n).flat_map(|p| kv_of(p, 3)).collect(),
            (ctx..ctx + n).flat_map(|p| kv_of(p, 11)).collect(),
        );
        cache.write(0, &nk, &nv);
        let mask = TreeMask::from_parents(&parents);
        let rule = ScoreRule::standard(d);
        let out = tree_attention_in_window(&shape, rule, window, &q, &cache.layer(0), &mask);
        // Position of cache slot j: itself in the prefix, ctx + depth for
        // a tree node.
        let pos = |j: usize| {
            if j < ctx {
                j
            } else {
                ctx + mask.ancestors(j - ctx).len() - 1
            }
        };
        for i in 0..n {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let vis: Vec<usize> = (0..ctx + n)
                    .filter(|&j| j < ctx || mask.sees(i, j - ctx))
                    .filter(|&j| window.is_none_or(|w| pos(ctx + i) - pos(j) < w))
                    .collect();
                let qrow = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
                let s: Vec<f32> = vis
                    .iter()
                    .map(|&j| {
                        let key = cache.entry(0, g, j).0;
                        qrow.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let want: f32 = vis
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| (x - m).exp() / z * cache.entry(0, g, j).1[c])
                        .sum();
                    let got = out[(i * heads + h) * d + c];
                    assert!((want - got).abs() < 1e-5, "{want} vs {got}");
                }
            }
        }
    }

    /// Keys and values of node `id` (prefix positions are nodes 0..ctx, new
    /// tokens 10_000 + j): what the model would write for that token
    /// wherever it sits.
    fn node_kv(id: usize, row: usize) -> (Vec<f32>, Vec<f32>) {
        let f = |i: usize| ((i * 7919 % 1009) as f32 / 500.0) - 1.0;
        (
            (0..row).map(|c| f(id * row + c + 3)).collect(),
            (0..row).map(|c| f(id * row + c + 11) * 0.5).collect(),
        )
    }

    /// A cache holding `committed` nodes then `new` ones (pending).
    fn cache_of(
        kv_heads: usize,
        d: usize,
        committed: &[usize],
        new: &[usize],
    ) -> crate::model::KvCache {
        let row = kv_heads * d;
        let mut cache = crate::model::KvCache::new(1, kv_heads, d, committed.len() + new.len());
        for (nodes, keep) in [(committed, true), (new, false)] {
            cache.begin(nodes.len()).unwrap();
            let (k, v): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                nodes.iter().map(|&id| node_kv(id, row)).unzip();
            cache.write(0, &k.concat(), &v.concat());
            if keep {
                cache.keep_all();
            }
        }
        cache
    }

    /// Each tree node's output equals, bit for bit, the output of the same
    /// token decoded alone after its ancestors were committed: ancestors
    /// that cross a chunk boundary (ctx 1020, chunk end 1024), a long chain
    /// crossing two (ctx 900, 1200 new), a cache ending on a boundary; and
    /// the same under a sliding window.
    #[test]
    fn tree_equals_sequential_across_chunks() {
        let (heads, kv_heads, d) = (4, 2, 24);
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: d,
        };
        // A chain of 12 with a side branch at every second node.
        let mut branchy: Vec<Option<usize>> = vec![None];
        let mut spine = 0;
        for step in 1..12 {
            if step % 2 == 0 {
                branchy.push(Some(spine));
            }
            branchy.push(Some(spine));
            spine = branchy.len() - 1;
        }
        let chain: Vec<Option<usize>> = (0..1200usize).map(|i| i.checked_sub(1)).collect();
        assert_eq!(CHUNK, 1024, "the cases below straddle chunk boundaries");
        for (ctx, parents, check) in [
            (
                1020,
                branchy.clone(),
                (0..branchy.len()).collect::<Vec<_>>(),
            ),
            (900, chain, vec![0, 123, 124, 125, 1147, 1148, 1199]),
            (2048, branchy.clone(), vec![0, 5, 16]),
        ] {
            let n = parents.len();
            let mask = TreeMask::from_parents(&parents);
            let f = |i: usize| ((i * 104729 % 997) as f32 / 400.0) - 1.2;
            let q_of = |node: usize| -> Vec<f32> {
                (0..heads * d).map(|c| f(node * heads * d + c)).collect()
            };
            let q: Vec<f32> = (0..n).flat_map(q_of).collect();
            let prefix: Vec<usize> = (0..ctx).collect();
            let new: Vec<usize> = (0..n).map(|j| 10_000 + j).collect();
            let cache = cache_of(kv_heads, d, &prefix, &new);
            // A window of 1025 puts some of each tree's nodes on the
            // windowed path and some on the chunked kernel.
            let rule = ScoreRule::standard(d);
            for window in [None, Some(1025)] {
                let tree =
                    tree_attention_in_window(&shape, rule, window, &q, &cache.layer(0), &mask);
                for &i in &check {
                    let anc = mask.ancestors(i);
                    let mut committed = prefix.clone();
                    committed.extend(anc[..anc.len() - 1].iter().map(|&j| 10_000 + j));
                    let alone = cache_of(kv_heads, d, &committed, &[10_000 + i]);
                    let one = TreeMask::from_parents(&[None]);
                    {
                        let seq = tree_attention_in_window(
                            &shape,
                            rule,
                            window,
                            &q_of(i),
                            &alone.layer(0),
                            &one,
                        );
                        let got = &tree[i * heads * d..(i + 1) * heads * d];
                        let same = got
                            .iter()
                            .zip(&seq)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "ctx {ctx} node {i} window {window:?}");
                    }
                }
            }
        }
    }
}
