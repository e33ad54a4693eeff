//! Choosing and building the speculative method: `--spec`, `--tree`,
//! `--spec-max-nodes`, `--recycle-state`.

use std::path::{Path, PathBuf};

use crate::draft::hybrid::Hybrid;
use crate::draft::pld::PromptLookup;
use crate::draft::recycle::{RecycleConfig, TokenRecycler, TreeShape};
use crate::draft::{DraftTree, Drafter, NodeTopK};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecMethod {
    None,
    Pld,
    Recycle,
    Hybrid,
}

impl SpecMethod {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "off" | "plain" => SpecMethod::None,
            "pld" => SpecMethod::Pld,
            "recycle" | "tr" => SpecMethod::Recycle,
            "hybrid" => SpecMethod::Hybrid,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown speculative method `{s}` (none, pld, recycle, hybrid)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecMethod::None => "none",
            SpecMethod::Pld => "pld",
            SpecMethod::Recycle => "recycle",
            SpecMethod::Hybrid => "hybrid",
        }
    }
}

/// Default cap on draft nodes per step. With `--tree auto` (the default) the
/// budget is chosen per step at or below it from this machine's measured
/// verify costs; 16 is where c(N) stops being nearly flat even with
/// treespec's kernels on a 2-core CPU, so larger trees are never the
/// tokens-per-second optimum there. With a fixed tree it is the budget.
pub const DEFAULT_MAX_DRAFT: usize = 16;

#[derive(Debug, Clone)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Tree shape for recycle/hybrid: `auto` (dynamic tree, budget chosen
    /// per step), `dynamic`, or a template name/file.
    pub tree: String,
    pub max_draft: usize,
    pub seed_from_prompt: bool,
    /// Load the recycling matrix from here at start, save it here at the end.
    pub recycle_state: Option<PathBuf>,
}

impl SpecConfig {
    /// Whether the engine picks the budget per step (`--tree auto`).
    pub fn auto_budget(&self) -> bool {
        self.tree == "auto" && self.method != SpecMethod::None
    }

    fn shape(&self) -> Result<TreeShape> {
        if self.tree == "auto" {
            return Ok(TreeShape::Dynamic);
        }
        TreeShape::parse(&self.tree)
    }
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            method: SpecMethod::Hybrid,
            tree: "auto".into(),
            max_draft: DEFAULT_MAX_DRAFT,
            seed_from_prompt: true,
            recycle_state: None,
        }
    }
}

/// The drafter behind a [`SpecMethod`], with access to its recycler (for
/// persistence) where it has one. Built once per process, so the size
/// difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum SpecDrafter {
    Pld(PromptLookup),
    Recycle(TokenRecycler),
    Hybrid(Hybrid),
}

impl SpecDrafter {
    /// `None` for plain decoding.
    pub fn build(cfg: &SpecConfig, vocab: usize) -> Result<Option<SpecDrafter>> {
        let recycler = || -> Result<TokenRecycler> {
            TokenRecycler::new(
                vocab,
                RecycleConfig {
                    shape: cfg.shape()?,
                    seed_from_prompt: cfg.seed_from_prompt,
                    ..Default::default()
                },
            )
        };
        Ok(match cfg.method {
            SpecMethod::None => None,
            SpecMethod::Pld => Some(SpecDrafter::Pld(PromptLookup::default())),
            SpecMethod::Recycle => Some(SpecDrafter::Recycle(recycler()?)),
            SpecMethod::Hybrid => Some(SpecDrafter::Hybrid(Hybrid::new(
                recycler()?,
                PromptLookup::default(),
            ))),
        })
    }

    pub fn recycler_mut(&mut self) -> Option<&mut TokenRecycler> {
        match self {
            SpecDrafter::Pld(_) => None,
            SpecDrafter::Recycle(r) => Some(r),
            SpecDrafter::Hybrid(h) => Some(h.recycler_mut()),
        }
    }

    /// Hot start from a saved matrix. A missing file is not an error (first
    /// run); a foreign or corrupt one is refused with a warning and ignored,
    /// so a bad state file never stops generation.
    pub fn load_state(&mut self, path: &Path, model_id: &str) {
        let Some(r) = self.recycler_mut() else { return };
        if !path.exists() {
            return;
        }
        match r.load_state(path, model_id) {
            Ok(()) => tracing::info!(
                "recycle state loaded from {} ({} rows)",
                path.display(),
                r.rows_written()
            ),
            Err(e) => tracing::warn!("ignoring recycle state: {e}"),
        }
    }

    pub fn save_state(&mut self, path: &Path, model_id: &str) -> Result<()> {
        match self.recycler_mut() {
            Some(r) => r.save(path, model_id),
            None => Ok(()),
        }
    }

    fn inner(&mut self) -> &mut dyn Drafter {
        match self {
            SpecDrafter::Pld(d) => d,
            SpecDrafter::Recycle(d) => d,
            SpecDrafter::Hybrid(d) => d,
        }
    }

    fn inner_ref(&self) -> &dyn Drafter {
        match self {
            SpecDrafter::Pld(d) => d,
            SpecDrafter::Recycle(d) => d,
            SpecDrafter::Hybrid(d) => d,
        }
    }
}

impl Drafter for SpecDrafter {
    fn name(&self) -> &'static str {
        self.inner_ref().name()
    }
    fn start(&mut self, prompt: &[u32]) {
        self.inner().start(prompt)
    }
    fn propose(&mut self, context: &[u32], max_draft: usize) -> DraftTree {
        self.inner().propose(context, max_draft)
    }
    fn observe(&mut self, tree: &DraftTree, topk: &[NodeTopK], accepted: &[usize]) {
        self.inner().observe(tree, topk, accepted)
    }
    fn wants_topk(&self) -> usize {
        self.inner_ref().wants_topk()
    }
}
