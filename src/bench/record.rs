//! What a benchmark run records: one [`PromptRecord`] per (item, turn,
//! repeat, method), and the run's context ([`RunInfo`]).

use serde::{Deserialize, Serialize};

use crate::engine::spec::{SpecMethod, DEFAULT_MAX_DRAFT};
use crate::error::{Error, Result};

/// The method every other is compared with: plain decoding.
pub const BASELINE: &str = "none";

/// One benchmarked method: `method[:tree[:budget]]`, e.g. `pld`,
/// `recycle:tr-8`, `hybrid:dynamic:16`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSpec {
    /// The label used in every table and plot (the spec as normalised here).
    pub label: String,
    pub method: String,
    /// Tree shape for recycle/hybrid (`dynamic`, a template name or file).
    pub tree: String,
    /// Draft nodes per step (0 for plain decoding).
    pub max_draft: usize,
    /// `+retrieval` after a draft-model method: SpecExtend's retrieval.
    #[serde(default)]
    pub retrieval: bool,
}

impl MethodSpec {
    /// Parses `method[+retrieval][:tree[:budget]]`. Without a tree, recycle and hybrid
    /// use `default_tree`; without a budget, a `tr-N` template drafts N nodes
    /// and anything else `default_budget`. A label names only what was given.
    pub fn parse(s: &str, default_tree: &str, default_budget: usize) -> Result<MethodSpec> {
        let mut parts = s.trim().splitn(3, ':');
        let name = parts.next().unwrap_or("").trim();
        let (name, retrieval) = match name.strip_suffix("+retrieval") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let method = SpecMethod::parse(name)?;
        if retrieval && !method.needs_draft_model() {
            return Err(Error::Invalid(format!(
                "method `{s}`: +retrieval is for the draft-model methods (draft, draft-tree, hybrid-draft)"
            )));
        }
        let tree_given = parts.next().map(str::trim).filter(|t| !t.is_empty());
        let budget_given = match parts.next().map(str::trim) {
            Some(b) => Some(b.parse::<usize>().map_err(|_| {
                Error::Invalid(format!("method `{s}`: budget `{b}` is not a number"))
            })?),
            None => None,
        };
        let uses_tree = method.uses_tree();
        // The suffix drafter grows its own tree; `suffix:auto` lets the
        // budget controller choose its size per step.
        let auto_only = matches!(
            method,
            SpecMethod::Suffix | SpecMethod::Draft | SpecMethod::DraftTree
        ) && tree_given == Some("auto");
        if !uses_tree && tree_given.is_some() && !auto_only {
            return Err(Error::Invalid(format!(
                "method `{s}`: only recycle and the hybrids take a tree shape (suffix and the draft methods take `auto`)"
            )));
        }
        let tree = match (uses_tree, tree_given) {
            (false, Some(t)) => t,
            (false, None) => "",
            (true, t) => t.unwrap_or(default_tree),
        }
        .to_string();
        let max_draft = match method {
            SpecMethod::None => 0,
            _ => budget_given
                .or_else(|| uses_tree.then(|| template_size(&tree)).flatten())
                .unwrap_or(default_budget),
        };
        let mut label = method.name().to_string();
        if retrieval {
            label.push_str("+retrieval");
        }
        if let Some(t) = tree_given {
            label.push(':');
            label.push_str(t);
        }
        if let Some(b) = budget_given {
            if tree_given.is_none() && uses_tree {
                label.push(':');
                label.push_str(&tree);
            }
            label.push_str(&format!(":{b}"));
        }
        Ok(MethodSpec {
            label,
            method: method.name().into(),
            tree,
            max_draft,
            retrieval,
        })
    }

    /// A comma-separated list; plain decoding is added first when missing
    /// (it is the baseline), duplicates are refused.
    pub fn parse_list(
        specs: &[String],
        default_tree: &str,
        default_budget: usize,
    ) -> Result<Vec<MethodSpec>> {
        let mut out: Vec<MethodSpec> = Vec::new();
        for s in specs.iter().flat_map(|s| s.split(',')) {
            if s.trim().is_empty() {
                continue;
            }
            let m = MethodSpec::parse(s, default_tree, default_budget)?;
            if out.iter().any(|o| o.label == m.label) {
                return Err(Error::Invalid(format!("method `{}` given twice", m.label)));
            }
            out.push(m);
        }
        if !out.iter().any(|m| m.label == BASELINE) {
            out.insert(
                0,
                MethodSpec::parse(BASELINE, default_tree, default_budget)?,
            );
        }
        Ok(out)
    }

    /// Which curve of the MAT-vs-budget plot this method belongs to: its
    /// method and tree, templates of any size counted as one.
    pub fn family(&self) -> String {
        if self.tree.is_empty() {
            return self.method.clone();
        }
        let tree = if template_size(&self.tree).is_some() {
            "tr"
        } else {
            self.tree.as_str()
        };
        format!("{}:{}", self.method, tree)
    }
}

/// `tr-16` → 16.
fn template_size(tree: &str) -> Option<usize> {
    tree.strip_prefix("tr-")?.parse().ok()
}

impl Default for MethodSpec {
    fn default() -> Self {
        MethodSpec {
            label: BASELINE.into(),
            method: BASELINE.into(),
            tree: String::new(),
            max_draft: DEFAULT_MAX_DRAFT,
            retrieval: false,
        }
    }
}

/// How a greedy run's output compares with plain decoding's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// This is the plain run itself.
    Baseline,
    /// Token-identical to plain decoding.
    Exact,
    /// Differs first where plain decoding's top-2 probabilities were within
    /// [`crate::sampling::NEAR_TIE`] (or after an earlier turn did).
    NearTie,
    /// Differs where the model was not near a tie: a bug.
    Mismatch,
    /// Sampling (temperature > 0): outputs are not expected to match.
    Sampled,
    /// No plain run to compare with (an interrupted item).
    Unchecked,
    /// A peer engine's output, token-identical to treespec's plain decoding.
    PeerSame,
    /// A peer engine's output that differs from treespec's plain decoding:
    /// not a lossless failure (two implementations' floating-point sums
    /// differ), reported with where and at which plain top-2 margin.
    PeerDiffers,
}

impl Check {
    /// A peer engine's generation (compared, not held to losslessness).
    pub fn is_peer(self) -> bool {
        matches!(self, Check::PeerSame | Check::PeerDiffers)
    }
}

/// One generation: one turn of one item by one method in one repeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptRecord {
    pub dataset: String,
    pub question_id: serde_json::Value,
    /// Report category (see [`super::category_of`]).
    pub category: String,
    pub raw_category: String,
    /// 0-based turn within the item's conversation.
    pub turn: usize,
    /// 0-based repeat.
    pub repeat: usize,
    /// The method's label.
    pub method: String,
    pub prompt_tokens: usize,
    /// Prompt tokens run (the rest reused from the conversation's cache).
    pub prefilled_tokens: usize,
    pub new_tokens: usize,
    /// Tokens the steps accepted: `new_tokens` plus the end-of-generation
    /// token when generation stopped on one (MAT counts it, as every step
    /// emits at least one token).
    pub mat_tokens: usize,
    pub steps: usize,
    /// Wall time of the whole generation (prefill + decode), seconds.
    pub wall_s: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Mean accepted tokens: `mat_tokens / steps`, bonus token included.
    pub mat: f64,
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    /// `accepted_per_depth[d]`: steps whose accepted path reached depth d+1.
    pub accepted_per_depth: Vec<usize>,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// A draft model's forwards and retrievals (absent without one).
    #[serde(default, skip_serializing_if = "crate::draft::DraftCounters::is_zero")]
    pub draft_model: crate::draft::DraftCounters,
    /// Why generation stopped (`eos`, `max_tokens`, ...).
    pub stop: String,
    pub check: Check,
    /// First token index where the output differs from plain decoding's.
    pub first_diff: Option<usize>,
    /// Plain decoding's top-2 margin at `first_diff`.
    pub diff_margin: Option<f32>,
    /// For a peer's generation that differs: the peer's own top-2 margin at
    /// `first_diff` (llama-server asked again, untimed, for probabilities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_margin: Option<f32>,
}

impl PromptRecord {
    /// Identifies the generation across methods: (dataset, question, turn, repeat).
    pub fn key(&self) -> (String, String, usize, usize) {
        (
            self.dataset.clone(),
            super::dataset::id_text(&self.question_id),
            self.turn,
            self.repeat,
        )
    }
}

/// The context of a run: everything in `results.json` besides the records
/// and what is computed from them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunInfo {
    /// The command line, argument by argument.
    pub command: Vec<String>,
    pub model: ModelInfo,
    pub machine: MachineInfo,
    /// `git rev-parse HEAD` of the source tree, or "unknown".
    pub commit: String,
    pub config: RunConfig,
    /// c(N): one forward over N new tokens with all logits, 256 tokens cached.
    pub forward_curve: Option<Vec<CurvePoint>>,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub elapsed_s: f64,
    /// True once every planned run finished.
    pub complete: bool,
    /// True when Ctrl-C stopped the run early.
    pub interrupted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    /// As given on the command line.
    pub name: String,
    pub path: String,
    /// The loader's identity string (file name, size, tensor count, architecture).
    pub identity: String,
    pub arch: String,
    pub n_layers: usize,
    pub vocab_size: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineInfo {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// Worker threads used.
    pub threads: usize,
    /// Kernel path: avx512, avx2 or scalar.
    pub isa: String,
    pub os: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunConfig {
    pub datasets: Vec<String>,
    pub methods: Vec<MethodSpec>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub repeats: usize,
    pub warmup: usize,
    pub per_category: Option<usize>,
    pub limit: Option<usize>,
    pub ctx_size: usize,
    /// Items selected (the plan), whether or not they all ran.
    pub items: usize,
    /// The same-run peer (`--peer`), if any.
    #[serde(default)]
    pub peer: Option<PeerRun>,
}

/// The peer engine run beside treespec's methods (`--peer llama.cpp`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRun {
    pub name: String,
    /// Its build (commit or version), as the peer script recorded it.
    pub version: String,
    pub binary: String,
    /// Method labels of its modes, e.g. `llama.cpp:ngram-mod`, in order.
    pub modes: Vec<String>,
    /// Draft model of its `draft` mode, if any.
    pub draft_model: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    pub n: usize,
    pub ms: f64,
    /// c(N) / c(1).
    pub ratio: f64,
}

/// Everything a run produced so far; [`super::write_results`] turns it into files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BenchResults {
    pub info: RunInfo,
    pub records: Vec<PromptRecord>,
    /// Per-prompt figures of another engine (`--compare FILE`).
    pub peer: Option<super::PeerFigures>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_specs_parse() {
        let m = MethodSpec::parse("recycle:tr-16", "dynamic", 8).unwrap();
        assert_eq!(
            (m.label.as_str(), m.tree.as_str(), m.max_draft),
            ("recycle:tr-16", "tr-16", 16)
        );
        let m = MethodSpec::parse("hybrid", "dynamic", 8).unwrap();
        assert_eq!(
            (m.label.as_str(), m.tree.as_str(), m.max_draft),
            ("hybrid", "dynamic", 8)
        );
        let m = MethodSpec::parse("recycle::4", "dynamic", 8).unwrap();
        assert_eq!((m.label.as_str(), m.max_draft), ("recycle:dynamic:4", 4));
        let m = MethodSpec::parse("none", "dynamic", 8).unwrap();
        assert_eq!(m.max_draft, 0);
        assert!(MethodSpec::parse("pld:tr-8", "dynamic", 8).is_err());
        assert!(MethodSpec::parse("bogus", "dynamic", 8).is_err());
        assert!(MethodSpec::parse("recycle:dynamic:x", "dynamic", 8).is_err());
        let l = MethodSpec::parse_list(&["pld,hybrid".into()], "dynamic", 8).unwrap();
        assert_eq!(l[0].label, "none");
        assert!(MethodSpec::parse_list(&["pld,pld".into()], "dynamic", 8).is_err());
    }
}
