//! A persistent worker pool for the matmul kernels.
//!
//! A forward pass makes a few hundred matmul calls of 10–50 µs each, so the
//! hand-off must cost well under a microsecond: idle workers spin for a
//! while (the next call usually comes within microseconds) and only then
//! park on a condition variable.
//!
//! Work is a range of units handed out in chunks through an atomic counter,
//! and the calling thread takes chunks too. So a worker that the OS has not
//! scheduled (the machine may be busy with other processes) never stalls a
//! call: the caller just does its share. A late worker cannot join a call
//! that has finished: it joins through `state`, which the caller closes
//! before returning, and only a joined worker touches the job.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

/// `state`: job number in the high 32 bits, `OPEN` while workers may join,
/// number of workers inside the job in the low bits.
const OPEN: u64 = 1 << 31;
const COUNT: u64 = OPEN - 1;

struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync),
    units: usize,
    chunk: usize,
    next: AtomicUsize,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.units {
                return;
            }
            (self.f)(start..(start + self.chunk).min(self.units));
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
        let mut epoch = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        *epoch = epoch.wrapping_add(1);
        let s = self.shared;
        let job = Job {
            f,
            units,
            chunk,
            next: AtomicUsize::new(0),
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
        let mine = catch_unwind(AssertUnwindSafe(|| job.work()));
        // Close the job once no worker is inside it.
        let mut spins = 0u32;
        loop {
            let cur = s.state.load(Ordering::Acquire);
            if cur & COUNT == 0
                && s
                    .state
                    .compare_exchange(cur, cur & !OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                break;
            }
            spins += 1;
            if spins < 1 << 12 {
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
    let mut seen = s.state.load(Ordering::Acquire) >> 32;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.state.load(Ordering::Acquire) >> 32 == seen {
            spins += 1;
            if spins % 64 != 0 || start.elapsed() < SPIN {
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
        let joined = loop {
            if cur >> 32 != seen || cur & OPEN == 0 {
                break false;
            }
            match s
                .state
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: the job outlives the open state, which the caller cannot
        // close while this worker is counted in it.
        let job = unsafe { &*(s.job.load(Ordering::Acquire) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| job.work())).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}
