//! What a generation measured.

use crate::draft::DraftCounters;
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecStats {
    pub method: String,
    /// Verify steps (forwards after prefill).
    pub steps: usize,
    /// Draft nodes sent to the model (roots excluded).
    pub drafted_tokens: usize,
    /// Draft nodes the model accepted.
    pub accepted_tokens: usize,
    /// Tokens emitted per step, bonus token included.
    pub mean_accepted_tokens: f64,
    /// `accepted_per_depth[d]`: steps whose accepted path reached depth d+1.
    pub accepted_per_depth: Vec<usize>,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// A draft model's forwards and retrievals during these steps.
    #[serde(skip_serializing_if = "DraftCounters::is_zero")]
    pub draft_model: DraftCounters,
    /// Tokens the verifier emitted (a stop token included).
    #[serde(skip)]
    pub emitted: usize,
}

impl SpecStats {
    pub fn record_step(&mut self, drafted: usize, accepted: usize) {
        self.steps += 1;
        self.emitted += accepted + 1;
        self.drafted_tokens += drafted;
        self.accepted_tokens += accepted;
        if self.accepted_per_depth.len() < accepted {
            self.accepted_per_depth.resize(accepted, 0);
        }
        for d in 0..accepted {
            self.accepted_per_depth[d] += 1;
        }
    }

    pub fn finish(&mut self) {
        self.mean_accepted_tokens = if self.steps > 0 {
            self.emitted as f64 / self.steps as f64
        } else {
            0.0
        };
    }

    /// Adds another request's counts (cumulative server/bench statistics).
    pub fn merge(&mut self, o: &SpecStats) {
        self.emitted += o.emitted;
        self.steps += o.steps;
        self.drafted_tokens += o.drafted_tokens;
        self.accepted_tokens += o.accepted_tokens;
        if self.accepted_per_depth.len() < o.accepted_per_depth.len() {
            self.accepted_per_depth
                .resize(o.accepted_per_depth.len(), 0);
        }
        for (a, b) in self
            .accepted_per_depth
            .iter_mut()
            .zip(&o.accepted_per_depth)
        {
            *a += b;
        }
        self.draft_ms += o.draft_ms;
        self.verify_ms += o.verify_ms;
        self.draft_model.add(o.draft_model);
        self.finish();
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the reused cache prefix).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub steps: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

impl GenStats {
    pub fn finish(&mut self) {
        // The last prompt token is counted as prefilled (llama.cpp's
        // `prompt_n` does the same) but runs as the first decode step's root,
        // outside `prefill_ms`: a one-token prompt has no prefill rate (it
        // showed a million tokens per second).
        self.prefill_tok_s = rate(self.prefilled_tokens.saturating_sub(1), self.prefill_ms);
        self.decode_tok_s = rate(self.generated_tokens, self.decode_ms);
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}
