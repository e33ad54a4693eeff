//! Choosing and building the speculative method: `--spec`, `--tree`,
//! `--spec-max-nodes`, `--recycle-state`.

use std::path::{Path, PathBuf};

use crate::draft::draft_model::{DraftModel, DraftModelConfig, ModelDrafter, TREE_WIDTH};
use crate::draft::hybrid::{Allocation, Hybrid};
use crate::draft::pld::PromptLookup;
use crate::draft::recycle::{RecycleConfig, TokenRecycler, TreeShape};
use crate::draft::suffix::{SuffixConfig, SuffixDrafter};
use crate::draft::Drafter;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecMethod {
    None,
    Pld,
    Recycle,
    Suffix,
    /// Suffix + prompt lookup + recycling.
    Hybrid,
    /// The hybrid with the fixed budget split it had before the learned
    /// allocation (to compare against).
    #[serde(rename = "hybrid-fixed")]
    HybridFixed,
    /// Prompt lookup + recycling (the hybrid before the suffix drafter).
    #[serde(rename = "hybrid-pld")]
    HybridPld,
    /// A draft model's chain (`--draft-model`).
    Draft,
    /// A draft model's multi-candidate tree.
    #[serde(rename = "draft-tree")]
    DraftTree,
    /// The hybrid with the draft model's tree as a fourth source (what
    /// `hybrid` becomes when `--draft-model` is given).
    #[serde(rename = "hybrid-draft")]
    HybridDraft,
}

impl SpecMethod {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "off" | "plain" => SpecMethod::None,
            "pld" => SpecMethod::Pld,
            "recycle" | "tr" => SpecMethod::Recycle,
            "suffix" => SpecMethod::Suffix,
            "hybrid" => SpecMethod::Hybrid,
            "hybrid-fixed" => SpecMethod::HybridFixed,
            "hybrid-pld" => SpecMethod::HybridPld,
            "draft" | "draft-chain" => SpecMethod::Draft,
            "draft-tree" => SpecMethod::DraftTree,
            "hybrid-draft" => SpecMethod::HybridDraft,
            _ => {
                return Err(Error::Invalid(format!(
                "unknown speculative method `{s}` (none, pld, recycle, suffix, hybrid, hybrid-fixed, hybrid-pld, draft, draft-tree, hybrid-draft)"
            )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SpecMethod::None => "none",
            SpecMethod::Pld => "pld",
            SpecMethod::Recycle => "recycle",
            SpecMethod::Suffix => "suffix",
            SpecMethod::Hybrid => "hybrid",
            SpecMethod::HybridFixed => "hybrid-fixed",
            SpecMethod::HybridPld => "hybrid-pld",
            SpecMethod::Draft => "draft",
            SpecMethod::DraftTree => "draft-tree",
            SpecMethod::HybridDraft => "hybrid-draft",
        }
    }

    /// Whether the method needs `--draft-model`.
    pub fn needs_draft_model(self) -> bool {
        matches!(
            self,
            SpecMethod::Draft | SpecMethod::DraftTree | SpecMethod::HybridDraft
        )
    }

    /// Whether the method drafts with `--draft-model` when one is given
    /// (`hybrid` adds the draft's tree to its sources; `hybrid-draft`
    /// insists on one).
    pub fn takes_draft_model(self) -> bool {
        self.needs_draft_model() || self == SpecMethod::Hybrid
    }

    /// Whether the method grows a recycling tree (takes a tree shape).
    pub fn uses_tree(self) -> bool {
        matches!(
            self,
            SpecMethod::Recycle
                | SpecMethod::Hybrid
                | SpecMethod::HybridFixed
                | SpecMethod::HybridPld
                | SpecMethod::HybridDraft
        )
    }
}

/// Default cap on draft nodes per step. With `--tree auto` (the default) the
/// budget is chosen per step at or below it from this machine's measured
/// verify costs; 16 is where c(N) stops being nearly flat even with
/// treespec's kernels on a 2-core CPU, so larger trees are never the
/// tokens-per-second optimum there. With a fixed tree it is the budget.
pub const DEFAULT_MAX_DRAFT: usize = 16;

/// Cap on draft nodes per step when the drafter reports a long confident
/// match (`--tree auto`, outlook class > 0: a suffix copy). SuffixDecoding
/// drafts up to 32 tokens per chain (vLLM's `num_speculative_tokens`
/// default for `suffix`); 64 leaves room for the recycled branches beside
/// such a chain. Whether it pays is the controller's call, from c(65).
pub const DEFAULT_MAX_LONG_DRAFT: usize = 64;

#[derive(Debug, Clone)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Tree shape for recycle/hybrid: `auto` (dynamic tree, budget chosen
    /// per step), `dynamic`, or a template name/file.
    pub tree: String,
    pub max_draft: usize,
    /// The cap on steps with a long confident match (`--tree auto`).
    pub max_long_draft: usize,
    /// Earlier requests' outputs the suffix drafter keeps.
    pub suffix_cache_requests: usize,
    pub seed_from_prompt: bool,
    /// Load the recycling matrix from here at start, save it here at the end.
    pub recycle_state: Option<PathBuf>,
    /// `--draft-model`: drafts for `draft`/`draft-tree`, and a fourth source
    /// of the hybrid.
    pub draft_model: Option<DraftModel>,
    /// The draft's floor on path probability (`--draft-p-min`).
    pub draft_p_min: f32,
    /// SpecExtend's retrieval for the draft model (`--draft-retrieval`).
    pub draft_retrieval: bool,
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
            max_long_draft: DEFAULT_MAX_LONG_DRAFT,
            suffix_cache_requests: crate::draft::suffix::DEFAULT_CACHE_REQUESTS,
            seed_from_prompt: true,
            recycle_state: None,
            draft_model: None,
            draft_p_min: crate::draft::draft_model::DEFAULT_P_MIN,
            draft_retrieval: false,
        }
    }
}

/// Loads `path` as a draft model for `target`: refused when the two
/// vocabularies differ.
pub fn load_draft_model(path: &Path, target: &crate::model::Model) -> Result<DraftModel> {
    let draft = crate::model::Model::load(path)?;
    crate::draft::draft_model::check_vocabularies(&target.tokenizer, &draft.tokenizer)?;
    Ok(DraftModel(std::sync::Arc::new(draft)))
}

/// The drafter behind a [`SpecMethod`], with access to its recycler (for
/// persistence) where it has one. Built once per process, so the size
/// difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum SpecDrafter {
    Pld(PromptLookup),
    Recycle(TokenRecycler),
    Suffix(SuffixDrafter),
    Hybrid(Hybrid),
    Model(ModelDrafter),
}

impl SpecDrafter {
    /// `None` for plain decoding.
    pub fn build(cfg: &SpecConfig, vocab: usize) -> Result<Option<SpecDrafter>> {
        // Retrieval narrows what the draft model attends to: asked for
        // without one, a user would believe it is on while nothing changes.
        if cfg.draft_retrieval && !(cfg.draft_model.is_some() && cfg.method.takes_draft_model()) {
            return Err(Error::Invalid(format!(
                "--draft-retrieval narrows the draft model's attention: it needs --draft-model \
                 NAME|PATH and a --spec that drafts with it (draft, draft-tree, hybrid, \
                 hybrid-draft), not `{}`{}",
                cfg.method.name(),
                if cfg.draft_model.is_none() {
                    " without a draft model"
                } else {
                    ""
                }
            )));
        }
        if cfg.draft_model.is_some()
            && !cfg.method.takes_draft_model()
            && cfg.method != SpecMethod::None
        {
            // A warning, not an error: TREESPEC_DRAFT_MODEL may be set for
            // every run while one run compares another method.
            tracing::warn!(
                "--spec {} does not use the draft model (draft, draft-tree and hybrid do)",
                cfg.method.name()
            );
        }
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
        let suffix = || {
            SuffixDrafter::new(
                vocab,
                SuffixConfig {
                    cache_requests: cfg.suffix_cache_requests,
                    ..Default::default()
                },
            )
        };
        let draft = |width: usize| -> Result<Option<ModelDrafter>> {
            let Some(m) = &cfg.draft_model else {
                return Ok(None);
            };
            if !(cfg.draft_p_min.is_finite() && (0.0..1.0).contains(&cfg.draft_p_min)) {
                return Err(Error::Invalid("--draft-p-min must be in [0, 1)".into()));
            }
            let dcfg = DraftModelConfig {
                width,
                p_min: cfg.draft_p_min,
                retrieval: cfg.draft_retrieval.then(Default::default),
                ..Default::default()
            };
            Ok(Some(ModelDrafter::new(m.clone(), dcfg, vocab)))
        };
        let need_draft = |width: usize| -> Result<ModelDrafter> {
            draft(width)?.ok_or_else(|| {
                Error::Invalid(format!(
                    "--spec {} needs --draft-model NAME|PATH",
                    cfg.method.name()
                ))
            })
        };
        Ok(match cfg.method {
            SpecMethod::None => None,
            SpecMethod::Draft => Some(SpecDrafter::Model(need_draft(1)?)),
            SpecMethod::DraftTree => Some(SpecDrafter::Model(need_draft(TREE_WIDTH)?)),
            SpecMethod::Pld => Some(SpecDrafter::Pld(PromptLookup::default())),
            SpecMethod::Recycle => Some(SpecDrafter::Recycle(recycler()?)),
            SpecMethod::Suffix => Some(SpecDrafter::Suffix(suffix())),
            SpecMethod::Hybrid | SpecMethod::HybridDraft => {
                let h = Hybrid::new(recycler()?, PromptLookup::default()).with_suffix(suffix());
                let d = match cfg.method {
                    SpecMethod::HybridDraft => Some(need_draft(TREE_WIDTH)?),
                    _ => draft(TREE_WIDTH)?,
                };
                Some(SpecDrafter::Hybrid(match d {
                    Some(d) => h.with_draft(d),
                    None => h,
                }))
            }
            SpecMethod::HybridFixed => Some(SpecDrafter::Hybrid(
                Hybrid::new(recycler()?, PromptLookup::default())
                    .with_suffix(suffix())
                    .with_allocation(Allocation::Fixed),
            )),
            SpecMethod::HybridPld => Some(SpecDrafter::Hybrid(Hybrid::new(
                recycler()?,
                PromptLookup::default(),
            ))),
        })
    }

    pub fn recycler_mut(&mut self) -> Option<&mut TokenRecycler> {
        match self {
            SpecDrafter::Pld(_) | SpecDrafter::Suffix(_) | SpecDrafter::Model(_) => None,
            SpecDrafter::Recycle(r) => Some(r),
            SpecDrafter::Hybrid(h) => Some(h.recycler_mut()),
        }
    }

    pub fn suffix_mut(&mut self) -> Option<&mut SuffixDrafter> {
        match self {
            SpecDrafter::Suffix(s) => Some(s),
            SpecDrafter::Hybrid(h) => h.suffix_mut(),
            _ => None,
        }
    }

    /// Where the suffix drafter's global cache is kept beside a recycle
    /// state file: `<state>.suffix`.
    pub fn suffix_state_path(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".suffix");
        path.with_file_name(name)
    }

    /// Hot start from a saved matrix. A missing file is not an error (first
    /// run); a foreign or corrupt one is refused with a warning and ignored,
    /// so a bad state file never stops generation.
    pub fn load_state(&mut self, path: &Path, model_id: &str) {
        if let Some(s) = self.suffix_mut() {
            let sp = Self::suffix_state_path(path);
            if sp.exists() {
                match s.load(&sp, model_id) {
                    Ok(()) => tracing::info!(
                        "suffix cache loaded from {} ({} outputs)",
                        sp.display(),
                        s.global().len()
                    ),
                    Err(e) => tracing::warn!("ignoring suffix cache: {e}"),
                }
            }
        }
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
        if let Some(s) = self.suffix_mut() {
            s.save(&Self::suffix_state_path(path), model_id)?;
        }
        match self.recycler_mut() {
            Some(r) => r.save(path, model_id),
            None => Ok(()),
        }
    }

    fn inner(&mut self) -> &mut dyn Drafter {
        match self {
            SpecDrafter::Pld(d) => d,
            SpecDrafter::Recycle(d) => d,
            SpecDrafter::Suffix(d) => d,
            SpecDrafter::Hybrid(d) => d,
            SpecDrafter::Model(d) => d,
        }
    }

    fn inner_ref(&self) -> &dyn Drafter {
        match self {
            SpecDrafter::Pld(d) => d,
            SpecDrafter::Recycle(d) => d,
            SpecDrafter::Suffix(d) => d,
            SpecDrafter::Hybrid(d) => d,
            SpecDrafter::Model(d) => d,
        }
    }
}

impl Drafter for SpecDrafter {
    crate::draft::forward_drafter!(self, self.inner_ref(), self.inner());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine sees the drafter through `SpecDrafter`: what the hybrid
    /// estimates must reach it (a wrapper that kept the trait's default
    /// once hid every estimate from `--tree auto`).
    #[test]
    fn the_wrapper_forwards_the_hybrid_estimate() {
        let cfg = SpecConfig::default();
        let mut d = SpecDrafter::build(&cfg, 1000).unwrap().unwrap();
        let ctx: Vec<u32> = (0..40).map(|i| 100 + i % 10).collect();
        d.start(&ctx[..30]);
        let est = d.estimate(&ctx, 16).expect("the hybrid estimates its tree");
        assert!(
            !est.is_empty() && est.windows(2).all(|w| w[0] >= w[1]),
            "{est:?}"
        );
        // The next proposal is the estimated tree, cut to the size asked.
        let t = d.propose(&ctx, 3);
        assert_eq!(t.num_drafted(), 3.min(est.len()));
    }

    /// `--draft-retrieval` without a draft model to narrow is refused by
    /// name rather than silently doing nothing.
    #[test]
    fn retrieval_without_a_draft_model_is_refused() {
        for method in [SpecMethod::Hybrid, SpecMethod::Pld, SpecMethod::Draft] {
            let cfg = SpecConfig {
                method,
                draft_retrieval: true,
                ..Default::default()
            };
            let e = SpecDrafter::build(&cfg, 1000)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                e.contains("--draft-retrieval") && e.contains("--draft-model"),
                "{e}"
            );
        }
        let cfg = SpecConfig {
            draft_retrieval: false,
            ..Default::default()
        };
        assert!(SpecDrafter::build(&cfg, 1000).is_ok());
    }

    /// `--recycle-state F` keeps the hybrid's matrix in F and its suffix
    /// cache in F.suffix; a fresh process loads both and drafts the earlier
    /// output again.
    #[test]
    fn the_hybrid_state_carries_the_suffix_cache() {
        let dir = std::env::temp_dir().join(format!("treespec-spec-{}", std::process::id()));
        let path = dir.join("tr.bin");
        let cfg = SpecConfig {
            method: SpecMethod::Hybrid,
            tree: "dynamic".into(),
            ..Default::default()
        };
        let mut d = SpecDrafter::build(&cfg, 1000).unwrap().unwrap();
        let answer: Vec<u32> = (500..560).collect();
        d.start(&[1, 2, 3]);
        d.finish(&answer);
        d.save_state(&path, "m").unwrap();
        assert!(SpecDrafter::suffix_state_path(&path).exists());

        let mut e = SpecDrafter::build(&cfg, 1000).unwrap().unwrap();
        e.load_state(&path, "m");
        let ctx: Vec<u32> = [7, 8].into_iter().chain(500..520).collect();
        e.start(&ctx[..2]);
        let t = e.propose(&ctx, 16);
        assert_eq!(t.tokens[1..], (520..536).collect::<Vec<u32>>()[..]);
        assert_eq!(e.outlook(&ctx), crate::draft::suffix::outlook_class(20));
        // Another model's files are ignored: nothing to copy.
        let mut f = SpecDrafter::build(&cfg, 1000).unwrap().unwrap();
        f.load_state(&path, "other");
        assert_eq!(f.propose(&ctx, 16).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
