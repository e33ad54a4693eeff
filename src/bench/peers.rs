//! llama.cpp's figures for `treespec bench forward`, read from a peers file
//! written the way `../shared/peers.md` is: a "Plain decoding" table
//! (`| model | tok/s | ms/token |`), a forward-cost table whose columns are
//! `<model label> ms` / `<model label> rel`, and prose lines of the form
//! `<model> (...), same measurement: N=1 32.3 ms, N=2 61.3 (1.90), ...`.
//!
//! Only llama.cpp's section is read (it ends at the next `## ` heading).
//! A model matches a column label when every `-`-separated part of the label
//! occurs in the model's name (`qwen-0.5b` ↔ `qwen2.5-coder-0.5b`).

use serde::Serialize;

/// What the peers file says about one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PeerForward {
    /// Plain decoding, tokens per second.
    pub decode_tok_s: Option<f64>,
    /// (N, ms of one forward over N tokens with all logits).
    #[serde(serialize_with = "points")]
    pub curve: Vec<(usize, f64)>,
}

/// The curve as `[{"n", "ms"}]`, like treespec's own.
fn points<S: serde::Serializer>(c: &[(usize, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    #[derive(Serialize)]
    struct P {
        n: usize,
        ms: f64,
    }
    let mut seq = s.serialize_seq(Some(c.len()))?;
    for &(n, ms) in c {
        seq.serialize_element(&P { n, ms })?;
    }
    seq.end()
}

impl PeerForward {
    pub fn is_empty(&self) -> bool {
        self.decode_tok_s.is_none() && self.curve.is_empty()
    }

    /// ms at `n`, if measured.
    pub fn ms(&self, n: usize) -> Option<f64> {
        self.curve.iter().find(|p| p.0 == n).map(|p| p.1)
    }
}

fn label_matches(label: &str, model: &str) -> bool {
    let model = model.to_lowercase();
    let parts: Vec<&str> = label.split('-').filter(|p| !p.is_empty()).collect();
    !parts.is_empty() && parts.iter().all(|p| model.contains(&p.to_lowercase()))
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn number(s: &str) -> Option<f64> {
    s.trim_start_matches('~').trim().parse().ok()
}

/// llama.cpp's figures for `model` (a catalogue name or file stem).
pub fn llama_cpp_forward(text: &str, model: &str) -> PeerForward {
    let mut out = PeerForward::default();
    // The llama.cpp section only.
    let mut section = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("## ") {
            inside = line.to_lowercase().contains("llama.cpp");
            continue;
        }
        if inside {
            section.push(line);
        }
    }
    let mut header: Option<Vec<String>> = None;
    for line in section {
        let t = line.trim();
        if !t.starts_with('|') {
            header = None;
            if let Some(rest) = t.strip_prefix(model) {
                if rest.contains("same measurement") {
                    out.curve.extend(prose_points(rest));
                }
            }
            continue;
        }
        let row = cells(t);
        if row.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch))) {
            continue; // the |---| line
        }
        let Some(h) = &header else {
            header = Some(row);
            continue;
        };
        if h.first().is_some_and(|c| c == "model") && h.iter().any(|c| c.contains("tok/s")) {
            if row.first().is_some_and(|m| m == model) {
                out.decode_tok_s = row.get(1).and_then(|c| number(c));
            }
        } else if h.first().is_some_and(|c| c == "N") {
            let Some(n) = row.first().and_then(|c| c.parse::<usize>().ok()) else {
                continue;
            };
            for (i, col) in h.iter().enumerate() {
                if let Some(label) = col.strip_suffix(" ms") {
                    if label_matches(label, model) {
                        if let Some(ms) = row.get(i).and_then(|c| number(c)) {
                            out.curve.push((n, ms));
                        }
                    }
                }
            }
        }
    }
    out.curve.sort_by_key(|p| p.0);
    out.curve.dedup_by_key(|p| p.0);
    out
}

/// `N=1 32.3 ms, N=2 61.3 (1.90), ...` → [(1, 32.3), (2, 61.3), ...].
fn prose_points(s: &str) -> Vec<(usize, f64)> {
    s.split("N=")
        .skip(1)
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse().ok()?;
            let ms = number(words.next()?.trim_end_matches(','))?;
            Some((n, ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# Peer figures
## llama.cpp (commit x)
### Plain decoding
| model | tok/s (llama-bench tg64) | ms/token |
|---|---:|---:|
| qwen2.5-coder-0.5b | 48.8 | 20.5 |
| smollm2-135m | 126.0 | 7.9 |

| N | qwen-0.5b ms | qwen-0.5b rel | smollm2 ms | smollm2 rel |
|---:|---:|---:|---:|---:|
| 1 | 21.2 | 1.00 | 9.0 | 1.00 |
| 2 | 39.7 | 1.87 | 15.1 | 1.67 |
| 80 | ~498 | ~22 | – | – |

qwen2.5-coder-1.5b (Q4_K_M), same measurement: N=1 32.3 ms, N=2 61.3 (1.90), N=4 125.1 (3.87).
## candle 0.11.1
| model | tok/s | ms/token |
|---|---:|---:|
| qwen2.5-coder-0.5b | 33 | 30 |
";

    #[test]
    fn reads_tables_and_prose() {
        let q = llama_cpp_forward(SAMPLE, "qwen2.5-coder-0.5b");
        assert_eq!(q.decode_tok_s, Some(48.8), "llama.cpp's row, not candle's");
        assert_eq!(q.curve, vec![(1, 21.2), (2, 39.7), (80, 498.0)]);
        let s = llama_cpp_forward(SAMPLE, "smollm2-135m");
        assert_eq!(s.decode_tok_s, Some(126.0));
        assert_eq!(s.curve, vec![(1, 9.0), (2, 15.1)]);
        let b = llama_cpp_forward(SAMPLE, "qwen2.5-coder-1.5b");
        assert_eq!(b.decode_tok_s, None);
        assert_eq!(b.curve, vec![(1, 32.3), (2, 61.3), (4, 125.1)]);
        assert_eq!(b.ms(4), Some(125.1));
        assert!(llama_cpp_forward(SAMPLE, "llama-7b").is_empty());
        assert!(llama_cpp_forward("", "smollm2-135m").is_empty());
    }

    /// The shared file, when present, yields figures for the three
    /// catalogue models.
    #[test]
    fn reads_the_shared_peers_file() {
        let Ok(text) = std::fs::read_to_string("../shared/peers.md") else {
            return;
        };
        for m in ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"] {
            let p = llama_cpp_forward(&text, m);
            assert!(p.decode_tok_s.is_some(), "{m}: no decode figure");
            assert!(p.ms(1).is_some() && p.ms(16).is_some(), "{m}: {p:?}");
        }
    }
}
