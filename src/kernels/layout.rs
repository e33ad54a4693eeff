//! The repacked weight layout shared by every kernel path.
//!
//! Output rows are grouped in tiles of 16. For each tile the blocks along the
//! input dimension follow each other as fixed-size *records*; tiles follow
//! each other, so a thread streams one contiguous range.
//!
//! Inside a record, quantized values are stored as unsigned *codes* in
//! 64-byte chunks: byte `4*r + k` of a chunk is the value at K-offset `k`
//! (0..4) of tile row `r` (0..16). One 512-bit load then feeds a
//! `vpdpbusd` (4 unsigned codes × 4 signed activation bytes, 16 rows) for
//! every activation row, which is where the weight reuse across rows comes
//! from. 4-bit codes are stored two chunks per 64 bytes (low nibble: K-values
//! 0..16 of the 32-value group, high nibble: 16..32), so a record is exactly
//! as big as the 16 GGUF blocks it came from.
//!
//! Signed GGUF values become codes with an offset (`code = q + offset`); the
//! kernels remove the offset with the activation block sums.

use half::f16;

pub(crate) const TILE: usize = 16;
pub(crate) const CHUNK: usize = 64;

/// A quantized weight format with a tiled layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fmt {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

// Record offsets (bytes).
pub(crate) mod off {
    /// 32-block formats: f16 scales of the 16 rows.
    pub const Q4_D: usize = 256;
    pub const Q4_1_M: usize = 288;
    /// Q5_0: 8 × 64-bit masks holding the 5th bit, bit `4r+k` of mask `c`
    /// for K-offset `4c+k`.
    pub const Q5_H: usize = 256;
    pub const Q5_D: usize = 320;
    pub const Q8_D: usize = 512;
    /// Q4_K: 6-bit scales as `[sub-block j][row]`, 6-bit mins as
    /// `[pair p][row][2]` (ready for `vpdpwssd` with pairs of block sums).
    pub const Q4K_SC: usize = 2048;
    pub const Q4K_MIN: usize = 2176;
    pub const Q4K_D: usize = 2304;
    pub const Q4K_DMIN: usize = 2336;
    /// Q6_K: high 2 bits: per 32-value group, two chunks; chunk `h` holds
    /// bits 4..6 of K-offsets `16h + 4p + k` in bits `2p..2p+2` of byte
    /// `4r+k`.
    pub const Q6K_QH: usize = 2048;
    /// i8 scales as `[sub-block j of 16 values][row]`.
    pub const Q6K_SC: usize = 3072;
    pub const Q6K_D: usize = 3328;
}

impl Fmt {
    pub(crate) fn from_ggml(dt: candle_core::quantized::GgmlDType) -> Option<Fmt> {
        use candle_core::quantized::GgmlDType as D;
        Some(match dt {
            D::Q4_0 => Fmt::Q4_0,
            D::Q4_1 => Fmt::Q4_1,
            D::Q5_0 => Fmt::Q5_0,
            D::Q8_0 => Fmt::Q8_0,
            D::Q4K => Fmt::Q4K,
            D::Q6K => Fmt::Q6K,
            _ => return None,
        })
    }

    /// Values per block along the input dimension.
    pub(crate) fn block(self) -> usize {
        match self {
            Fmt::Q4K | Fmt::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes of one GGUF block.
    pub(crate) fn src_bytes(self) -> usize {
        match self {
            Fmt::Q4_0 => 18,
            Fmt::Q4_1 => 20,
            Fmt::Q5_0 => 22,
            Fmt::Q8_0 => 34,
            Fmt::Q4K => 144,
            Fmt::Q6K => 210,
        }
    }

    /// Bytes of one record (16 rows × one block): the GGUF blocks' size,
    /// except Q4_K whose 6-bit scales and mins are unpacked to bytes.
    pub(crate) fn rec_bytes(self) -> usize {
        match self {
            Fmt::Q4K => off::Q4K_DMIN + 2 * TILE,
            _ => TILE * self.src_bytes(),
        }
    }

    /// What the kernels subtract from a code to get the signed value
    /// (before scales); 0 for formats with an explicit min.
    pub(crate) fn offset(self) -> i32 {
        match self {
            Fmt::Q4_0 => 8,
            Fmt::Q5_0 => 16,
            Fmt::Q8_0 => 128,
            Fmt::Q6K => 32,
            Fmt::Q4_1 | Fmt::Q4K => 0,
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Where code `e` (0..32) of a 32-value group of row `r` lives as a nibble:
/// (byte index inside the group's 256 bytes, high nibble?).
fn nib_pos(r: usize, e: usize) -> (usize, bool) {
    ((e % 16) / 4 * CHUNK + 4 * r + e % 4, e >= 16)
}

fn put_nib(g: &mut [u8], r: usize, e: usize, code: u8) {
    let (i, hi) = nib_pos(r, e);
    g[i] |= if hi { code << 4 } else { code & 15 };
}

fn get_nib(g: &[u8], r: usize, e: usize) -> u8 {
    let (i, hi) = nib_pos(r, e);
    if hi {
        g[i] >> 4
    } else {
        g[i] & 15
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block's 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Copies GGUF block `src` (row `r` of the tile) into record `rec`.
/// `rec` must start zeroed.
pub(crate) fn pack_block(fmt: Fmt, src: &[u8], rec: &mut [u8], r: usize) {
    match fmt {
        Fmt::Q4_0 | Fmt::Q4_1 => {
            let qs = if fmt == Fmt::Q4_0 { &src[2..18] } else { &src[4..20] };
            // GGUF already keeps value j in the low nibble and j+16 in the
            // high nibble of byte j: the same pairing as the layout.
            for (j, &q) in qs.iter().enumerate() {
                rec[(j / 4) * CHUNK + 4 * r + j % 4] = q;
            }
            rec[off::Q4_D + 2 * r..off::Q4_D + 2 * r + 2].copy_from_slice(&src[0..2]);
            if fmt == Fmt::Q4_1 {
                rec[off::Q4_1_M + 2 * r..off::Q4_1_M + 2 * r + 2].copy_from_slice(&src[2..4]);
            }
        }
        Fmt::Q5_0 => {
            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
            let qs = &src[6..22];
            for e in 0..32 {
                let low = if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 };
                put_nib(rec, r, e, low);
                if (qh >> e) & 1 != 0 {
                    let bit = 4 * r + e % 4;
                    rec[off::Q5_H + 8 * (e / 4) + bit / 8] |= 1 << (bit % 8);
                }
            }
            rec[off::Q5_D + 2 * r..off::Q5_D + 2 * r + 2].copy_from_slice(&src[0..2]);
        }
        Fmt::Q8_0 => {
            for e in 0..32 {
                rec[(e / 4) * CHUNK + 4 * r + e % 4] = (src[2 + e] as i8 as i32 + 128) as u8;
            }
            rec[off::Q8_D + 2 * r..off::Q8_D + 2 * r + 2].copy_from_slice(&src[0..2]);
        }
        Fmt::Q4K => {
            let scales = &src[4..16];
            let qs = &src[16..144];
            for e in 0..256 {
                // GGUF: 64-value chunks of 32 bytes, low nibbles first.
                let byte = qs[32 * (e / 64) + e % 32];
                let code = if (e / 32) % 2 == 0 { byte & 15 } else { byte >> 4 };
                put_nib(&mut rec[256 * (e / 32)..], r, e % 32, code);
            }
            for j in 0..8 {
                let (sc, m) = q4k_scale_min(j, scales);
                rec[off::Q4K_SC + 16 * j + r] = sc;
                rec[off::Q4K_MIN + 32 * (j / 2) + 2 * r + j % 2] = m;
            }
            rec[off::Q4K_D + 2 * r..off::Q4K_D + 2 * r + 2].copy_from_slice(&src[0..2]);
            rec[off::Q4K_DMIN + 2 * r..off::Q4K_DMIN + 2 * r + 2].copy_from_slice(&src[2..4]);
        }
        Fmt::Q6K => {
            let ql = &src[0..128];
            let qh = &src[128..192];
            let sc = &src[192..208];
            for e in 0..256 {
                let (half, i) = (e / 128, e % 128);
                let (quarter, l) = (i / 32, i % 32);
                let lbyte = ql[64 * half + l + 32 * (quarter % 2)];
                let low = if quarter < 2 { lbyte & 15 } else { lbyte >> 4 };
                let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
                let (g, e2) = (e / 32, e % 32);
                put_nib(&mut rec[256 * g..], r, e2, low);
                let (h, p) = (e2 / 16, (e2 % 16) / 4);
                rec[off::Q6K_QH + 128 * g + CHUNK * h + 4 * r + e2 % 4] |= high << (2 * p);
            }
            for (j, &s) in sc.iter().enumerate() {
                rec[off::Q6K_SC + 16 * j + r] = s;
            }
            rec[off::Q6K_D + 2 * r..off::Q6K_D + 2 * r + 2].copy_from_slice(&src[208..210]);
        }
    }
}

/// Reads back the codes of row `r` of a record (`codes.len() == block`).
pub(crate) fn codes(fmt: Fmt, rec: &[u8], r: usize, codes: &mut [u8]) {
    match fmt {
        Fmt::Q4_0 | Fmt::Q4_1 => {
            for (e, c) in codes.iter_mut().enumerate().take(32) {
                *c = get_nib(rec, r, e);
            }
        }
        Fmt::Q5_0 => {
            for (e, c) in codes.iter_mut().enumerate().take(32) {
                let bit = 4 * r + e % 4;
                let h = (rec[off::Q5_H + 8 * (e / 4) + bit / 8] >> (bit % 8)) & 1;
                *c = get_nib(rec, r, e) | (h << 4);
            }
        }
        Fmt::Q8_0 => {
            for (e, c) in codes.iter_mut().enumerate().take(32) {
                *c = rec[(e / 4) * CHUNK + 4 * r + e % 4];
            }
        }
        Fmt::Q4K => {
            for (e, c) in codes.iter_mut().enumerate().take(256) {
                *c = get_nib(&rec[256 * (e / 32)..], r, e % 32);
            }
        }
        Fmt::Q6K => {
            for (e, c) in codes.iter_mut().enumerate().take(256) {
                let (g, e2) = (e / 32, e % 32);
                let (h, p) = (e2 / 16, (e2 % 16) / 4);
                let high = (rec[off::Q6K_QH + 128 * g + CHUNK * h + 4 * r + e2 % 4] >> (2 * p)) & 3;
                *c = get_nib(&rec[256 * g..], r, e2) | (high << 4);
            }
        }
    }
}

/// Per-row scale data of a record, decoded.
pub(crate) struct RowScales {
    /// f16 `d` of the block.
    pub d: f32,
    /// Q4_1: `m`; Q4_K: `dmin`.
    pub m: f32,
    /// K-quants: per sub-block scale (Q6_K: 16 signed, Q4_K: 8 unsigned).
    pub sc: [i32; 16],
    /// Q4_K: per sub-block min.
    pub mins: [i32; 8],
}

pub(crate) fn row_scales(fmt: Fmt, rec: &[u8], r: usize) -> RowScales {
    let mut s = RowScales {
        d: 0.0,
        m: 0.0,
        sc: [0; 16],
        mins: [0; 8],
    };
    match fmt {
        Fmt::Q4_0 | Fmt::Q4_1 => {
            s.d = f16_at(rec, off::Q4_D + 2 * r).to_f32();
            if fmt == Fmt::Q4_1 {
                s.m = f16_at(rec, off::Q4_1_M + 2 * r).to_f32();
            }
        }
        Fmt::Q5_0 => s.d = f16_at(rec, off::Q5_D + 2 * r).to_f32(),
        Fmt::Q8_0 => s.d = f16_at(rec, off::Q8_D + 2 * r).to_f32(),
        Fmt::Q4K => {
            s.d = f16_at(rec, off::Q4K_D + 2 * r).to_f32();
            s.m = f16_at(rec, off::Q4K_DMIN + 2 * r).to_f32();
            for j in 0..8 {
                s.sc[j] = rec[off::Q4K_SC + 16 * j + r] as i32;
                s.mins[j] = rec[off::Q4K_MIN + 32 * (j / 2) + 2 * r + j % 2] as i32;
            }
        }
        Fmt::Q6K => {
            s.d = f16_at(rec, off::Q6K_D + 2 * r).to_f32();
            for j in 0..16 {
                s.sc[j] = rec[off::Q6K_SC + 16 * j + r] as i8 as i32;
            }
        }
    }
    s
}

/// Dequantizes row `r` of a record into `out` (`block` values) with exactly
/// the float operations candle uses, so the values are bit-identical.
pub(crate) fn dequant(fmt: Fmt, rec: &[u8], r: usize, out: &mut [f32]) {
    let mut c = [0u8; 256];
    let c = &mut c[..fmt.block()];
    codes(fmt, rec, r, c);
    let s = row_scales(fmt, rec, r);
    match fmt {
        Fmt::Q4_0 | Fmt::Q5_0 | Fmt::Q8_0 => {
            let o = fmt.offset();
            for (y, &q) in out.iter_mut().zip(c.iter()) {
                *y = (q as i32 - o) as f32 * s.d;
            }
        }
        Fmt::Q4_1 => {
            for (y, &q) in out.iter_mut().zip(c.iter()) {
                *y = q as f32 * s.d + s.m;
            }
        }
        Fmt::Q4K => {
            for (e, (y, &q)) in out.iter_mut().zip(c.iter()).enumerate() {
                let j = e / 32;
                let d1 = s.d * s.sc[j] as f32;
                let m1 = s.m * s.mins[j] as f32;
                *y = d1 * q as f32 - m1;
            }
        }
        Fmt::Q6K => {
            for (e, (y, &q)) in out.iter_mut().zip(c.iter()).enumerate() {
                *y = s.d * s.sc[e / 16] as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}
