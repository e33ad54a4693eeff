//! Where a forward's time goes: wall time per stage of the decoder,
//! accumulated while enabled (`treespec bench forward --profile`).
//!
//! Off by default; then each stage costs one relaxed atomic load. The
//! counters are process-wide (forwards are serialised by the kernels' pool
//! anyway), so a profile is only meaningful while one forward runs at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A stage of the decoder's forward (declared in [`Stage::ALL`] order, so
/// `stage as usize` indexes the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Embedding lookup, RMSNorms, residual adds, SiLU·up.
    Elementwise,
    /// Q, K, V projections.
    Qkv,
    /// RoPE and writing K/V to the cache.
    RopeCache,
    /// Tree attention over cache + new tokens.
    Attention,
    /// Output projection.
    AttnOut,
    /// Gate and up projections.
    GateUp,
    /// Down projection.
    Down,
    /// Final norm and the LM head.
    LmHead,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::Elementwise,
        Stage::Qkv,
        Stage::RopeCache,
        Stage::Attention,
        Stage::AttnOut,
        Stage::GateUp,
        Stage::Down,
        Stage::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Elementwise => "norms/adds/silu",
            Stage::Qkv => "q,k,v proj",
            Stage::RopeCache => "rope + kv write",
            Stage::Attention => "attention",
            Stage::AttnOut => "o proj",
            Stage::GateUp => "gate,up proj",
            Stage::Down => "down proj",
            Stage::LmHead => "lm head",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Starts (or stops) accumulating; starting clears the counters.
pub fn enable(on: bool) {
    if on {
        for n in &NANOS {
            n.store(0, Ordering::Relaxed);
        }
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Milliseconds accumulated per stage, in [`Stage::ALL`] order.
pub fn totals_ms() -> [f64; 8] {
    std::array::from_fn(|i| NANOS[i].load(Ordering::Relaxed) as f64 / 1e6)
}

/// A running stage clock: `lap(stage)` charges the time since the previous
/// lap to `stage`.
pub(crate) struct Clock(Option<Instant>);

impl Clock {
    pub(crate) fn start() -> Clock {
        Clock(ENABLED.load(Ordering::Relaxed).then(Instant::now))
    }

    #[inline]
    pub(crate) fn lap(&mut self, stage: Stage) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            NANOS[stage as usize].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}
