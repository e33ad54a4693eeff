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

/// Elements a base pointer may address (only a bound for the index check).
const SPAN: usize = 1 << 24;

/// Reads element `i` (of type `T`, unaligned) counted from `base`.
///
/// # Safety
/// `base + i × size_of::<T>()` must be valid for reading a `T`.
#[inline(always)]
pub(crate) unsafe fn load_at<T: Copy>(base: *const u8, i: usize) -> T {
    // `get_unchecked`: an indexing bound check would stay in release builds
    // (a compare and branch beside every multiply-add of the attention).
    (*(base as *const [Unaligned<T>; SPAN])).get_unchecked(i).0
}

/// Writes element `i` (of type `T`, unaligned) counted from `base`.
///
/// # Safety
/// `base + i × size_of::<T>()` must be valid for writing a `T`.
#[inline(always)]
pub(crate) unsafe fn store_at<T: Copy>(base: *mut u8, i: usize, v: T) {
    (*(base as *mut [Unaligned<T>; SPAN]))
        .get_unchecked_mut(i)
        .0 = v;
}
