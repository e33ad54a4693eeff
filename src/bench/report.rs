//! Writing a run's results: `results.json` (everything), `results.md` (the
//! Spec-Bench table and findings) and, when asked, the plots. Every file is
//! written to a temporary name and renamed, so an interrupted run always
//! leaves the last complete version.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::aggregate::{aggregate, Aggregate, Cell, OVERALL};
use super::dataset::category_title;
use super::record::{BenchResults, BASELINE};
use crate::error::Result;

/// Schema tag in `results.json`.
pub const SCHEMA: &str = "treespec-bench/1";

pub const JSON_FILE: &str = "results.json";
pub const MARKDOWN_FILE: &str = "results.md";
pub const SPEEDUP_PLOT: &str = "speedup_by_category.png";
pub const MAT_PLOT: &str = "mat_vs_budget.png";

/// The method labels in the order of the run's configuration.
fn method_order(results: &BenchResults) -> Vec<String> {
    results
        .info
        .config
        .methods
        .iter()
        .map(|m| m.label.clone())
        .collect()
}

/// Aggregates the records as the writers do.
pub fn aggregate_results(results: &BenchResults) -> Aggregate {
    aggregate(
        &results.records,
        &method_order(results),
        results.peer.as_ref(),
    )
}

/// The `results.json` document.
pub fn results_json(
    results: &BenchResults,
    agg: &Aggregate,
    plots: &[String],
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(&results.info).map_err(json_err)?;
    let obj = v.as_object_mut().expect("RunInfo serialises to an object");
    obj.insert("schema".into(), SCHEMA.into());
    obj.insert(
        "prompts".into(),
        serde_json::to_value(&results.records).map_err(json_err)?,
    );
    obj.insert(
        "aggregate".into(),
        serde_json::to_value(agg).map_err(json_err)?,
    );
    obj.insert(
        "peer".into(),
        serde_json::to_value(&results.peer).map_err(json_err)?,
    );
    obj.insert(
        "plots".into(),
        serde_json::to_value(plots).map_err(json_err)?,
    );
    Ok(v)
}

fn json_err(e: serde_json::Error) -> crate::Error {
    crate::Error::Io(std::io::Error::other(e))
}

/// Reads back a `results.json` (to redraw or add a peer without rerunning).
pub fn read_results(path: &Path) -> Result<BenchResults> {
    let bad = |msg: String| crate::Error::Invalid(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if v.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA) {
        return Err(bad(format!("not a {SCHEMA} results file")));
    }
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    Ok(BenchResults {
        info: serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?,
        records: serde_json::from_value(field("prompts")).map_err(|e| bad(e.to_string()))?,
        peer: serde_json::from_value(field("peer")).map_err(|e| bad(e.to_string()))?,
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// What [`write_results`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub plots: Vec<PathBuf>,
    /// Why plots were not drawn, when they were asked for and failed.
    pub plot_error: Option<String>,
}

/// Writes `results.json` and `results.md` into `dir` (created if needed),
/// and the PNG plots when `plots` is set. A plot that cannot be drawn (no
/// font) is reported in [`Written::plot_error`], not as an error: the
/// numbers matter more than the pictures.
pub fn write_results(dir: &Path, results: &BenchResults, plots: bool) -> Result<Written> {
    std::fs::create_dir_all(dir)?;
    let agg = aggregate_results(results);
    let mut written = Written {
        json: dir.join(JSON_FILE),
        markdown: dir.join(MARKDOWN_FILE),
        ..Default::default()
    };
    if plots && !results.records.is_empty() {
        let speed = dir.join(SPEEDUP_PLOT);
        let mat = dir.join(MAT_PLOT);
        let drawn = super::plot::speedup_by_category(&speed, &agg)
            .and_then(|_| super::plot::mat_vs_budget(&mat, &agg, &results.info.config.methods));
        match drawn {
            Ok(()) => written.plots = vec![speed, mat],
            Err(e) => written.plot_error = Some(e.to_string()),
        }
    }
    let plot_names: Vec<String> = written
        .plots
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let json = results_json(results, &agg, &plot_names)?;
    let text = serde_json::to_string_pretty(&json).map_err(json_err)?;
    write_atomic(&written.json, text.as_bytes())?;
    write_atomic(&written.markdown, render_markdown(results, &agg).as_bytes())?;
    Ok(written)
}

/// Accepted over drafted tokens, as a percentage ("–" without drafts).
fn acceptance(c: &Cell) -> String {
    if c.drafted_tokens > 0 {
        format!(
            "{:.1}%",
            100.0 * c.accepted_tokens as f64 / c.drafted_tokens as f64
        )
    } else {
        "–".into()
    }
}

fn speedup(v: Option<f64>) -> String {
    v.map_or("–".into(), |s| format!("{s:.2}×"))
}

/// `results.md`: header, the Spec-Bench table, findings, detail tables.
pub fn render_markdown(results: &BenchResults, agg: &Aggregate) -> String {
    let info = &results.info;
    let cfg = &info.config;
    let mut md = String::new();
    let _ = writeln!(md, "# treespec bench: {}\n", info.model.name);
    let sampling = if cfg.temperature > 0.0 {
        format!("sampling at temperature {}", cfg.temperature)
    } else {
        "greedy".to_string()
    };
    let ran: std::collections::BTreeSet<(String, String)> = results
        .records
        .iter()
        .map(|r| (r.dataset.clone(), super::dataset::id_text(&r.question_id)))
        .collect();
    let status = if info.complete {
        "complete".to_string()
    } else if info.interrupted {
        format!(
            "**partial: interrupted** after {} of {} items",
            ran.len(),
            cfg.items
        )
    } else {
        format!("in progress: {} of {} items", ran.len(), cfg.items)
    };
    let _ = writeln!(
        md,
        "Model `{}` ({}, {} layers). Machine: {} ({} logical CPUs, {} threads, kernels {}), commit `{}`.  ",
        info.model.identity,
        info.model.arch,
        info.model.n_layers,
        if info.machine.cpu.is_empty() { "unknown CPU" } else { &info.machine.cpu },
        info.machine.cores,
        info.machine.threads,
        info.machine.isa,
        info.commit,
    );
    let _ = writeln!(
        md,
        "Datasets {}; {} items, {sampling}, up to {} new tokens, {} repeat(s), {} warm-up item(s) excluded. Status: {status}.\n",
        cfg.datasets.join(", "),
        cfg.items,
        cfg.max_new_tokens,
        cfg.repeats,
        cfg.warmup,
    );
    let _ = writeln!(
        md,
        "Speedup = the method's tokens per second / plain decoding's over the same generations (prefill included; with identical outputs, plain's total time / the method's); tok/s = total new tokens / total time; MAT = tokens accepted per verify step (bonus and end-of-generation tokens included).\n"
    );

    // The Spec-Bench table.
    let mut header = String::from("| Method |");
    let mut rule = String::from("|---|");
    for c in &agg.categories {
        let _ = write!(header, " {} |", category_title(c));
        rule.push_str("---:|");
    }
    header.push_str(" #Mean Accepted Tokens | Tokens/s | Overall |");
    rule.push_str("---:|---:|---:|");
    let _ = writeln!(md, "{header}\n{rule}");
    let row = |md: &mut String, name: &str, cells: &dyn Fn(&str) -> Option<Cell>| {
        let mut line = format!("| {name} |");
        for c in &agg.categories {
            let _ = write!(line, " {} |", speedup(cells(c).and_then(|x| x.speedup)));
        }
        let o = cells(OVERALL);
        let _ = write!(
            line,
            " {} | {} | {} |",
            o.as_ref()
                .and_then(|x| x.mat)
                .map_or("–".into(), |m| format!("{m:.2}")),
            o.as_ref().map_or("–".into(), |x| format!("{:.1}", x.tok_s)),
            speedup(o.as_ref().and_then(|x| x.speedup)),
        );
        let _ = writeln!(md, "{line}");
    };
    let peer_modes: &[String] = cfg.peer.as_ref().map_or(&[], |p| &p.modes);
    for m in &agg.methods {
        let name = if m == BASELINE {
            "none (plain)".to_string()
        } else if peer_modes.contains(m) {
            format!("{m} (peer)")
        } else {
            m.clone()
        };
        row(&mut md, &name, &|c| agg.cell(m, c).cloned());
    }
    if let Some(p) = agg.peer.first() {
        let name = format!("{} (peer)", p.method);
        row(&mut md, &name, &|c| {
            agg.peer.iter().find(|x| x.category == c).cloned()
        });
    }
    let _ = writeln!(md);

    md.push_str("## Findings\n\n");
    md.push_str(&findings(results, agg));
    md.push_str("\n\n");

    // Per-method detail.
    md.push_str("## Per method (all categories)\n\n");
    md.push_str("| Method | generations | new tokens | steps | MAT | drafted/step | accepted/drafted | draft ms/step | verify ms/step | tok/s | exact | near-tie | mismatch |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in &agg.overall {
        let steps = c.steps.max(1) as f64;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {:.3} | {:.2} | {:.1} | {} | {} | {} |",
            c.method,
            c.generations,
            c.new_tokens,
            c.steps,
            c.mat.map_or("–".into(), |m| format!("{m:.2}")),
            c.drafted_tokens as f64 / steps,
            acceptance(c),
            c.draft_ms / steps,
            c.verify_ms / steps,
            c.tok_s,
            c.exact,
            c.near_tie,
            c.mismatch,
        );
    }
    md.push_str(&depth_section(&agg.overall));
    if let Some(peer) = &cfg.peer {
        md.push_str(&peer_section(results, agg, peer));
    }
    if let Some(curve) = &info.forward_curve {
        md.push_str("\n## Forward cost c(N)\n\nOne forward over N new tokens with all logits, 256 tokens cached (median).\n\n| N | ms | c(N)/c(1) |\n|---:|---:|---:|\n");
        for p in curve {
            let _ = writeln!(md, "| {} | {:.2} | {:.2} |", p.n, p.ms, p.ratio);
        }
    }
    if !agg.lossless.mismatches.is_empty() {
        md.push_str("\n## MISMATCHES (bugs)\n\n");
        for m in &agg.lossless.mismatches {
            let _ = writeln!(md, "- {m}");
        }
    }
    let _ = writeln!(md, "\nCommand: `{}`", info.command.join(" "));
    md
}

/// Tokens per second of method `a` over method `b` on the generations both
/// ran (same item, turn, repeat), prefill included; None without overlap.
pub fn tok_s_ratio(results: &BenchResults, a: &str, b: &str) -> Option<f64> {
    ratio_on_common(results, a, b, |r| r.wall_s)
}

/// Like [`tok_s_ratio`] over decode time only (prefill left out): the
/// engines' prefill speeds can differ far more than their decode speeds,
/// and long prompts would let prefill alone decide the ratio.
pub fn decode_tok_s_ratio(results: &BenchResults, a: &str, b: &str) -> Option<f64> {
    ratio_on_common(results, a, b, |r| r.decode_ms / 1e3)
}

fn ratio_on_common(
    results: &BenchResults,
    a: &str,
    b: &str,
    secs: impl Fn(&super::record::PromptRecord) -> f64,
) -> Option<f64> {
    use std::collections::HashMap;
    let of = |m: &str| -> HashMap<_, (usize, f64)> {
        results
            .records
            .iter()
            .filter(|r| r.method == m)
            .map(|r| (r.key(), (r.new_tokens, secs(r))))
            .collect()
    };
    let (ra, rb) = (of(a), of(b));
    let (mut ta, mut sa, mut tb, mut sb) = (0usize, 0.0, 0usize, 0.0);
    for (k, &(t, s)) in &ra {
        if let Some(&(t2, s2)) = rb.get(k) {
            ta += t;
            sa += s;
            tb += t2;
            sb += s2;
        }
    }
    (sa > 0.0 && sb > 0.0 && tb > 0).then(|| (ta as f64 / sa) / (tb as f64 / sb))
}

/// The same-run peer: its modes' figures, how often its output equals
/// treespec's plain decoding, and every treespec method's speed over it.
fn peer_section(results: &BenchResults, agg: &Aggregate, peer: &super::record::PeerRun) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## {} in the same run\n\n{} `{}` ({}), started by the benchmark on a loopback port per mode, same model file, threads and context, prompts sent as treespec's token ids, greedy; its own `timings` (prompt + decode ms) are its wall time. MAT for a peer = (tokens + end-of-generation) / (that − accepted draft tokens).\n",
        peer.name, peer.name, peer.binary, peer.version
    );
    md.push_str("| Mode | generations | tok/s | decode tok/s | MAT | drafted | accepted/drafted | same tokens as treespec plain | differ | of which at a near-tie |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in &peer.modes {
        let Some(c) = agg.cell(m, OVERALL) else {
            continue;
        };
        let decode_s: f64 = results
            .records
            .iter()
            .filter(|r| &r.method == m)
            .map(|r| r.decode_ms / 1e3)
            .sum();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            m,
            c.generations,
            c.tok_s,
            if decode_s > 0.0 {
                format!("{:.1}", c.new_tokens as f64 / decode_s)
            } else {
                "–".into()
            },
            c.mat.map_or("–".into(), |x| format!("{x:.2}")),
            c.drafted_tokens,
            acceptance(c),
            c.peer_same,
            c.peer_differs,
            c.peer_differs_near_tie,
        );
    }
    let ours: Vec<&String> = agg
        .methods
        .iter()
        .filter(|m| !peer.modes.contains(m))
        .collect();
    let modes: Vec<&String> = peer
        .modes
        .iter()
        .filter(|m| agg.cell(m, OVERALL).is_some())
        .collect();
    if !modes.is_empty() {
        md.push_str("\ntreespec's tokens per second over the peer's, on the generations both ran:\n\n| treespec method |");
        let mut rule = String::from("|---|");
        for m in &modes {
            let _ = write!(md, " vs {m} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "\n{rule}");
        for o in &ours {
            let name = if o.as_str() == BASELINE {
                "none (plain)"
            } else {
                o.as_str()
            };
            let _ = write!(md, "| {name} |");
            for m in &modes {
                let _ = write!(
                    md,
                    " {} (decode {}) |",
                    speedup(tok_s_ratio(results, o, m)),
                    speedup(decode_tok_s_ratio(results, o, m))
                );
            }
            md.push('\n');
        }
        md.push_str("\nFirst figure: prefill + decode, as the Spec-Bench table; in brackets: decode only (new tokens over decode time), since the two engines' prefill speeds differ more than their decode speeds.\n");
    }
    // Where the peer's output first differs, and how close plain decoding
    // was to a tie there: a small margin is float noise, a large one a
    // different model (template, tokenizer, maths).
    // Modes that part at the same token are one line; later turns that
    // inherit a difference (their prompt holds the peer's own earlier
    // answer, so there is no common text) are only counted.
    struct DiffPlace<'a> {
        key: (String, String, usize, usize),
        modes: Vec<&'a str>,
        ours: Option<f32>,
        theirs: Option<f32>,
    }
    let mut groups: Vec<DiffPlace> = Vec::new();
    let mut inherited = 0;
    for r in results
        .records
        .iter()
        .filter(|r| r.check == super::record::Check::PeerDiffers)
    {
        let Some(at) = r.first_diff else {
            inherited += 1;
            continue;
        };
        let key = (
            r.dataset.clone(),
            super::dataset::id_text(&r.question_id),
            r.turn,
            at,
        );
        match groups.iter_mut().find(|g| g.key == key) {
            Some(g) => {
                g.modes.push(&r.method);
                g.ours = g.ours.or(r.diff_margin);
                g.theirs = g.theirs.or(r.peer_margin);
            }
            None => groups.push(DiffPlace {
                key,
                modes: vec![&r.method],
                ours: r.diff_margin,
                theirs: r.peer_margin,
            }),
        }
    }
    if !groups.is_empty() || inherited > 0 {
        let _ = writeln!(
            md,
            "\nFirst differences from treespec's plain output ({} places{}):\n",
            groups.len(),
            if groups.len() > 40 { ", first 40" } else { "" }
        );
        let margin = |m: Option<f32>| m.map_or("?".into(), |m| format!("{m:.4}"));
        for g in groups.iter().take(40) {
            let (dataset, id, turn, at) = &g.key;
            let _ = writeln!(
                md,
                "- {dataset} {id} turn {turn}: from token {at} (top-2 margin there: treespec plain {}, llama.cpp {}): {}",
                margin(g.ours),
                margin(g.theirs),
                g.modes.join(", ")
            );
        }
        if inherited > 0 {
            let _ = writeln!(
                md,
                "\n{inherited} later-turn generation(s) differ too: their prompts hold the peer's own earlier, different answers."
            );
        }
    }
    md
}

/// The findings paragraph, generated from the numbers.
pub fn findings(results: &BenchResults, agg: &Aggregate) -> String {
    let mut out = Vec::new();
    let peer_modes: &[String] = results.info.config.peer.as_ref().map_or(&[], |p| &p.modes);
    let spec: Vec<&Cell> = agg
        .overall
        .iter()
        .filter(|c| c.method != BASELINE && c.speedup.is_some())
        .filter(|c| !peer_modes.contains(&c.method))
        .collect();
    let plain = agg.cell(BASELINE, OVERALL);
    match spec.iter().max_by(|a, b| {
        a.speedup
            .unwrap_or(0.0)
            .total_cmp(&b.speedup.unwrap_or(0.0))
    }) {
        Some(best) => {
            let s = best.speedup.unwrap_or(0.0);
            let vs = plain.map_or(String::new(), |p| format!(" vs {:.1} plain", p.tok_s));
            let mat = best.mat.map_or(String::new(), |m| format!(", MAT {m:.2}"));
            if s >= 1.0 {
                out.push(format!(
                    "Best method overall: **{}** at {s:.2}× ({:.1} tok/s{vs}{mat}).",
                    best.method, best.tok_s
                ));
            } else {
                out.push(format!(
                    "No speculative method beat plain decoding overall; the best, **{}**, ran at {s:.2}× ({:.1} tok/s{vs}{mat}).",
                    best.method, best.tok_s
                ));
            }
        }
        None => out.push("No speculative method has results to compare yet.".into()),
    }
    let lost: Vec<String> = agg
        .per_category
        .iter()
        .filter(|c| !peer_modes.contains(&c.method))
        .filter(|c| c.method != BASELINE && c.speedup.is_some_and(|s| s < 1.0))
        .map(|c| {
            let s = c.speedup.unwrap_or(0.0);
            // Enough digits that a loss never reads as 1.00×.
            let digits = if s >= 0.995 { 3 } else { 2 };
            format!("{} on {} ({s:.digits$}×)", c.method, c.category)
        })
        .collect();
    if lost.is_empty() {
        if !spec.is_empty() {
            out.push("Speculation did not lose (<1.0×) in any category.".into());
        }
    } else {
        out.push(format!("Speculation lost (<1.0×) in: {}.", lost.join(", ")));
    }
    match &results.info.forward_curve {
        Some(curve) if !curve.is_empty() => {
            let at = |n: usize| curve.iter().find(|p| p.n == n).map(|p| p.ratio);
            let parts: Vec<String> = [4, 8, 16, 32]
                .iter()
                .filter_map(|&n| at(n).map(|r| format!("c({n})/c(1) = {r:.2}")))
                .collect();
            if !parts.is_empty() {
                out.push(format!(
                    "Verification cost: {}; a step drafting N nodes pays off only when it yields more than c(N+1)/c(1) tokens.",
                    parts.join(", ")
                ));
            }
        }
        _ => out.push("The c(N) curve was not measured (--no-curve).".into()),
    }
    let l = &agg.lossless;
    if l.sampled > 0 {
        out.push(format!(
            "Sampling run: {} generations not compared with plain decoding.",
            l.sampled
        ));
    }
    if l.exact + l.near_tie + l.mismatch > 0 {
        let head = if l.mismatch > 0 {
            "**LOSSLESS CHECK FAILED**: "
        } else {
            "Greedy outputs vs plain decoding: "
        };
        out.push(format!(
            "{head}{} identical, {} diverged after a near-tie, {} mismatches.",
            l.exact, l.near_tie, l.mismatch
        ));
    }
    if let Some(p) = agg.peer.iter().find(|c| c.category == OVERALL) {
        out.push(format!(
            "Peer {}: {:.1} tok/s over {} matched prompts ({} relative to plain decoding's throughput on them){}.",
            p.method,
            p.tok_s,
            p.generations,
            speedup(p.speedup),
            if agg.peer_unmatched > 0 {
                format!("; {} peer entries matched nothing", agg.peer_unmatched)
            } else {
                String::new()
            }
        ));
    }
    out.join(" ")
}

/// Where each method's accepted paths ended: the share of its steps that
/// reached draft depth d (vLLM's acceptance per position), and for a draft
/// model what it ran per step (a depth costs one draft forward, which the
/// acceptance at that depth has to pay for).
fn depth_section(cells: &[Cell]) -> String {
    const DEPTHS: usize = 8;
    // A peer reports no depths (llama-server gives totals only).
    let drafting: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.drafted_tokens > 0 && !c.accepted_per_depth.is_empty())
        .collect();
    if drafting.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n## Acceptance per depth\n\nShare of a method's steps whose accepted path reached draft depth d.\n\n| Method |",
    );
    for d in 1..=DEPTHS {
        let _ = write!(md, " d{d} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(DEPTHS));
    md.push('\n');
    for c in &drafting {
        let steps = c.steps.max(1) as f64;
        let _ = write!(md, "| {} |", c.method);
        for d in 0..DEPTHS {
            let n = c.accepted_per_depth.get(d).copied().unwrap_or(0);
            let _ = write!(md, " {:.2} |", n as f64 / steps);
        }
        md.push('\n');
    }
    let with_model: Vec<&&Cell> = drafting
        .iter()
        .filter(|c| !c.draft_model.is_zero())
        .collect();
    if !with_model.is_empty() {
        md.push_str("\n| Method | draft forwards/step | draft tokens/step | draft ms/step | catch-ups | catch-up ms/step | retrievals | context attended |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in with_model {
            let steps = c.steps.max(1) as f64;
            let d = &c.draft_model;
            let attended = if d.retrievals > 0 {
                format!(
                    "{:.0}%",
                    100.0 * d.retrieval_held_positions as f64
                        / d.retrieval_context_positions.max(1) as f64
                )
            } else {
                "–".into()
            };
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {} | {} |",
                c.method,
                d.model_forwards as f64 / steps,
                d.model_tokens as f64 / steps,
                c.draft_ms / steps,
                d.catch_ups,
                d.catch_up_us as f64 / 1e3 / steps,
                d.retrievals,
                attended
            );
        }
    }
    md
}
