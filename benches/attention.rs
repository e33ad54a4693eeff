//! Tree attention over a long committed prefix: the verify pass's
//! attention for N new tokens (a chain, so every row sees the most) over
//! `ctx` cached positions, through every layer of a Qwen2.5-Coder-0.5B-shaped
//! cache (24 layers, 14 query heads, 2 kv heads, head_dim 64). Between
//! layers a 64 MB buffer is read (untimed) so the cache comes from memory,
//! as in a forward where the weights stream through. N values are
//! interleaved rep by rep; medians (or minima with `BENCH_MIN=1`).
//!
//! `cargo bench --bench attention` (env: `BENCH_CTX=8000`, `BENCH_N=1,4,16,64`,
//! `BENCH_REPS=7`, `BENCH_MIN=1` for minima, `TREESPEC_THREADS`).

use std::time::Instant;
use treespec::model::attention::{tree_attention, AttentionShape, TreeMask};
use treespec::model::KvCache;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (layers, heads, kv_heads, d) = (24, 14, 2, 64);
    let ctx = env_usize("BENCH_CTX", 8000);
    let reps = env_usize("BENCH_REPS", 7).max(1);
    let ns: Vec<usize> = std::env::var("BENCH_N")
        .unwrap_or("1,4,16,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let maxn = ns.iter().copied().max().unwrap_or(1);
    let shape = AttentionShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: d,
    };
    // Queries and new keys: values spread over [-1, 1).
    let mut i = 0usize;
    let mut rnd = move || {
        i += 1;
        (i * 7919 % 1000) as f32 / 500.0 - 1.0
    };
    let mut cache = KvCache::new(layers, kv_heads, d, ctx + maxn);
    cache.fill_pseudo_random(ctx, 512).unwrap();
    let row = kv_heads * d;
    let evict: Vec<u8> = (0..64usize << 20).map(|i| i as u8).collect();
    let mut sink = 0u64;
    println!(
        "ctx {ctx}, {layers} layers, threads {}",
        treespec::kernels::threads()
    );
    let mut times = vec![Vec::new(); ns.len()];
    for rep in 0..=reps {
        for (k, &n) in ns.iter().enumerate() {
            let parents: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
            let mask = TreeMask::from_parents(&parents);
            let q: Vec<f32> = (0..n * heads * d).map(|_| rnd()).collect();
            cache.begin(n).unwrap();
            let mut total = 0.0;
            for l in 0..layers {
                let kn: Vec<f32> = (0..n * row).map(|_| rnd()).collect();
                cache.write(l, &kn, &kn);
                sink = sink.wrapping_add(evict.iter().step_by(64).map(|&b| b as u64).sum::<u64>());
                let t = Instant::now();
                let out = tree_attention(&shape, &q, &cache.layer(l), &mask);
                total += t.elapsed().as_secs_f64();
                sink = sink.wrapping_add(out[0].to_bits() as u64);
            }
            if rep > 0 {
                times[k].push(total * 1e3);
            }
        }
    }
    let pick_min = std::env::var_os("BENCH_MIN").is_some();
    println!("{:>5} {:>10} {:>10}", "N", "ms", "ms/N");
    for (k, &n) in ns.iter().enumerate() {
        let t = &mut times[k];
        t.sort_by(|a, b| a.total_cmp(b));
        let ms = if pick_min { t[0] } else { t[t.len() / 2] };
        println!("{n:>5} {ms:>10.2} {:>10.2}", ms / n as f64);
    }
    if sink == 42 {
        println!();
    }
}
