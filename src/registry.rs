//! Catalogue of models that registry packages ship, and `treespec pull`.
//! OWNED BY THE REGISTRY WORK: this stub only fixes the API.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `$TREESPEC_HOME`, default `~/.cache/treespec`.
pub fn treespec_home() -> PathBuf {
    unimplemented!()
}

/// `-m/--model`: a catalogue name (pulled if missing), a .gguf path, or an HF directory.
pub fn resolve_model(arg: &str, _home: &Path, _progress: bool) -> Result<PathBuf> {
    Err(Error::Registry(format!("cannot resolve {arg}")))
}

/// Fetches a catalogued model into the cache; returns the GGUF path.
pub fn pull(name: &str, _home: &Path, _progress: bool) -> Result<PathBuf> {
    Err(Error::Registry(format!("cannot pull {name}")))
}
