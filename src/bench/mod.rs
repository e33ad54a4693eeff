//! The Spec-Bench-style benchmark's model-free half: datasets and their
//! category mapping ([`dataset`]), the per-prompt records a run produces
//! ([`record`]), their aggregation into speedups ([`aggregate`]), and the
//! writers of `results.json`, `results.md` and the plots ([`report`],
//! [`plot`]). The loop that runs the model lives in the CLI
//! (`treespec bench -m MODEL --dataset FILE ...`); everything here is pure so
//! it can be tested on hand-written records.
//!
//! `results.json` (schema `treespec-bench/1`) holds, at top level:
//! - `schema`, `command` (argv), `commit` (`git rev-parse HEAD`, `-dirty`
//!   with local changes, or `unknown`), `started_unix`, `elapsed_s`,
//!   `complete`, `interrupted`;
//! - `model`: `name`, `path`, `identity`, `arch`, `n_layers`, `vocab_size`;
//! - `machine`: `cpu` (/proc/cpuinfo), `cores`, `threads`, `isa`, `os`;
//! - `config`: `datasets`, `methods` (`label`, `method`, `tree`,
//!   `max_draft`), `max_new_tokens`, `temperature`, `repeats`, `warmup`,
//!   `per_category`, `limit`, `ctx_size`, `items`;
//! - `forward_curve`: `[{n, ms, ratio}]` or null (`--no-curve`);
//! - `prompts`: one [`PromptRecord`] per generation;
//! - `aggregate`: an [`Aggregate`] (`methods`, `categories`, `per_category`
//!   and `overall` [`Cell`]s, `peer` cells, `peer_unmatched`, `lossless`);
//! - `peer`: the `--compare` figures as read, or null;
//! - `plots`: the PNG files written next to it.

pub mod aggregate;
pub mod dataset;
pub mod llama_cpp;
pub mod llama_server;
pub mod peers;
pub mod plot;
pub mod record;
pub mod report;

pub use aggregate::{aggregate, Aggregate, Cell, PeerFigures};
pub use dataset::{category_of, load_items, select, Item};
pub use record::{BenchResults, Check, MethodSpec, PromptRecord, RunInfo};
pub use report::{read_results, render_markdown, write_results};
