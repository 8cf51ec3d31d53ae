//! A global allocator that records the largest single allocation a thread asks for,
//! so a test can check that a decoder fed a length prefix claiming gigabytes does not
//! allocate them:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: strata_testkit::alloc::PeakAlloc = strata_testkit::alloc::PeakAlloc;
//!
//! let (result, largest) = strata_testkit::alloc::largest_allocation(|| decode(&bytes));
//! assert!(largest <= 1 << 20);
//! ```
//!
//! Per thread, so tests running in parallel do not see each other's allocations. It
//! wraps the system allocator and adds one thread-local comparison per allocation.

// A `GlobalAlloc` cannot be written without `unsafe`: this module forwards to `System`
// and adds nothing else that needs it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // Const-initialised and without `Drop`: usable from the allocator at any time,
    // thread exit included (no lazy initialisation, no destructor registered).
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

/// The system allocator, recording the largest allocation per thread (see the module
/// docs). Install it with `#[global_allocator]` in a test binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakAlloc;

// SAFETY: every call forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest single allocation (in bytes) this
/// thread made during it; 0 when [`PeakAlloc`] is not the global allocator.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LARGEST.with(|l| l.replace(0));
    let out = f();
    let largest = LARGEST.with(|l| l.replace(before.max(l.get())));
    (out, largest)
}
