//! Quantized matmul kernels: `y[n, out] = x[n, in] · W[out, in]ᵀ` for the few
//! rows (N = 1..64) of a draft tree against GGUF-quantized weights, at little
//! more cost for N rows than for one.
//!
//! Weights are repacked at load time into 16-row tiles (`layout`) so that
//! each weight load is reused by every activation row; activations are
//! quantized to int8 blocks (`act`). Paths: AVX-512 VNNI, AVX2, and a
//! portable scalar reference, chosen at run time (`isa`). Work is split
//! over output tiles on a persistent pool (`pool`).
//!
//! Why no AMX path: on Sapphire/Emerald Rapids one `tdpbsud` replaces the 8
//! `vpdpbusd` per activation row of a block, but every 32-value block (16
//! for Q6_K) carries its own scales, so its integer sums must leave the tile
//! unit through memory (`tilestored`, then vector loads) before they can be
//! scaled, and the codes must reach it through memory after unpacking. A
//! tiled kernel built that way (four multiplies in flight, two blocks per
//! multiply for N ≤ 8, a three-stage software pipeline) measured 0.5–0.9×
//! of this AVX-512 path at N = 4..16 on every format, in the interleaved
//! matmul benchmark on a 2-vCPU Xeon (2026-11); the tile load/store round
//! trip cost ~10 ns per multiply, as much as the work it removed.
//!
//! Environment knobs (read once):
//! - `TREESPEC_ISA=scalar|avx2|avx512`: force a path (if supported);
//! - `TREESPEC_THREADS=n`: pool size including the calling thread;
//! - `TREESPEC_SPIN_US=us`: how long idle workers spin before parking (50);
//! - `TREESPEC_POOL=rayon`: dispatch through rayon instead (for comparison);
//! - `TREESPEC_PF_DIST=bytes`, `TREESPEC_PF_MIN_ROWS=n`: software prefetch
//!   distance (8192) and the row count from which it is used (1);
//! - `TREESPEC_PF_L1_ROWS=n`: from this many rows the AVX-512 32-value
//!   kernels prefetch into L1 instead of L2 (3);
//! - `TREESPEC_NO_HUGEPAGES`: do not advise 2 MB pages for the weights.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod buf;
mod isa;
mod layout;
mod pool;
mod probe;
mod scalar;
pub(crate) mod unaligned;

pub use isa::{isa, Isa};
pub use probe::{int8_peak_gmac_s, read_bandwidth_gb_s};

use crate::{Error, Result};
use act::QAct;
use buf::AlignedBuf;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use layout::{Fmt, TILE};
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

/// Rows of activations handled per pass over the weights (more rows are
/// processed in chunks: beyond this the weight reuse is already ample).
const MAX_ROWS: usize = 64;

/// Below this many multiply-adds a call runs on the calling thread only: the
/// hand-off would cost more than it saves.
const SERIAL_MACS: usize = 1 << 17;

#[cfg(target_arch = "x86_64")]
struct Prefetch {
    /// Bytes ahead of the current record.
    dist: usize,
    /// Only from this many activation rows. With the weights streaming from
    /// memory prefetching helps even at one row (2-vCPU Xeon, whole 0.5B
    /// forwards at N = 1: 14–19 ms with it, 22–23 ms without), so it is on
    /// by default; the knob stays for other machines.
    min_rows: usize,
    /// From this many rows, prefetch the 32-value formats into L1 (see
    /// `avx512::run`).
    l1_rows: usize,
}

#[cfg(target_arch = "x86_64")]
fn prefetch_cfg() -> &'static Prefetch {
    static CFG: OnceLock<Prefetch> = OnceLock::new();
    CFG.get_or_init(|| {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Prefetch {
            dist: env("TREESPEC_PF_DIST", 8192),
            min_rows: env("TREESPEC_PF_MIN_ROWS", 1),
            l1_rows: env("TREESPEC_PF_L1_ROWS", 3),
        }
    })
}

/// Software prefetch distance in bytes for a call with `rows` activation
/// rows (0: none).
#[cfg(target_arch = "x86_64")]
fn prefetch_distance(rows: usize) -> usize {
    let cfg = prefetch_cfg();
    if rows >= cfg.min_rows {
        cfg.dist
    } else {
        0
    }
}

/// Whether a call with `rows` activation rows prefetches into L1 (the
/// kernels that can use it decide; see `avx512::run`).
#[cfg(target_arch = "x86_64")]
fn prefetch_to_l1(rows: usize) -> bool {
    rows >= prefetch_cfg().l1_rows
}

/// Prefetches the `len` bytes `pf` bytes past `rec` into L1 (`l1`) or L2
/// (no-op if `pf` is 0). Prefetches never fault, so running past the buffer
/// is harmless.
///
/// # Safety
/// Needs SSE (every x86-64 has it); the addresses are only hints.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_rec(rec: *const u8, len: usize, pf: usize, l1: bool) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    if pf != 0 {
        let mut l = 0;
        while l < len {
            let at = rec.wrapping_add(pf + l) as *const i8;
            if l1 {
                _mm_prefetch::<_MM_HINT_T0>(at);
            } else {
                _mm_prefetch::<_MM_HINT_T1>(at);
            }
            l += 64;
        }
    }
}

/// A weight matrix `[out, in]`, repacked for the kernels.
pub struct QMatrix {
    /// The GGUF type (of the first part, for a stack of several formats).
    dtype: GgmlDType,
    out: usize,
    inp: usize,
    repr: Repr,
}

enum Repr {
    /// Tiled parts side by side along the output: one, or several when
    /// projections of different formats were stacked.
    Tiled(Vec<Part>),
    /// F32/F16 and formats without a tiled kernel: plain row-major f32.
    Dense(Vec<f32>),
}

/// Output columns `col0..col0 + tiles.out` of a tiled matrix.
struct Part {
    col0: usize,
    tiles: Tiles,
}

pub(crate) struct Tiles {
    fmt: Fmt,
    out: usize,
    /// Blocks along the input dimension.
    blocks: usize,
    buf: AlignedBuf,
}

impl Tiles {
    fn tile_bytes(&self) -> usize {
        self.blocks * self.fmt.rec_bytes()
    }

    fn record(&self, t: usize, b: usize) -> &[u8] {
        let rb = self.fmt.rec_bytes();
        &self.buf.as_slice()[t * self.tile_bytes() + b * rb..][..rb]
    }

    /// Appends `other`'s rows after this one's (same format and width; this
    /// one must fill whole tiles).
    fn append(&mut self, other: &Tiles) {
        debug_assert!(self.fmt == other.fmt && self.blocks == other.blocks);
        debug_assert_eq!(self.out % TILE, 0);
        let mut buf = AlignedBuf::zeroed(self.buf.len() + other.buf.len());
        let (head, tail) = buf.as_mut_slice().split_at_mut(self.buf.len());
        head.copy_from_slice(self.buf.as_slice());
        tail.copy_from_slice(other.buf.as_slice());
        self.buf = buf;
        self.out += other.out;
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn tile_ptr(&self, t: usize) -> *const u8 {
        debug_assert!((t + 1) * self.tile_bytes() <= self.buf.len());
        // Only the kernels dereference it, inside the tile (their contract).
        self.buf.as_ptr().wrapping_add(t * self.tile_bytes())
    }

    fn pack(fmt: Fmt, out: usize, inp: usize, data: &[u8]) -> Tiles {
        let blocks = inp / fmt.block();
        let ntiles = out.div_ceil(TILE);
        let (rb, sb) = (fmt.rec_bytes(), fmt.src_bytes());
        let tile_bytes = blocks * rb;
        let mut buf = AlignedBuf::zeroed(ntiles * tile_bytes);
        let row_bytes = blocks * sb;
        let pack_tiles = |first: usize, dst: &mut [u8]| {
            for (i, tile) in dst.chunks_exact_mut(tile_bytes).enumerate() {
                let t = first + i;
                for r in 0..TILE.min(out - t * TILE) {
                    let src = &data[(t * TILE + r) * row_bytes..][..row_bytes];
                    for (b, rec) in tile.chunks_exact_mut(rb).enumerate() {
                        layout::pack_block(fmt, &src[b * sb..][..sb], rec, r);
                    }
                }
            }
        };
        if tile_bytes == 0 || ntiles == 0 {
            return Tiles {
                fmt,
                out,
                blocks,
                buf,
            };
        }
        // Loading a 1.5B model repacks ~1 GB: use every core.
        let threads = pool::global().threads().min(ntiles).max(1);
        let per = ntiles.div_ceil(threads);
        std::thread::scope(|s| {
            for (i, dst) in buf.as_mut_slice().chunks_mut(per * tile_bytes).enumerate() {
                let pack_tiles = &pack_tiles;
                s.spawn(move || pack_tiles(i * per, dst));
            }
        });
        Tiles {
            fmt,
            out,
            blocks,
            buf,
        }
    }
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, [{}, {}])", self.dtype, self.out, self.inp)
    }
}

/// An output buffer shared by the pool's threads during one call, each
/// writing its own disjoint part (matmul columns, attention rows, SwiGLU
/// spans); the buffer outlives the call.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes while the owner waits for the call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Element `i` (a method, so closures capture the wrapper, not the bare
    /// pointer).
    pub(crate) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl QMatrix {
    /// Repacks a GGUF weight of shape `[out, in]`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        let (out, inp) = match t.shape().dims() {
            &[out, inp] => (out, inp),
            &[inp] => (1, inp),
            d => {
                return Err(Error::Invalid(format!(
                    "quantized matrix must have 2 dimensions, got shape {d:?}"
                )))
            }
        };
        let dtype = t.dtype();
        let repr = match Fmt::from_ggml(dtype) {
            Some(fmt) => {
                if inp % fmt.block() != 0 {
                    return Err(Error::Invalid(format!(
                        "{dtype:?} matrix with {inp} columns: not a multiple of {}",
                        fmt.block()
                    )));
                }
                let data = t.data()?;
                let want = out * inp / fmt.block() * fmt.src_bytes();
                if data.len() != want {
                    return Err(Error::Invalid(format!(
                        "{dtype:?} matrix [{out}, {inp}] has {} bytes, expected {want}",
                        data.len()
                    )));
                }
                Repr::Tiled(vec![Part {
                    col0: 0,
                    tiles: Tiles::pack(fmt, out, inp, &data),
                }])
            }
            None => {
                let w = t
                    .dequantize(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Repr::Dense(w)
            }
        };
        Ok(QMatrix {
            dtype,
            out,
            inp,
            repr,
        })
    }

    /// Stacks matrices with the same input width into one `[Σ out, in]`
    /// matrix (rows of the first, then the second, …), so projections of the
    /// same input run as one call: one pass over the pool, one activation
    /// quantization per format. Consecutive parts of one format share a
    /// buffer when the earlier fills whole 16-row tiles; others (another
    /// format, a ragged part) keep their own, written at their column
    /// offset. Not possible across input widths or between tiled and dense
    /// weights: then the parts come back unchanged. The stacked matrix
    /// computes exactly the bits the parts do.
    pub fn stack(parts: Vec<QMatrix>) -> std::result::Result<QMatrix, Vec<QMatrix>> {
        let Some(first) = parts.first() else {
            return Err(parts);
        };
        let (dtype, inp) = (first.dtype, first.inp);
        let compatible = parts.iter().all(|m| {
            m.inp == inp
                && matches!(
                    (&m.repr, &first.repr),
                    (Repr::Tiled(_), Repr::Tiled(_)) | (Repr::Dense(_), Repr::Dense(_))
                )
        });
        if !compatible || parts.len() < 2 {
            return Err(parts);
        }
        let out: usize = parts.iter().map(|m| m.out).sum();
        let repr = match &first.repr {
            Repr::Tiled(_) => {
                let mut stacked: Vec<Part> = Vec::new();
                let mut col0 = 0;
                for m in parts {
                    let Repr::Tiled(own) = m.repr else {
                        unreachable!("checked above")
                    };
                    for p in own {
                        let col = col0 + p.col0;
                        match stacked.last_mut() {
                            Some(last)
                                if last.tiles.fmt == p.tiles.fmt
                                    && last.tiles.out % TILE == 0
                                    && last.col0 + last.tiles.out == col =>
                            {
                                last.tiles.append(&p.tiles)
                            }
                            _ => stacked.push(Part {
                                col0: col,
                                tiles: p.tiles,
                            }),
                        }
                    }
                    col0 += m.out;
                }
                Repr::Tiled(stacked)
            }
            Repr::Dense(_) => Repr::Dense(
                parts
                    .iter()
                    .flat_map(|m| match &m.repr {
                        Repr::Dense(w) => w.as_slice(),
                        Repr::Tiled(_) => &[],
                    })
                    .copied()
                    .collect(),
            ),
        };
        Ok(QMatrix {
            dtype,
            out,
            inp,
            repr,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Bytes of the repacked weights (what a call streams).
    pub fn weight_bytes(&self) -> usize {
        match &self.repr {
            Repr::Tiled(parts) => parts.iter().map(|p| p.tiles.buf.len()).sum(),
            Repr::Dense(w) => std::mem::size_of_val(w.as_slice()),
        }
    }

    /// The GGUF type the weights came in.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Row `row` of W as f32, bit-identical to candle's dequantization.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.out && out.len() >= self.inp);
        match &self.repr {
            Repr::Dense(w) => out[..self.inp].copy_from_slice(&w[row * self.inp..][..self.inp]),
            Repr::Tiled(parts) => {
                let p = parts
                    .iter()
                    .rfind(|p| p.col0 <= row)
                    .expect("part 0 starts at column 0");
                let (m, row) = (&p.tiles, row - p.col0);
                let bs = m.fmt.block();
                for (b, o) in out[..self.inp].chunks_exact_mut(bs).enumerate() {
                    layout::dequant(m.fmt, m.record(row / TILE, b), row % TILE, o);
                }
            }
        }
    }

    /// `y = x · Wᵀ` with `x` row-major `n × in` and `y` `n × out`
    /// (overwritten), on the path [`isa()`] names.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_with(isa::selected(), x, n, y)
    }

    /// [`QMatrix::matmul`] on a given path (for tests and benchmarks); an
    /// unsupported path falls back to scalar.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
        assert!(x.len() >= n * self.inp, "x holds fewer than n rows");
        assert!(y.len() >= n * self.out, "y holds fewer than n rows");
        let isa = if isa.supported() { isa } else { Isa::Scalar };
        if self.out == 0 {
            return;
        }
        if self.inp == 0 {
            y[..n * self.out].fill(0.0);
            return;
        }
        for (xc, yc) in x[..n * self.inp]
            .chunks(MAX_ROWS * self.inp)
            .zip(y[..n * self.out].chunks_mut(MAX_ROWS * self.out))
        {
            let rows = xc.len() / self.inp;
            match &self.repr {
                Repr::Dense(w) => self.dense(w, xc, rows, yc),
                Repr::Tiled(parts) => QAct::with_scratch(parts.len(), |acts| {
                    // One quantization per format (the first part of each
                    // format quantizes; later ones point at its buffers).
                    let mut act_of = Vec::with_capacity(parts.len());
                    for (i, p) in parts.iter().enumerate() {
                        match parts[..i].iter().position(|q| q.tiles.fmt == p.tiles.fmt) {
                            Some(j) => act_of.push(act_of[j]),
                            None => {
                                acts[i].quantize(p.tiles.fmt, xc, rows, self.inp);
                                act_of.push(i);
                            }
                        }
                    }
                    self.tiled(isa, parts, acts, &act_of, rows, yc);
                }),
            }
        }
    }

    /// Units per chunk handed to a thread: everything at once for small
    /// calls, else about 8 chunks per thread so a late thread costs little.
    fn chunk(&self, n: usize, units: usize) -> usize {
        if n * self.out * self.inp < SERIAL_MACS {
            units
        } else {
            units.div_ceil(8 * pool::global().threads())
        }
    }

    /// Runs every part's tiles as one range of work units on the pool
    /// (part `i` with activations `acts[act_of[i]]`).
    fn tiled(
        &self,
        isa: Isa,
        parts: &[Part],
        acts: &[QAct],
        act_of: &[usize],
        rows: usize,
        y: &mut [f32],
    ) {
        let ends: Vec<usize> = parts
            .iter()
            .scan(0, |end, p| {
                *end += p.tiles.out.div_ceil(TILE);
                Some(*end)
            })
            .collect();
        let ntiles = ends.last().copied().unwrap_or(0);
        let (yp, ldy) = (OutPtr(y.as_mut_ptr()), self.out);
        let run = move |units: std::ops::Range<usize>| {
            for (i, p) in parts.iter().enumerate() {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                let (lo, hi) = (units.start.max(start), units.end.min(ends[i]));
                if lo >= hi {
                    continue;
                }
                let (m, act, tiles) = (&p.tiles, &acts[act_of[i]], lo - start..hi - start);
                let y = yp.at(p.col0);
                // SAFETY: the paths only run where `isa.supported()` (checked
                // by the caller); each unit is one tile, whose columns only
                // this call writes, in rows `ldy` apart of `y`.
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { avx512::run(m, act, tiles, y, ldy) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::run(m, act, tiles, y, ldy) },
                    _ => scalar::run(m, act, tiles, y, ldy),
                }
            }
        };
        pool::global().run(ntiles, self.chunk(rows, ntiles), &run);
    }

    fn dense(&self, w: &[f32], x: &[f32], n: usize, y: &mut [f32]) {
        let (inp, out) = (self.inp, self.out);
        let yp = OutPtr(y.as_mut_ptr());
        let run = move |rows: std::ops::Range<usize>| {
            for j in rows {
                let wr = &w[j * inp..][..inp];
                for i in 0..n {
                    let v = dot_f32(wr, &x[i * inp..][..inp]);
                    // SAFETY: threads write disjoint columns of `n × out`.
                    unsafe { *yp.at(i * out + j) = v };
                }
            }
        };
        pool::global().run(out, self.chunk(n, out), &run);
    }

    /// Like candle's `QMatMul::forward`: `x` of shape `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        match dims.last() {
            Some(&k) if k == self.inp => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "matmul input of shape {dims:?} does not end in {}",
                    self.inp
                )))
            }
        }
        let n = x.elem_count() / self.inp;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; n * self.out];
        self.matmul(&xs, n, &mut y);
        let mut od = dims.to_vec();
        if let Some(l) = od.last_mut() {
            *l = self.out;
        }
        Ok(Tensor::from_vec(y, od, x.device())?)
    }
}

/// Dot product with 8 independent partial sums so it vectorises.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..8 {
            s[l] += x[l] * y[l];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        t += x * y;
    }
    t
}

/// Runs `f` over `0..units`, `chunk` units at a time, on the kernels' thread
/// pool. Attention uses it too, so one set of workers serves the whole
/// forward (several spinning pools on 2 cores steal each other's time).
pub fn parallel_for(units: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    pool::global().run(units, chunk, f)
}

/// Worker threads of the kernels' pool (the calling thread included).
pub fn threads() -> usize {
    pool::global().threads()
}
