//! Catalogue of models that registry packages ship, and `treespec pull`.
//! OWNED BY THE REGISTRY WORK: this stub only fixes the API.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `$TREESPEC_HOME`, default `~/.cache/treespec`.
pub fn treespec_home() -> PathBuf {
    std::env::var_os("TREESPEC_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/treespec"))
}

/// `-m/--model`: a catalogue name (pulled if missing), a .gguf path, or an HF directory.
pub fn resolve_model(arg: &str, home: &Path, _progress: bool) -> Result<PathBuf> {
    let p = home.join("models").join(format!("{arg}.gguf"));
    if p.exists() {
        return Ok(p);
    }
    if Path::new(arg).exists() {
        return Ok(PathBuf::from(arg));
    }
    Err(Error::Registry(format!("cannot resolve {arg}")))
}

/// Fetches a catalogued model into the cache; returns the GGUF path.
pub fn pull(name: &str, _home: &Path, _progress: bool) -> Result<PathBuf> {
    Err(Error::Registry(format!("cannot pull {name}")))
}

pub struct CatalogEntry {
    pub name: &'static str,
    pub size: u64,
}

pub fn catalogue() -> &'static [CatalogEntry] {
    &[]
}

pub fn verify(_name: &str, _home: &Path) -> Result<()> {
    Ok(())
}
