//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a catalogued model in the cache; CI pulls them before the tests.
pub fn model_path(name: &str) -> PathBuf {
    let home = std::env::var_os("TREESPEC_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/treespec")
        });
    let p = home.join("models").join(format!("{name}.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run `treespec pull {name}`",
        p.display()
    );
    p
}

/// The golden llama.cpp records of one model.
pub fn golden(name: &str) -> Vec<serde_json::Value> {
    let path = format!("../shared/golden/{name}.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
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
