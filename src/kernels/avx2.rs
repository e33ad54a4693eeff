//! AVX2 kernels (placeholder: scalar until written).
use super::act::QAct;
use super::Tiles;
use std::ops::Range;

pub(crate) unsafe fn run(m: &Tiles, act: &QAct, tiles: Range<usize>, y: *mut f32) {
    super::scalar::run(m, act, tiles, y)
}
