//! treespec: lossless tree-based speculative decoding for local LLMs.
//!
//! The pipeline, one folder per stage:
//! - [`model`]: GGUF / safetensors loading, the decoder and its tree-capable
//!   forward pass over an explicit [`model::KvCache`];
//! - [`kernels`]: quantized matmul that scores N tokens for little more than one;
//! - [`draft`]: drafters that propose a [`draft::DraftTree`] (Token Recycling,
//!   prompt lookup, hybrid);
//! - [`verify`]: decides which path of a scored tree the model accepts;
//! - [`engine`]: the generation loop that ties scorer, drafter and verifier;
//! - [`tokenizer`], [`registry`], [`sampling`]: around them.

#[cfg(feature = "bench")]
pub mod bench;
pub mod draft;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod model;
pub mod registry;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;
pub mod verify;

pub use error::{Error, Result};
