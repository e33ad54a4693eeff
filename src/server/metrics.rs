//! Prometheus counters for `GET /metrics`, in the text exposition format
//! written by hand: it is a dozen lines of `name value`, and the
//! `prometheus` crate would add a dependency tree (protobuf, lazy statics)
//! for no behaviour we need.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::draft::DraftCounters;
use crate::engine::prefix_cache::PrefixStats;
use crate::engine::SpecStats;

const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
];

/// Sequences per batched forward.
const BATCH_SEQ_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0];
/// Rows (roots, draft nodes, prompt tokens) per batched forward.
const BATCH_ROW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

pub struct Metrics {
    drafts: AtomicU64,
    draft_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    /// Drafting and verifying time, microseconds (a draft model's drafting
    /// is a real cost, which the budget controller pays out of).
    draft_us: AtomicU64,
    verify_us: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    requests_ok: AtomicU64,
    requests_cancelled: AtomicU64,
    requests_failed: AtomicU64,
    per_pos: Mutex<Vec<u64>>,
    /// A draft model's forwards and retrievals, summed over requests.
    draft_model: Mutex<DraftCounters>,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    batch_sequences: Mutex<Histogram>,
    batch_rows: Mutex<Histogram>,
    /// Prompt tokens a slot's cache already held (not prefilled).
    prompt_cached: AtomicU64,
    memory: Mutex<(usize, PrefixStats)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            drafts: AtomicU64::new(0),
            draft_tokens: AtomicU64::new(0),
            accepted_tokens: AtomicU64::new(0),
            draft_us: AtomicU64::new(0),
            verify_us: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            requests_ok: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            per_pos: Mutex::new(Vec::new()),
            draft_model: Mutex::new(DraftCounters::default()),
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(ITL_BUCKETS)),
            batch_sequences: Mutex::new(Histogram::new(BATCH_SEQ_BUCKETS)),
            batch_rows: Mutex::new(Histogram::new(BATCH_ROW_BUCKETS)),
            prompt_cached: AtomicU64::new(0),
            memory: Mutex::new((0, PrefixStats::default())),
        }
    }
}

pub enum Outcome {
    Ok,
    Cancelled,
    Failed,
}

impl Metrics {
    pub fn observe_ttft(&self, secs: f64) {
        lock(&self.ttft).observe(secs);
    }

    pub fn observe_itl(&self, secs: f64) {
        lock(&self.itl).observe(secs);
    }

    /// One batched forward over `sequences` requests and `rows` rows.
    pub fn observe_batch(&self, sequences: usize, rows: usize) {
        if sequences > 0 {
            lock(&self.batch_sequences).observe(sequences as f64);
            lock(&self.batch_rows).observe(rows as f64);
        }
    }

    /// The slots' KV bytes and the prefix cache's state, as of now.
    pub fn set_memory(&self, slot_bytes: usize, prefix: PrefixStats) {
        *lock(&self.memory) = (slot_bytes, prefix);
    }

    pub fn add_cached_prompt(&self, n: usize) {
        self.prompt_cached.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Generated tokens are counted as they stream so the periodic
    /// throughput log sees long requests progress.
    pub fn add_generated(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn generated(&self) -> u64 {
        self.generation_tokens.load(Ordering::Relaxed)
    }

    pub fn prompt(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    pub fn finish_request(&self, prompt_tokens: usize, spec: Option<&SpecStats>, outcome: Outcome) {
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => &self.requests_ok,
            Outcome::Cancelled => &self.requests_cancelled,
            Outcome::Failed => &self.requests_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        let Some(s) = spec else { return };
        self.drafts.fetch_add(s.steps as u64, Ordering::Relaxed);
        self.draft_tokens
            .fetch_add(s.drafted_tokens as u64, Ordering::Relaxed);
        self.accepted_tokens
            .fetch_add(s.accepted_tokens as u64, Ordering::Relaxed);
        self.draft_us
            .fetch_add((s.draft_ms * 1e3) as u64, Ordering::Relaxed);
        self.verify_us
            .fetch_add((s.verify_ms * 1e3) as u64, Ordering::Relaxed);
        let mut pos = lock(&self.per_pos);
        if pos.len() < s.accepted_per_depth.len() {
            pos.resize(s.accepted_per_depth.len(), 0);
        }
        for (p, &n) in pos.iter_mut().zip(&s.accepted_per_depth) {
            *p += n as u64;
        }
        lock(&self.draft_model).add(s.draft_model);
    }

    pub fn render(&self, running: usize, waiting: usize) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "treespec_spec_decode_num_drafts_total",
            "Verify steps run with a drafter.",
            get(&self.drafts),
        );
        counter(
            &mut out,
            "treespec_spec_decode_num_draft_tokens_total",
            "Draft tokens sent to the model for verification.",
            get(&self.draft_tokens),
        );
        counter(
            &mut out,
            "treespec_spec_decode_num_accepted_tokens_total",
            "Draft tokens the model accepted.",
            get(&self.accepted_tokens),
        );
        let seconds = |a: &AtomicU64| get(a) as f64 / 1e6;
        for (name, help, v) in [
            (
                "treespec_spec_decode_draft_seconds_total",
                "Time spent drafting (a draft model's forwards included).",
                seconds(&self.draft_us),
            ),
            (
                "treespec_spec_decode_verify_seconds_total",
                "Time spent in verify forwards.",
                seconds(&self.verify_us),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v:.6}"
            );
        }
        let name = "treespec_spec_decode_num_accepted_tokens_per_pos_total";
        let _ = writeln!(
            out,
            "# HELP {name} Steps whose accepted path reached draft position i (0-based).\n# TYPE {name} counter"
        );
        for (i, n) in lock(&self.per_pos).iter().enumerate() {
            let _ = writeln!(out, "{name}{{position=\"{i}\"}} {n}");
        }
        let d = *lock(&self.draft_model);
        for (name, help, v) in [
            (
                "treespec_draft_model_forwards_total",
                "Forwards of the draft model (--draft-model).",
                d.model_forwards,
            ),
            (
                "treespec_draft_model_tokens_total",
                "Tokens the draft model's forwards ran (its prefill included).",
                d.model_tokens,
            ),
            (
                "treespec_draft_retrievals_total",
                "Times the draft model's working cache was regathered from the target's attention (--draft-retrieval).",
                d.retrievals,
            ),
            (
                "treespec_draft_retrieval_held_positions_total",
                "Positions the regathered working caches held (over treespec_draft_retrieval_context_positions_total: the share attended).",
                d.retrieval_held_positions,
            ),
            (
                "treespec_draft_retrieval_context_positions_total",
                "Context positions at those retrievals.",
                d.retrieval_context_positions,
            ),
            (
                "treespec_draft_catch_ups_total",
                "Times the draft model caught up over tokens it missed (its prompt at a request's first drafting step, the plain steps the controller chose since it last drafted).",
                d.catch_ups,
            ),
            (
                "treespec_draft_catch_up_tokens_total",
                "Tokens those catch-ups ran.",
                d.catch_up_tokens,
            ),
        ] {
            counter(&mut out, name, help, v);
        }
        counter(
            &mut out,
            "treespec_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            get(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "treespec_prompt_tokens_cached_total",
            "Prompt tokens of finished requests that a slot's KV cache already held (not prefilled).",
            get(&self.prompt_cached),
        );
        counter(
            &mut out,
            "treespec_generation_tokens_total",
            "Generated tokens.",
            get(&self.generation_tokens),
        );
        let name = "treespec_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Finished generation requests by outcome.\n# TYPE {name} counter"
        );
        for (label, a) in [
            ("ok", &self.requests_ok),
            ("cancelled", &self.requests_cancelled),
            ("failed", &self.requests_failed),
        ] {
            let _ = writeln!(out, "{name}{{outcome=\"{label}\"}} {}", get(a));
        }
        lock(&self.ttft).render(
            &mut out,
            "treespec_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
        );
        lock(&self.itl).render(
            &mut out,
            "treespec_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
        );
        let (slot_bytes, prefix) = *lock(&self.memory);
        counter(
            &mut out,
            "treespec_prefix_cache_hit_tokens_total",
            "Prompt tokens restored from the prefix cache's blocks instead of prefilled.",
            prefix.hit_tokens,
        );
        counter(
            &mut out,
            "treespec_prefix_cache_evictions_total",
            "Prefix-cache blocks evicted (least recently used) to stay under --cache-mb.",
            prefix.evictions,
        );
        for (name, help, v) in [
            (
                "treespec_prefix_cache_blocks",
                "KV blocks the prefix cache holds.",
                prefix.blocks,
            ),
            (
                "treespec_prefix_cache_bytes",
                "Bytes of KV the prefix cache holds.",
                prefix.bytes,
            ),
            (
                "treespec_kv_cache_bytes",
                "Bytes of KV the slots' caches hold.",
                slot_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        lock(&self.batch_sequences).render(
            &mut out,
            "treespec_batch_sequences",
            "Requests per batched forward.",
        );
        lock(&self.batch_rows).render(
            &mut out,
            "treespec_batch_rows",
            "Rows (pending tokens, draft nodes, prompt tokens) per batched forward.",
        );
        for (name, help, v) in [
            (
                "treespec_num_requests_running",
                "Requests generating now.",
                running,
            ),
            (
                "treespec_num_requests_waiting",
                "Requests queued for a slot.",
                waiting,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

/// Metrics stay readable even if a worker panicked while holding a lock.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_cumulative_buckets_and_positions() {
        let m = Metrics::default();
        m.observe_ttft(0.03);
        m.observe_ttft(100.0);
        m.add_generated(7);
        let s = SpecStats {
            steps: 3,
            drafted_tokens: 12,
            accepted_tokens: 4,
            accepted_per_depth: vec![3, 1],
            draft_ms: 250.0,
            draft_model: DraftCounters {
                model_forwards: 6,
                retrievals: 2,
                retrieval_held_positions: 100,
                retrieval_context_positions: 400,
                catch_ups: 1,
                catch_up_tokens: 33,
                ..Default::default()
            },
            ..Default::default()
        };
        m.finish_request(5, Some(&s), Outcome::Ok);
        m.observe_batch(3, 20);
        m.observe_batch(0, 0);
        m.add_cached_prompt(9);
        let t = m.render(1, 2);
        assert!(t.contains("treespec_time_to_first_token_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(t.contains("treespec_time_to_first_token_seconds_bucket{le=\"80\"} 1\n"));
        assert!(t.contains("treespec_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains(
            "treespec_spec_decode_num_accepted_tokens_per_pos_total{position=\"1\"} 1\n"
        ));
        assert!(t.contains("treespec_spec_decode_num_draft_tokens_total 12\n"));
        assert!(t.contains("treespec_generation_tokens_total 7\n"));
        assert!(t.contains("treespec_draft_catch_up_tokens_total 33\n"));
        assert!(t.contains("treespec_spec_decode_draft_seconds_total 0.250000\n"));
        assert!(t.contains("treespec_num_requests_waiting 2\n"));
        assert!(t.contains("treespec_batch_sequences_bucket{le=\"2\"} 0\n"));
        assert!(t.contains("treespec_batch_sequences_bucket{le=\"3\"} 1\n"));
        assert!(t.contains("treespec_batch_rows_count 1\n"));
        assert!(t.contains("treespec_prompt_tokens_cached_total 9\n"));
        assert!(t.contains("treespec_draft_model_forwards_total 6\n"));
        assert!(t.contains("treespec_draft_retrievals_total 2\n"));
        assert!(t.contains("treespec_draft_retrieval_held_positions_total 100\n"));
    }
}
