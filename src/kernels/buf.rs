//! An owned, zero-initialised, over-aligned byte buffer for repacked weights.
//! Big buffers are 2 MB aligned and advised to use transparent huge pages:
//! a matmul streams the whole matrix, and 4 KB pages cost a TLB miss every
//! 4 KB of that stream.

use std::alloc::{alloc, dealloc, Layout};

const HUGE_PAGE: usize = 2 << 20;

pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
    len: usize,
}

// SAFETY: the buffer owns its allocation (no aliasing pointer escapes but
// through `&self` / `&mut self` borrows) and holds plain bytes, so moving it
// to another thread or reading it from several is as safe as for a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> Self {
        let huge = len >= HUGE_PAGE;
        let align = if huge { HUGE_PAGE } else { 64 };
        // Round the size up so the last huge page is whole (madvise works on
        // whole pages) and so SIMD loads may over-read a little at the end.
        let size = (len + 64).div_ceil(align) * align;
        let layout = Layout::from_size_align(size, align).expect("valid layout");
        // Not `alloc_zeroed`: the pages must be advised before first touch.
        // SAFETY: `layout` has a non-zero size (≥ 64 bytes, rounded up).
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        #[cfg(target_os = "linux")]
        if huge && std::env::var_os("TREESPEC_NO_HUGEPAGES").is_none() {
            // Advisory only: failure just means 4 KB pages.
            // SAFETY: `ptr..ptr + size` is the allocation just made, aligned
            // to a huge page; madvise only changes how it is backed.
            unsafe {
                libc::madvise(ptr as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            }
        }
        // SAFETY: `ptr` is a live allocation of `size` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, size) };
        AlignedBuf { ptr, layout, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `len ≤ size` bytes from `ptr` are allocated and were
        // zero-initialised in `zeroed`; the borrow of `self` keeps them alive.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc(self.layout)` and is freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}
