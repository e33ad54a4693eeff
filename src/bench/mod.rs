//! The Spec-Bench-style benchmark's model-free half: datasets and their
//! category mapping ([`dataset`]), the per-prompt records a run produces
//! ([`record`]), their aggregation into speedups ([`aggregate`]), and the
//! writers of `results.json`, `results.md` and the plots ([`report`],
//! [`plot`]). The loop that runs the model lives in the CLI
//! (`treespec bench -m MODEL --dataset FILE ...`); everything here is pure so
//! it can be tested on hand-written records.

pub mod aggregate;
pub mod dataset;
pub mod plot;
pub mod record;
pub mod report;

pub use aggregate::{aggregate, Aggregate, Cell, PeerFigures};
pub use dataset::{category_of, load_items, select, Item};
pub use record::{BenchResults, Check, MethodSpec, PromptRecord, RunInfo};
pub use report::{render_markdown, write_results};
