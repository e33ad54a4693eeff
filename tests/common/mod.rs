//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The treespec home: `$TREESPEC_HOME`, else `~/.cache/treespec`.
pub fn treespec_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TREESPEC_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("treespec")
}

/// Path of a catalogued model's GGUF; panics with the command that fetches it.
pub fn model_path(name: &str) -> PathBuf {
    let path = treespec_home().join("models").join(format!("{name}.gguf"));
    if !path.exists() {
        panic!(
            "model file {} is missing: run `treespec pull {name}`",
            path.display()
        );
    }
    path
}

/// The shared data folder (golden outputs, datasets): `../shared` from the
/// crate root as CI lays it out, or `$TREESPEC_SHARED`.
pub fn shared_dir() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if beside.exists() {
        return beside;
    }
    match std::env::var_os("TREESPEC_SHARED") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "{} is missing; set TREESPEC_SHARED to the shared data folder",
            beside.display()
        ),
    }
}

/// The golden llama.cpp records of one model.
pub fn golden(name: &str) -> Vec<serde_json::Value> {
    let path = shared_dir().join("golden").join(format!("{name}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("golden line is JSON"))
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
