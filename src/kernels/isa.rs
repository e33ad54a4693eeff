//! Runtime choice of the instruction-set path. Never compile-time: the binary
//! must run on any x86-64 (and aarch64), so each SIMD path is gated by
//! `is_x86_feature_detected!` and can be forced down with `TREESPEC_ISA`.

use std::sync::OnceLock;

/// A kernel implementation. `Scalar` is portable and is the reference the
/// SIMD paths are tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("f16c")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run, fastest last.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    fn from_name(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// The path `QMatrix::matmul` uses: the best supported one, or the one named
/// by `TREESPEC_ISA` when this CPU supports it (an unsupported or unknown name
/// falls back to the best path with a warning rather than crashing).
pub fn selected() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = *Isa::available().last().unwrap_or(&Isa::Scalar);
        match std::env::var("TREESPEC_ISA") {
            Ok(v) if !v.is_empty() => match Isa::from_name(&v) {
                Some(isa) if isa.supported() => isa,
                _ => {
                    tracing::warn!("TREESPEC_ISA={v} is unknown or unsupported here; using {}", best.name());
                    best
                }
            },
            _ => best,
        }
    })
}

/// Name of the kernel path in use: "avx512", "avx2" or "scalar".
pub fn isa() -> &'static str {
    selected().name()
}
