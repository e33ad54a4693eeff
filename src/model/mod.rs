//! The model: configuration, weight loading, the tree-capable decoder and
//! its explicit KV cache.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod kv_cache;
pub(crate) mod lanes;
pub mod linear;
pub mod load;
pub mod ops;
pub mod profile;

pub use config::{Arch, ModelConfig};
pub use decoder::{Decoder, LogitRows, Logits, Segment};
pub use kv_cache::{common_prefix_len, KvBlock, KvCache, KEY_TILE};
pub use load::Model;
