//! A persistent worker pool for the matmul kernels.
//!
//! A forward pass makes a few hundred matmul calls of 10–50 µs each, so the
//! hand-off must cost well under a microsecond: workers spin for a while
//! after each job (the next call usually comes within microseconds) and only
//! then park on a condition variable. The calling thread does part 0 itself.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// Bumped once per job; workers wait for it to change.
    epoch: AtomicUsize,
    /// `*const Job` of the current job (valid while `remaining > 0`).
    job: AtomicUsize,
    remaining: AtomicUsize,
    panicked: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub(crate) struct Pool {
    threads: usize,
    shared: &'static Shared,
    /// One job at a time (concurrent callers queue here).
    submit: Mutex<()>,
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
            epoch: AtomicUsize::new(0),
            job: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let mut started = 1;
        for part in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("treespec-mm{part}"))
                .spawn(move || worker(shared, part));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Pool {
            threads: started,
            shared,
            submit: Mutex::new(()),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(part, parts)` for every `part` in `0..parts` on the pool and
    /// returns when all are done. `parts` is at most `threads()`.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let parts = parts.clamp(1, self.threads);
        if parts == 1 {
            f(0, 1);
            return;
        }
        let guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.shared;
        // Workers with an index >= parts get a no-op part.
        let job = move |part: usize, _: usize| {
            if part < parts {
                f(part, parts)
            }
        };
        let job_ref: Job = &job;
        s.remaining.store(self.threads - 1, Ordering::Relaxed);
        s.job
            .store(&job_ref as *const Job as usize, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                s.wake.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, parts)));
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a matmul worker panicked");
        }
    }
}

fn worker(s: &'static Shared, part: usize) {
    let mut seen = s.epoch.load(Ordering::Acquire);
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins % 64 != 0 || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while s.epoch.load(Ordering::SeqCst) == seen {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
            break;
        }
        seen = s.epoch.load(Ordering::Acquire);
        // SAFETY: the submitter keeps the job alive until `remaining` is 0,
        // which cannot happen before this worker's decrement below.
        let job: Job = unsafe { *(s.job.load(Ordering::Acquire) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| job(part, 0))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}
