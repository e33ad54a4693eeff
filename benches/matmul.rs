//! Quantized matmul: this crate's kernels vs candle's `QMatMul` on the
//! linear layers of Qwen2.5-Coder-0.5B (or 1.5B with `BENCH_MODEL=1.5b`),
//! for N = 1..64 activation rows. The two are interleaved rep by rep so
//! memory-bandwidth drift hits both alike; medians are printed.
//!
//! `cargo bench --bench matmul` (env: `BENCH_N=1,8`, `BENCH_MODEL=1.5b`,
//! `BENCH_SHAPES=0,4` indices, `BENCH_NO_CANDLE=1`, `BENCH_VS=avx512` to
//! compare with another kernel path instead of candle, `BENCH_MIN=1` for
//! minima instead of medians, `BENCH_COPIES=1`, `BENCH_LOAD=1` to time
//! repacking every tensor of the 1.5B model; `TREESPEC_ISA`,
//! `TREESPEC_THREADS` as usual).

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::{Duration, Instant};
use treespec::kernels::{isa, Isa, QMatrix};

fn env_list(key: &str) -> Option<Vec<usize>> {
    std::env::var(key)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
}

/// The median, or with `BENCH_MIN=1` the minimum (the uncontended speed on
/// a machine shared with noisy neighbours).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if std::env::var_os("BENCH_MIN").is_some() {
        v[0]
    } else {
        v[v.len() / 2]
    }
}

/// Pseudo-random weights with row-varying scale (no RNG dependency needed).
fn weights(out: usize, inp: usize, dtype: GgmlDType) -> QTensor {
    let mut s = 0x9e3779b97f4a7c15u64;
    let w: Vec<f32> = (0..out * inp)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect();
    let t = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn time_load() {
    let path = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/treespec/models/qwen2.5-coder-1.5b.gguf");
    let Ok(mut f) = std::fs::File::open(&path) else {
        println!("load: {} not found", path.display());
        return;
    };
    let content = gguf_file::Content::read(&mut f).unwrap();
    let (mut read, mut pack, mut bytes) = (Duration::ZERO, Duration::ZERO, 0usize);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let t0 = Instant::now();
        let q = content.tensor(&mut f, &name, &Device::Cpu).unwrap();
        read += t0.elapsed();
        if q.shape().dims().len() != 2 {
            continue;
        }
        let t1 = Instant::now();
        let m = QMatrix::from_qtensor(&q).unwrap();
        pack += t1.elapsed();
        bytes += q.storage_size_in_bytes();
        drop(m);
    }
    println!(
        "load 1.5B: candle read {:.2} s, repack {:.2} s for {:.0} MB of 2-D weights",
        read.as_secs_f64(),
        pack.as_secs_f64(),
        bytes as f64 / 1e6
    );
}

fn main() {
    if std::env::var_os("BENCH_LOAD").is_some() {
        time_load();
        return;
    }
    let big = std::env::var("BENCH_MODEL").is_ok_and(|v| v == "1.5b");
    let shapes: Vec<(&str, usize, usize, GgmlDType)> = if big {
        vec![
            ("q/o 1536->1536", 1536, 1536, GgmlDType::Q4K),
            ("k 1536->256", 1536, 256, GgmlDType::Q4K),
            ("gate/up 1536->8960", 1536, 8960, GgmlDType::Q4K),
            ("down 8960->1536", 8960, 1536, GgmlDType::Q6K),
            ("lm_head 1536->151936", 1536, 151936, GgmlDType::Q6K),
        ]
    } else {
        vec![
            ("q/o 896->896", 896, 896, GgmlDType::Q5_0),
            ("k 896->128", 896, 128, GgmlDType::Q5_0),
            ("gate/up 896->4864", 896, 4864, GgmlDType::Q5_0),
            ("down 4864->896", 4864, 896, GgmlDType::Q6K),
            ("down 4864->896", 4864, 896, GgmlDType::Q4K),
            ("lm_head 896->151936", 896, 151936, GgmlDType::Q8_0),
            ("gate+up 896->9728", 896, 9728, GgmlDType::Q5_0),
            ("q+k+v 896->1152", 896, 1152, GgmlDType::Q5_0),
        ]
    };
    let pick = env_list("BENCH_SHAPES");
    let ns = env_list("BENCH_N").unwrap_or(vec![1, 2, 4, 8, 16, 32, 64]);
    let with_candle = std::env::var_os("BENCH_NO_CANDLE").is_none();
    // `BENCH_VS=avx512` (a kernel path): compare against that path instead
    // of candle, interleaved rep by rep like candle would be.
    let vs = std::env::var("BENCH_VS")
        .ok()
        .and_then(|v| Isa::available().into_iter().find(|i| i.name() == v));
    let with_candle = with_candle && vs.is_none();
    match vs {
        Some(v) => println!("isa={} (second column: {})", isa(), v.name()),
        None => println!("isa={} (candle: QMatMul on CPU)", isa()),
    }
    println!(
        "{:<22} {:>5} {:>3} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7}",
        "shape", "dtype", "N", "ours ms", "GMAC/s", "c(N)/c1", "candle ms", "GMAC/s", "speedup"
    );
    for (i, &(name, inp, out, dtype)) in shapes.iter().enumerate() {
        if pick.as_ref().is_some_and(|p| !p.contains(&i)) {
            continue;
        }
        let q = weights(out, inp, dtype);
        // Enough copies (768 MB) to overflow the last-level cache, as a
        // forward pass does: each rep uses the next copy. 96 MB, the old
        // default, sat in a 300 MB Xeon L3 and hid half the memory cost
        // (gate|up N = 8: 0.27–0.30 ms vs 0.35–0.48 ms from memory).
        // (`BENCH_COPIES=1` keeps one copy: the weights then stay in cache
        // and the figures show the kernels' compute limit.)
        let copies = env_list("BENCH_COPIES")
            .and_then(|c| c.first().copied())
            .unwrap_or((768usize << 20).div_ceil(q.storage_size_in_bytes()));
        let ours: Vec<QMatrix> = (0..copies)
            .map(|_| QMatrix::from_qtensor(&q).unwrap())
            .collect();
        let theirs: Vec<QMatMul> = (0..if with_candle { copies } else { 0 })
            .map(|_| {
                let data = q.data().unwrap().to_vec();
                let st = QStorage::from_data(data.into(), &Device::Cpu, dtype).unwrap();
                QMatMul::from_qtensor(QTensor::new(st, (out, inp)).unwrap()).unwrap()
            })
            .collect();
        let mut ours_1 = None;
        for &n in &ns {
            let x: Vec<f32> = (0..n * inp)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (n, inp), &Device::Cpu).unwrap();
            let mut y = vec![0f32; n * out];
            // Warm-up, and a first estimate of the rep count.
            let t0 = Instant::now();
            ours[0].matmul(&x, n, &mut y);
            let est = t0.elapsed().as_secs_f64();
            if with_candle {
                theirs[0].forward(&xt).unwrap();
            }
            let reps = ((0.4 / est.max(1e-6)) as usize).clamp(9, 400);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for rep in 0..reps {
                let t = Instant::now();
                ours[rep % copies].matmul(&x, n, &mut y);
                a.push(t.elapsed().as_secs_f64());
                if let Some(isa) = vs {
                    let t = Instant::now();
                    ours[(rep + copies / 2) % copies].matmul_with(isa, &x, n, &mut y);
                    b.push(t.elapsed().as_secs_f64());
                } else if with_candle {
                    let t = Instant::now();
                    let r = theirs[rep % copies].forward(&xt).unwrap();
                    b.push(t.elapsed().as_secs_f64());
                    drop(r);
                }
            }
            let macs = (n * inp * out) as f64;
            let ta = median(&mut a);
            let ours_1 = *ours_1.get_or_insert(ta);
            let (tb, gb) = if with_candle || vs.is_some() {
                let tb = median(&mut b);
                (tb * 1e3, macs / tb / 1e9)
            } else {
                (f64::NAN, f64::NAN)
            };
            println!(
                "{:<22} {:>5} {:>3} {:>9.4} {:>8.1} {:>7.2} {:>9.4} {:>8.1} {:>7.2}",
                name,
                format!("{dtype:?}"),
                n,
                ta * 1e3,
                macs / ta / 1e9,
                ta / ours_1,
                tb,
                gb,
                tb / 1e3 / ta
            );
        }
    }
}
