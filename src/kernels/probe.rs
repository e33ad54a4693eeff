//! The machine's two limits as the matmul kernels see them, measured on the
//! same pool of threads: memory read bandwidth (the same huge-page-advised
//! buffer, the same software prefetch, wide loads) and the peak rate of the
//! int8 multiply-add instruction the kernels are built on. `bench forward`
//! reports a forward's time against both: weights / bandwidth is the floor
//! for few tokens, multiply-adds / peak the floor for many.

use super::buf::AlignedBuf;

/// Best of `reps` passes over a `bytes`-sized buffer (much larger than the
/// caches), in GB/s. This host's bandwidth drifts between states within
/// seconds, so callers should interleave it with what they compare.
pub fn read_bandwidth_gb_s(bytes: usize, reps: usize) -> f64 {
    let bytes = bytes.max(1 << 20) / 4096 * 4096;
    let mut buf = AlignedBuf::zeroed(bytes);
    // Non-zero pages: a zero page could be shared copy-on-write by the kernel.
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate().step_by(4096) {
        *b = i as u8 | 1;
    }
    let threads = super::threads().max(1);
    // Many chunks per thread so a thread that was descheduled costs little.
    let chunks = 16 * threads;
    let chunk = (bytes / chunks) / 4096 * 4096;
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        super::parallel_for(chunks, 1, &|r: std::ops::Range<usize>| {
            for c in r {
                let part = &buf.as_slice()[c * chunk..(c + 1) * chunk];
                sink.fetch_add(sum_lines(part), std::sync::atomic::Ordering::Relaxed);
            }
        });
        best = best.max((chunks * chunk) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
    best
}

/// Touches every 64-byte line of `part` (one wide load per line).
fn sum_lines(part: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            return unsafe { sum_lines_avx2(part) };
        }
    }
    part.iter().step_by(64).map(|&b| b as u64).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_lines_avx2(part: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let dist = super::prefetch_distance(1);
    let mut acc = [_mm256_setzero_si256(); 4];
    let p = part.as_ptr();
    let lines = part.len() / 64;
    let mut i = 0;
    while i + 4 <= lines {
        super::prefetch_rec(p.add(i * 64), 256, dist, false);
        for (k, a) in acc.iter_mut().enumerate() {
            let v = _mm256_load_si256(p.add((i + k) * 64) as *const __m256i);
            *a = _mm256_xor_si256(*a, v);
        }
        i += 4;
    }
    let mut out = [0u64; 4];
    let x = _mm256_xor_si256(
        _mm256_xor_si256(acc[0], acc[1]),
        _mm256_xor_si256(acc[2], acc[3]),
    );
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, x);
    out.iter().fold(0, |a, &b| a ^ b)
}

/// Peak int8 multiply-adds per second of the pool's threads together, in
/// GMAC/s, on the path the kernels use (`vpdpbusd` on 512-bit registers: 64
/// multiply-adds each): every thread runs 12 independent accumulator chains
/// (more than latency × issue width) with operands in registers, so nothing
/// but the instruction's throughput and the clock bounds it. `None` where the
/// kernels have no such instruction (the AVX2 and scalar paths).
pub fn int8_peak_gmac_s() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::isa::selected() == super::Isa::Avx512 {
        let threads = super::threads().max(1);
        const ITERS: usize = 1 << 20;
        let sink = std::sync::atomic::AtomicU64::new(0);
        let mut best = 0f64;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            super::parallel_for(threads, 1, &|r: std::ops::Range<usize>| {
                for _ in r {
                    // SAFETY: the AVX-512 path was detected.
                    let v = unsafe { dpbusd_chains(ITERS) };
                    sink.fetch_add(v as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
            let macs = (threads * ITERS * 12 * 64) as f64;
            best = best.max(macs / t.elapsed().as_secs_f64() / 1e9);
        }
        std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
        return Some(best);
    }
    None
}

/// `iters` rounds of 12 independent `vpdpbusd`; returns a value that
/// depends on all of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dpbusd_chains(iters: usize) -> u32 {
    use std::arch::x86_64::*;
    let w = std::hint::black_box(_mm512_set1_epi8(1));
    let x = std::hint::black_box(_mm512_set1_epi8(2));
    let mut acc = [_mm512_setzero_si512(); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_dpbusd_epi32(*a, w, x);
        }
    }
    let mut t = _mm512_setzero_si512();
    for a in acc {
        t = _mm512_xor_si512(t, a);
    }
    _mm512_reduce_add_epi32(t) as u32
}
