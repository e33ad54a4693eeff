//! Quantized matmul kernels: dequantization bit-identical to candle, every
//! SIMD path against the scalar reference, and everything against a plain
//! f32 matmul of the dequantized weights.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use treespec::kernels::{Isa, QMatrix};

const ROWS: [usize; 9] = [1, 2, 3, 4, 7, 8, 16, 33, 64];

fn random(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            // Some outliers so block scales vary.
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

fn quantized(dtype: GgmlDType, out: usize, inp: usize, seed: u64) -> QTensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = random(&mut rng, out * inp);
    // Vary the row magnitudes too.
    for (r, row) in w.chunks_mut(inp).enumerate() {
        let s = 0.01 * (1 + r % 7) as f32;
        row.iter_mut().for_each(|v| *v *= s);
    }
    let t = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn dequantized(q: &QTensor) -> Vec<f32> {
    q.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn act_block(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4K | GgmlDType::Q6K => 256,
        _ => 32,
    }
}

/// Checks `matmul` on every path against the reference and the f32 matmul.
fn check_matmul(dtype: GgmlDType, out: usize, inp: usize, seed: u64) {
    let q = quantized(dtype, out, inp, seed);
    let m = QMatrix::from_qtensor(&q).unwrap();
    assert_eq!((m.out_features(), m.in_features()), (out, inp));
    assert_eq!(m.dtype(), dtype);
    let w = dequantized(&q);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let quant = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16);
    for &n in &ROWS {
        let x = random(&mut rng, n * inp);
        let mut reference = vec![f32::NAN; n * out];
        m.matmul_with(Isa::Scalar, &x, n, &mut reference);
        for i in 0..n {
            let xr = &x[i * inp..][..inp];
            let bs = act_block(dtype);
            let amax: Vec<f32> = xr
                .chunks(bs)
                .map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())))
                .collect();
            for j in 0..out {
                let wr = &w[j * inp..][..inp];
                let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wr.iter().zip(xr).map(|(&a, &b)| (a * b).abs() as f64).sum();
                // int8 rounding moves each activation by at most half a step.
                let qerr: f64 = if quant {
                    wr.iter()
                        .enumerate()
                        .map(|(k, &a)| a.abs() as f64 * amax[k / bs] as f64 / 254.0)
                        .sum()
                } else {
                    0.0
                };
                let got = reference[i * out + j] as f64;
                assert!(
                    (got - exact).abs() <= qerr * 1.01 + 1e-5 * mag + 1e-6,
                    "{dtype:?} [{out}x{inp}] n={n} row {i} col {j}: scalar {got} vs f32 {exact} (bound {qerr})"
                );
            }
        }
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; n * out];
            m.matmul_with(isa, &x, n, &mut y);
            for (idx, (&a, &b)) in y.iter().zip(&reference).enumerate() {
                let (i, j) = (idx / out, idx % out);
                let mag: f32 = w[j * inp..][..inp]
                    .iter()
                    .zip(&x[i * inp..][..inp])
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (a - b).abs() <= 2e-5 * mag + 1e-6,
                    "{dtype:?} [{out}x{inp}] n={n} {isa:?} row {i} col {j}: {a} vs scalar {b}"
                );
            }
        }
    }
}

fn check_dequant(dtype: GgmlDType, out: usize, inp: usize, seed: u64) {
    let q = quantized(dtype, out, inp, seed);
    let m = QMatrix::from_qtensor(&q).unwrap();
    let w = dequantized(&q);
    let mut row = vec![0f32; inp];
    for j in 0..out {
        m.dequantize_row(j, &mut row);
        for (k, (&a, &b)) in row.iter().zip(&w[j * inp..][..inp]).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype:?} row {j} col {k}: {a} vs {b}"
            );
        }
    }
}

const BLOCK32: [GgmlDType; 4] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
];
const KQUANTS: [GgmlDType; 2] = [GgmlDType::Q4K, GgmlDType::Q6K];

#[test]
fn dequantize_row_is_bit_identical() {
    for (s, &dt) in BLOCK32.iter().enumerate() {
        check_dequant(dt, 37, 576, s as u64);
    }
    for (s, &dt) in KQUANTS.iter().enumerate() {
        check_dequant(dt, 21, 768, 10 + s as u64);
    }
    check_dequant(GgmlDType::F32, 5, 64, 20);
    check_dequant(GgmlDType::F16, 5, 64, 21);
    check_dequant(GgmlDType::Q5K, 3, 256, 22);
}

#[test]
fn block32_formats_match_reference() {
    for (s, &dt) in BLOCK32.iter().enumerate() {
        for (i, &(out, inp)) in [(37, 896), (16, 576), (130, 1536), (5, 32)]
            .iter()
            .enumerate()
        {
            check_matmul(dt, out, inp, (100 * s + i) as u64);
        }
    }
}

#[test]
fn kquant_formats_match_reference() {
    for (s, &dt) in KQUANTS.iter().enumerate() {
        for (i, &(out, inp)) in [(37, 512), (45, 1536), (20, 256), (16, 4864)]
            .iter()
            .enumerate()
        {
            check_matmul(dt, out, inp, (200 * s + i) as u64);
        }
    }
}

#[test]
fn dense_formats_match_reference() {
    for dt in [GgmlDType::F32, GgmlDType::F16] {
        check_matmul(dt, 19, 96, 7);
    }
}

#[test]
fn forward_keeps_leading_dims() {
    let q = quantized(GgmlDType::Q8_0, 40, 64, 3);
    let m = QMatrix::from_qtensor(&q).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let x = random(&mut rng, 2 * 3 * 64);
    let xt = Tensor::from_vec(x.clone(), (2, 3, 64), &Device::Cpu).unwrap();
    let y = m.forward(&xt).unwrap();
    assert_eq!(y.dims(), &[2, 3, 40]);
    let mut want = vec![0f32; 6 * 40];
    m.matmul(&x, 6, &mut want);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let bad = Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&bad).is_err());
}

#[test]
fn rejects_unusable_shapes() {
    let t = Tensor::zeros((4, 4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    assert!(QMatrix::from_qtensor(&q).is_err());
}

#[test]
fn empty_matrix_is_fine() {
    let t = Tensor::zeros((0, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let m = QMatrix::from_qtensor(&q).unwrap();
    let mut y = vec![];
    m.matmul(&[1.0; 64], 1, &mut y);
    assert_eq!(m.out_features(), 0);
}

#[test]
fn isa_names_a_supported_path() {
    let name = treespec::kernels::isa();
    assert!(Isa::available().iter().any(|i| i.name() == name));
}

/// Real weights of every format the three models use, when they are here
/// (under CI, where `.ci/run` pulls all three, a missing one fails).
#[test]
fn real_model_tensors() {
    let dir = common::treespec_home().join("models");
    let cases: [(&str, &[&str]); 3] = [
        (
            "smollm2-135m.gguf",
            &["blk.0.attn_q.weight", "blk.0.ffn_down.weight"], // Q4_1
        ),
        (
            "qwen2.5-coder-0.5b.gguf",
            &[
                "blk.0.attn_q.weight",   // Q5_0
                "blk.0.attn_v.weight",   // Q8_0
                "blk.0.ffn_down.weight", // Q6_K
                "blk.1.ffn_down.weight", // Q4_K
            ],
        ),
        (
            "qwen2.5-coder-1.5b.gguf",
            &["blk.0.attn_k.weight", "blk.0.ffn_down.weight"], // Q4_K, Q6_K
        ),
    ];
    for (file, names) in cases {
        let path = dir.join(file);
        let Ok(mut f) = std::fs::File::open(&path) else {
            assert!(
                !common::under_ci(),
                "{} not found: under CI every model this test reads must be pulled",
                path.display()
            );
            eprintln!("skipped: {} not found", path.display());
            continue;
        };
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        for &name in names {
            check_real(&content.tensor(&mut f, name, &Device::Cpu).unwrap(), name);
        }
    }
}

fn check_real(q: &QTensor, name: &str) {
    let m = QMatrix::from_qtensor(q).unwrap();
    let (out, inp) = (m.out_features(), m.in_features());
    let w = dequantized(q);
    let mut row = vec![0f32; inp];
    for j in (0..out).step_by(7) {
        m.dequantize_row(j, &mut row);
        assert!(
            row.iter()
                .zip(&w[j * inp..])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} row {j}"
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let n = 5;
    let x = random(&mut rng, n * inp);
    let mut reference = vec![0f32; n * out];
    m.matmul_with(Isa::Scalar, &x, n, &mut reference);
    for isa in Isa::available() {
        let mut y = vec![0f32; n * out];
        m.matmul_with(isa, &x, n, &mut y);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in y.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-4 * scale, "{name} {isa:?}: {a} vs {b}");
        }
    }
}

/// Several threads sharing the pool (and one matrix) get the same results
/// as calls made one at a time.
#[test]
fn concurrent_callers_get_the_same_results() {
    let q = quantized(GgmlDType::Q4_1, 300, 576, 77);
    let m = std::sync::Arc::new(QMatrix::from_qtensor(&q).unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(78);
    let n = 9;
    let x = std::sync::Arc::new(random(&mut rng, n * 576));
    let mut want = vec![0f32; n * 300];
    m.matmul(&x, n, &mut want);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (m, x) = (m.clone(), x.clone());
            std::thread::spawn(move || {
                let mut y = vec![0f32; n * 300];
                for _ in 0..50 {
                    y.fill(f32::NAN);
                    m.matmul(&x, n, &mut y);
                }
                y
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

/// Stacked matrices (Q|K|V, gate|up in one call) give exactly the parts'
/// bits, on every path, whether the parts share a format and whole tiles or
/// not (Qwen2.5-Coder-0.5B has Q5_0 q/k with a Q8_0 v in half its layers);
/// parts that cannot be stacked come back unchanged.
#[test]
fn stacking_gives_the_parts_bits() {
    use GgmlDType::*;
    let cases: [(&[(GgmlDType, usize)], usize); 7] = [
        (&[(Q5_0, 64), (Q5_0, 16), (Q5_0, 21)], 96),
        (&[(Q4K, 32), (Q4K, 48), (Q4K, 16)], 256),
        (&[(F32, 5), (F32, 3), (F32, 7)], 40),
        (&[(Q5_0, 64), (Q5_0, 16), (Q8_0, 16)], 96),
        // A ragged part in the middle, and a format that comes back.
        (&[(Q8_0, 20), (Q8_0, 16), (Q4_0, 5), (Q8_0, 16)], 64),
        (&[(Q4K, 32), (Q6K, 16), (Q4K, 16)], 256),
        (&[(Q4_1, 7), (Q5_0, 16)], 64),
    ];
    for (parts, inp) in cases {
        let tensors: Vec<QTensor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(dt, o))| quantized(dt, o, inp, 40 + i as u64))
            .collect();
        let mats = || -> Vec<QMatrix> {
            tensors
                .iter()
                .map(|q| QMatrix::from_qtensor(q).unwrap())
                .collect()
        };
        let stacked = QMatrix::stack(mats()).expect("tiled parts of one width stack");
        // Stacking a stack again changes nothing.
        let twice = QMatrix::stack(vec![stacked, QMatrix::from_qtensor(&tensors[0]).unwrap()])
            .expect("stacks");
        let outs: Vec<usize> = parts.iter().map(|p| p.1).chain([parts[0].1]).collect();
        let total: usize = outs.iter().sum();
        assert_eq!(twice.out_features(), total);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for n in [1usize, 3, 17] {
            let x = random(&mut rng, n * inp);
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                let mut y = vec![f32::NAN; n * total];
                twice.matmul_with(isa, &x, n, &mut y);
                let mut col = 0;
                let mut singles = mats();
                singles.push(QMatrix::from_qtensor(&tensors[0]).unwrap());
                for (m, &o) in singles.iter().zip(&outs) {
                    let mut yp = vec![0f32; n * o];
                    m.matmul_with(isa, &x, n, &mut yp);
                    for r in 0..n {
                        let got = &y[r * total + col..r * total + col + o];
                        let want = &yp[r * o..(r + 1) * o];
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{parts:?} {isa:?} n={n} part at column {col} differs"
                        );
                    }
                    col += o;
                }
                let mut row = vec![0f32; inp];
                let mut want = vec![0f32; inp];
                let mut col = 0;
                for (m, &o) in singles.iter().zip(&outs) {
                    for r in [0, o - 1] {
                        twice.dequantize_row(col + r, &mut row);
                        m.dequantize_row(r, &mut want);
                        assert_eq!(row, want, "{parts:?}: row {r} of the part at {col}");
                    }
                    col += o;
                }
            }
        }
    }
    // Tiled and dense weights, or different input widths, do not stack.
    let mixed = vec![
        QMatrix::from_qtensor(&quantized(Q8_0, 16, 64, 1)).unwrap(),
        QMatrix::from_qtensor(&quantized(F32, 16, 64, 2)).unwrap(),
    ];
    assert_eq!(QMatrix::stack(mixed).err().map(|v| v.len()), Some(2));
    let widths = vec![
        QMatrix::from_qtensor(&quantized(Q8_0, 16, 64, 1)).unwrap(),
        QMatrix::from_qtensor(&quantized(Q8_0, 16, 96, 2)).unwrap(),
    ];
    assert!(QMatrix::stack(widths).is_err());
}
