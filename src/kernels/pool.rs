//! A persistent worker pool for the matmul kernels.
//!
//! A forward pass makes a few hundred matmul calls of 10–50 µs each, so the
//! hand-off must cost well under a microsecond: idle workers spin for a
//! while (the next call usually comes within microseconds) and only then
//! park on a condition variable.
//!
//! Work is a range of units cut into one contiguous *share* per thread, each
//! handed out in chunks through its own atomic cursor. A thread walks its own
//! share first, so every thread streams one contiguous stretch of weights
//! (measured on the 0.5B's projections with the weights coming from memory:
//! 2–6% faster than chunks dealt round-robin, whose every chunk started a
//! new stream; whole forwards alternated in one process, 1–3% on minima);
//! then it takes chunks from the others' shares. So a worker
//! that the OS has not scheduled (the machine may be busy with other
//! processes) never stalls a call: the caller does its share too. A late
//! worker cannot join a call that has finished: it joins through `state`,
//! which the caller closes before returning, and only a joined worker
//! touches the job.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking (`TREESPEC_SPIN_US`): long
/// enough to catch the next projection of the same layer, short enough not
/// to steal a core from candle's own threads between layers.
fn spin_time() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("TREESPEC_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// `state`: job number in the high 32 bits, `OPEN` while workers may join,
/// number of workers inside the job in the low bits.
const OPEN: u64 = 1 << 31;
const COUNT: u64 = OPEN - 1;

struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync),
    units: usize,
    chunk: usize,
    /// Next unit of each share (share `i` covers `bounds(i)`).
    next: Vec<AtomicUsize>,
}

impl Job<'_> {
    /// Units of share `i`.
    fn bounds(&self, i: usize) -> Range<usize> {
        let n = self.next.len();
        i * self.units / n..(i + 1) * self.units / n
    }

    /// Runs chunks until none is left: those of share `first` (this
    /// thread's own), then the following shares'.
    fn work(&self, first: usize) {
        let n = self.next.len();
        for k in 0..n {
            let i = (first + k) % n;
            let end = self.bounds(i).end;
            loop {
                let start = self.next[i].fetch_add(self.chunk, Ordering::Relaxed);
                if start >= end {
                    break;
                }
                (self.f)(start..(start + self.chunk).min(end));
            }
        }
    }
}

struct Shared {
    state: AtomicU64,
    /// `*const Job` of the open job.
    job: AtomicUsize,
    panicked: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub(crate) struct Pool {
    threads: usize,
    shared: &'static Shared,
    /// One job at a time (concurrent callers queue here).
    submit: Mutex<u32>,
}

/// Thread count: `TREESPEC_THREADS`, else the available parallelism.
fn thread_count() -> usize {
    std::env::var("TREESPEC_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .min(256)
}

/// `TREESPEC_POOL=rayon` hands the chunks to rayon instead (to compare
/// the per-call overhead).
fn use_rayon() -> bool {
    static RAYON: OnceLock<bool> = OnceLock::new();
    *RAYON.get_or_init(|| std::env::var("TREESPEC_POOL").is_ok_and(|v| v == "rayon"))
}

pub(crate) fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(thread_count()))
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let mut started = 1;
        for i in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("treespec-mm{i}"))
                .spawn(move || worker(shared));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Pool {
            threads: started,
            shared,
            submit: Mutex::new(0),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` over `0..units` in chunks of `chunk` units, spread over the
    /// pool and the calling thread; returns when all are done.
    pub(crate) fn run(&self, units: usize, chunk: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if self.threads == 1 || units <= chunk {
            f(0..units);
            return;
        }
        if use_rayon() {
            use rayon::prelude::*;
            (0..units.div_ceil(chunk))
                .into_par_iter()
                .for_each(|c| f(c * chunk..((c + 1) * chunk).min(units)));
            return;
        }
        let mut epoch = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        *epoch = epoch.wrapping_add(1);
        let s = self.shared;
        let shares = self.threads;
        let job = Job {
            f,
            units,
            chunk,
            next: (0..shares)
                .map(|i| AtomicUsize::new(i * units / shares))
                .collect(),
        };
        s.job.store(&job as *const Job as usize, Ordering::Relaxed);
        s.state
            .store(((*epoch as u64) << 32) | OPEN, Ordering::SeqCst);
        {
            let sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                s.wake.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job.work(0)));
        // Close the job once no worker is inside it. A worker still inside
        // may have been preempted: yield soon so it can finish on this core.
        let mut spins = 0u32;
        loop {
            let cur = s.state.load(Ordering::Acquire);
            if cur & COUNT == 0
                && s.state
                    .compare_exchange(cur, cur & !OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                break;
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        drop(epoch);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a matmul worker panicked");
        }
    }
}

fn worker(s: &'static Shared) {
    let spin = spin_time();
    let mut seen = s.state.load(Ordering::Acquire) >> 32;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.state.load(Ordering::Acquire) >> 32 == seen {
            spins += 1;
            if !spins.is_multiple_of(64) || start.elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while s.state.load(Ordering::SeqCst) >> 32 == seen {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
        }
        let mut cur = s.state.load(Ordering::Acquire);
        seen = cur >> 32;
        // Join the job if it is still open.
        // Its share: one past the workers already inside (the caller has
        // share 0; a repeat is harmless, shares are claimed chunk by chunk).
        let joined = loop {
            if cur >> 32 != seen || cur & OPEN == 0 {
                break None;
            }
            match s
                .state
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break Some((cur & COUNT) as usize + 1),
                Err(now) => cur = now,
            }
        };
        let Some(share) = joined else {
            continue;
        };
        // SAFETY: the job outlives the open state, which the caller cannot
        // close while this worker is counted in it.
        let job = unsafe { &*(s.job.load(Ordering::Acquire) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| job.work(share))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit runs exactly once, whatever the share and chunk sizes
    /// (fewer units than threads, chunks larger than a share, ragged ends).
    #[test]
    fn every_unit_runs_once() {
        let pool = Pool::new(3);
        for units in [1usize, 2, 3, 5, 64, 97, 1000] {
            for chunk in [1usize, 2, 7, 40, 2000] {
                let hits: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
                pool.run(units, chunk, &|r: Range<usize>| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "units {units}, chunk {chunk}"
                );
            }
        }
    }
}
