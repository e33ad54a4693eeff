//! Unaligned loads and stores without per-access debug-build checks.
//!
//! The test and bench profiles build with debug assertions, which put UB
//! checks on `ptr::read_unaligned` (used by `_mm512_loadu_si512` and
//! friends: a stack round trip per load) and a null check on every raw
//! pointer dereference (each address must then live in its own register).
//! Here every access is `base[index]` on a `packed` element type: one null
//! check per base pointer, which the compiler shares between accesses, and
//! constant indices that fold into the instruction's addressing.

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Unaligned<T>(T);

/// The elements `0..=i` counted from `base`, as a slice of packed elements.
///
/// A slice built from (base, i + 1) rather than a reference to a fixed-size
/// array: the array form claimed 2^24 elements behind every base pointer,
/// memory that does not exist (undefined behaviour however it was used).
/// The slice claims only what the caller's contract below guarantees.
///
/// # Safety
/// `base .. base + (i + 1) × size_of::<T>()` must be one allocation, valid
/// for reads (and for writes where the slice is written).
#[inline(always)]
unsafe fn elements<'a, T>(base: *const u8, i: usize) -> &'a [Unaligned<T>] {
    // SAFETY: the caller guarantees the range is valid; `Unaligned<T>` has
    // alignment 1, so any address is aligned for it.
    unsafe { &*std::ptr::slice_from_raw_parts(base as *const Unaligned<T>, i + 1) }
}

/// Reads element `i` (of type `T`, unaligned) counted from `base`.
///
/// # Safety
/// `base .. base + (i + 1) × size_of::<T>()` must be one allocation valid
/// for reading (every caller indexes forward from the start of a row or a
/// block it owns, so the elements before `i` are in bounds too).
#[inline(always)]
pub(crate) unsafe fn load_at<T: Copy>(base: *const u8, i: usize) -> T {
    // `get_unchecked`: an indexing bound check would stay in release builds
    // (a compare and branch beside every multiply-add of the attention);
    // `i < i + 1` holds by construction.
    // SAFETY: see the function's contract.
    unsafe { elements::<T>(base, i).get_unchecked(i).0 }
}

/// Writes element `i` (of type `T`, unaligned) counted from `base`.
///
/// # Safety
/// `base .. base + (i + 1) × size_of::<T>()` must be one allocation valid
/// for writing, with no live reference into it.
#[inline(always)]
pub(crate) unsafe fn store_at<T: Copy>(base: *mut u8, i: usize, v: T) {
    // SAFETY: as `elements`, mutable: the caller owns the range exclusively.
    let s = unsafe { &mut *std::ptr::slice_from_raw_parts_mut(base as *mut Unaligned<T>, i + 1) };
    // SAFETY: `i < i + 1 == s.len()`.
    unsafe { s.get_unchecked_mut(i).0 = v };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unaligned round trip through odd byte offsets (runs under Miri:
    /// `cargo +nightly miri test unaligned`, where a toolchain has it).
    #[test]
    fn unaligned_round_trip_at_odd_offsets() {
        let mut buf = vec![0u8; 1 + 4 * 8];
        // SAFETY: offset 1 of a 33-byte buffer.
        let base = unsafe { buf.as_mut_ptr().add(1) };
        for i in 0..8 {
            // SAFETY: base + (i + 1) * 4 <= 1 + 32 bytes of `buf`.
            unsafe { store_at::<f32>(base, i, i as f32 * 1.5) };
        }
        for i in 0..8 {
            // SAFETY: as above.
            let v = unsafe { load_at::<f32>(base, i) };
            assert_eq!(v, i as f32 * 1.5);
        }
        assert_eq!(&buf[1..5], &0f32.to_le_bytes());
        assert_eq!(&buf[5..9], &1.5f32.to_le_bytes());
    }
}
