//! The benchmark suite: category mapping, aggregation against hand-computed
//! numbers, the output files (complete and interrupted), and one real run of
//! `treespec bench` on SmolLM2 over a 3-prompt fixture.

mod common;

use std::path::{Path, PathBuf};

use treespec::bench::aggregate::{PeerPrompt, OVERALL};
use treespec::bench::record::{CurvePoint, MachineInfo, ModelInfo, RunConfig};
use treespec::bench::{
    aggregate, category_of, load_items, read_results, select, write_results, BenchResults, Check,
    MethodSpec, PeerFigures, PromptRecord, RunInfo,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bench_tiny.jsonl")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("treespec-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_raw_category_maps_to_its_report_column() {
    for raw in [
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    ] {
        assert_eq!(category_of(raw, "spec_bench"), "conversation", "{raw}");
    }
    for raw in [
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
    ] {
        assert_eq!(category_of(raw, "spec_bench"), raw);
    }
    assert_eq!(category_of("code", "mbpp"), "code");
    assert_eq!(category_of("code", "anything"), "code");
    assert_eq!(category_of("whatever", "mbpp"), "code");
    assert_eq!(category_of("Writing", "x"), "conversation");
    assert_eq!(category_of("poetry", "x"), "poetry");
}

#[test]
fn the_real_datasets_map_onto_seven_columns() {
    let shared = common::shared_dir().join("datasets");
    let sb = load_items(&shared.join("spec_bench.jsonl")).unwrap();
    assert_eq!(sb.len(), 480);
    let mut cats: Vec<&str> = sb.iter().map(|i| i.category.as_str()).collect();
    cats.sort();
    cats.dedup();
    assert_eq!(
        cats,
        [
            "conversation",
            "math_reasoning",
            "qa",
            "rag",
            "summarization",
            "translation"
        ]
    );
    assert_eq!(sb.iter().filter(|i| i.turns.len() == 2).count(), 80);
    let mb = load_items(&shared.join("mbpp.jsonl")).unwrap();
    assert!(mb.iter().all(|i| i.category == "code"));
    let picked = select(sb, Some(3));
    assert_eq!(picked.len(), 18);
}

#[test]
fn fixture_loads_and_bad_files_are_errors() {
    let items = load_items(&fixture()).unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].category, "conversation");
    assert_eq!(items[0].turns.len(), 2);
    assert_eq!(items[1].category, "translation");
    assert_eq!(items[2].category, "code");
    assert_eq!(select(items, Some(1)).len(), 3);

    let dir = temp_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [
        ("notjson.jsonl", "{oops\n"),
        (
            "noturns.jsonl",
            "{\"question_id\": 1, \"category\": \"qa\"}\n",
        ),
        ("noid.jsonl", "{\"category\": \"qa\", \"turns\": [\"x\"]}\n"),
        ("emptyturns.jsonl", "{\"question_id\": 1, \"turns\": []}\n"),
        ("empty.jsonl", "\n"),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let e = load_items(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    assert!(load_items(&dir.join("missing.jsonl")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[allow(clippy::too_many_arguments)]
fn rec(
    dataset: &str,
    qid: u64,
    category: &str,
    turn: usize,
    method: &str,
    wall_s: f64,
    tokens: usize,
    steps: usize,
    check: Check,
) -> PromptRecord {
    PromptRecord {
        dataset: dataset.into(),
        question_id: qid.into(),
        category: category.into(),
        raw_category: category.into(),
        turn,
        repeat: 0,
        method: method.into(),
        prompt_tokens: 50,
        prefilled_tokens: 50,
        new_tokens: tokens,
        mat_tokens: tokens,
        steps,
        wall_s,
        prefill_ms: 0.0,
        decode_ms: wall_s * 1e3,
        mat: tokens as f64 / steps as f64,
        drafted_tokens: if method == "none" { 0 } else { 4 * steps },
        accepted_tokens: tokens - steps,
        accepted_per_depth: if method == "none" {
            vec![]
        } else {
            vec![steps / 2, steps / 4]
        },
        draft_ms: 1.0,
        verify_ms: 2.0,
        draft_model: Default::default(),
        stop: "max_tokens".into(),
        check,
        first_diff: None,
        diff_margin: None,
        peer_margin: None,
    }
}

/// Plain and pld over three categories, one pld record without a plain counterpart.
fn records() -> Vec<PromptRecord> {
    use Check::*;
    vec![
        rec("sb", 1, "conversation", 0, "none", 2.0, 20, 20, Baseline),
        rec("sb", 1, "conversation", 1, "none", 1.0, 10, 10, Baseline),
        rec("sb", 2, "translation", 0, "none", 4.0, 40, 40, Baseline),
        rec("mbpp", 3, "code", 0, "none", 3.0, 30, 30, Baseline),
        rec("sb", 1, "conversation", 0, "pld", 1.0, 20, 10, Exact),
        rec("sb", 1, "conversation", 1, "pld", 1.0, 10, 5, NearTie),
        rec("sb", 2, "translation", 0, "pld", 5.0, 40, 40, Exact),
        rec("mbpp", 3, "code", 0, "pld", 2.0, 30, 15, Exact),
        // Interrupted before plain ran on it: counts for tok/s, not speedup.
        rec("sb", 4, "translation", 0, "pld", 10.0, 10, 10, Unchecked),
    ]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn aggregation_matches_hand_computed_ratios_of_sums() {
    let recs = records();
    let agg = aggregate(&recs, &["pld".into(), "none".into()], None);
    assert_eq!(agg.methods, ["none", "pld"]);
    assert_eq!(agg.categories, ["conversation", "translation", "code"]);

    let c = |m: &str, cat: &str| agg.cell(m, cat).unwrap().clone();
    assert!(close(c("pld", "conversation").speedup.unwrap(), 3.0 / 2.0));
    assert!(close(c("pld", "translation").speedup.unwrap(), 4.0 / 5.0));
    assert!(close(c("pld", "code").speedup.unwrap(), 3.0 / 2.0));
    // Overall: ratio of sums over matched generations, not a mean of ratios.
    assert!(close(c("pld", OVERALL).speedup.unwrap(), 10.0 / 9.0));
    assert!(close(c("none", OVERALL).speedup.unwrap(), 1.0));

    let t = c("pld", "translation");
    assert_eq!(t.generations, 2);
    assert!(close(t.tok_s, 50.0 / 15.0));
    assert!(close(t.baseline_seconds, 4.0));
    assert!(close(t.matched_seconds, 5.0));
    let o = c("pld", OVERALL);
    assert_eq!((o.new_tokens, o.steps), (110, 80));
    assert!(close(o.mat.unwrap(), 110.0 / 80.0));
    assert!(close(o.tok_s, 110.0 / 19.0));
    assert_eq!(
        o.accepted_per_depth,
        vec![5 + 2 + 20 + 7 + 5, 2 + 1 + 10 + 3 + 2]
    );
    assert_eq!((o.exact, o.near_tie, o.mismatch), (3, 1, 0));
    assert!(close(c("none", "conversation").tok_s, 10.0));

    assert_eq!(agg.lossless.exact, 3);
    assert_eq!(agg.lossless.near_tie, 1);
    assert_eq!(agg.lossless.unchecked, 1);
    assert_eq!(agg.lossless.mismatch, 0);
}

#[test]
fn mismatches_are_listed() {
    let mut recs = records();
    recs[6].check = Check::Mismatch;
    recs[6].first_diff = Some(7);
    let agg = aggregate(&recs, &[], None);
    assert_eq!(agg.lossless.mismatch, 1);
    assert!(agg.lossless.mismatches[0].contains("pld"));
    assert!(agg.lossless.mismatches[0].contains("token 7"));
}

#[test]
fn peer_figures_compare_by_throughput_on_matched_prompts() {
    let peer = PeerFigures {
        name: "llama.cpp".into(),
        prompts: vec![
            // No turn: covers both turns of item 1 (plain: 30 tokens in 3 s).
            PeerPrompt {
                question_id: 1.into(),
                turn: None,
                dataset: None,
                tokens: 30,
                seconds: 1.5,
            },
            PeerPrompt {
                question_id: "2".into(),
                turn: Some(0),
                dataset: Some("sb".into()),
                tokens: 40,
                seconds: 8.0,
            },
            PeerPrompt {
                question_id: 99.into(),
                turn: None,
                dataset: None,
                tokens: 5,
                seconds: 1.0,
            },
        ],
    };
    let agg = aggregate(&records(), &[], Some(&peer));
    assert_eq!(agg.peer_unmatched, 1);
    let c = |cat: &str| agg.cell("llama.cpp", cat).unwrap().clone();
    assert!(close(c("conversation").speedup.unwrap(), 20.0 / 10.0));
    assert!(close(c("translation").speedup.unwrap(), 5.0 / 10.0));
    let o = c(OVERALL);
    assert!(close(o.tok_s, 70.0 / 9.5));
    assert!(close(o.speedup.unwrap(), (70.0 / 9.5) / 10.0));
    assert!(agg.cell("llama.cpp", "code").is_none());
}

#[test]
fn same_run_peer_rows_are_compared_not_held_to_losslessness() {
    use Check::*;
    let mut recs = records();
    // The peer's plain mode: item 1 identical (30 tokens in 6 s), item 2
    // differs at token 3 where plain's margin was 0.001, with fewer tokens.
    let mut differs = rec(
        "sb",
        2,
        "translation",
        0,
        "llama.cpp:none",
        2.0,
        20,
        20,
        PeerDiffers,
    );
    differs.first_diff = Some(3);
    differs.diff_margin = Some(0.001);
    differs.peer_margin = Some(0.0123);
    recs.extend([
        rec(
            "sb",
            1,
            "conversation",
            0,
            "llama.cpp:none",
            4.0,
            20,
            20,
            PeerSame,
        ),
        rec(
            "sb",
            1,
            "conversation",
            1,
            "llama.cpp:none",
            2.0,
            10,
            10,
            PeerSame,
        ),
        differs,
    ]);
    let agg = aggregate(&recs, &["none".into(), "pld".into()], None);
    // A peer's difference is not a lossless failure.
    assert_eq!(agg.lossless.mismatch, 0);
    assert_eq!(agg.lossless.exact, 3);
    let o = agg.cell("llama.cpp:none", OVERALL).unwrap();
    assert_eq!(
        (o.peer_same, o.peer_differs, o.peer_differs_near_tie),
        (2, 1, 1)
    );
    // Speedup is throughput over plain's on the same generations: the peer
    // made 20 tokens in 2 s where plain made 40 in 4 s: 1.0x, not 2.0x.
    let t = agg.cell("llama.cpp:none", "translation").unwrap();
    assert!(close(t.speedup.unwrap(), 1.0), "{:?}", t.speedup);
    // conversation: 30 tokens in 6 s vs plain's 30 in 3 s.
    let c = agg.cell("llama.cpp:none", "conversation").unwrap();
    assert!(close(c.speedup.unwrap(), 0.5));

    let mut res = results(recs, true);
    res.info.config.peer = Some(treespec::bench::record::PeerRun {
        name: "llama.cpp".into(),
        version: "test".into(),
        binary: "/x/llama-server".into(),
        modes: vec!["llama.cpp:none".into()],
        draft_model: None,
    });
    // pld over the peer on the generations both ran: items 1 (both turns)
    // and 2: pld 70 tokens in 7 s, the peer 50 in 8 s.
    let r = treespec::bench::report::tok_s_ratio(&res, "pld", "llama.cpp:none").unwrap();
    assert!(close(r, (70.0 / 7.0) / (50.0 / 8.0)), "{r}");
    // A later turn of the differing item inherits the verdict with no
    // position: its prompt holds the peer's own earlier answer.
    res.records.push(rec(
        "sb",
        2,
        "translation",
        1,
        "llama.cpp:none",
        1.0,
        5,
        5,
        PeerDiffers,
    ));
    let agg = treespec::bench::report::aggregate_results(&res);
    let md = treespec::bench::render_markdown(&res, &agg);
    assert!(md.contains("| llama.cpp:none (peer) |"), "{md}");
    assert!(md.contains("## llama.cpp in the same run"), "{md}");
    assert!(md.contains("vs llama.cpp:none"), "{md}");
    assert!(
        md.contains(
            "from token 3 (top-2 margin there: treespec plain 0.0010, llama.cpp 0.0123): llama.cpp:none"
        ),
        "{md}"
    );
    assert!(md.contains("1 later-turn generation(s) differ too"), "{md}");
    assert!(!md.contains("from token ?"), "{md}");
    // The findings name treespec's best method, never the peer.
    assert!(md.contains("**pld**"), "{md}");
}

fn results(records: Vec<PromptRecord>, complete: bool) -> BenchResults {
    let methods = MethodSpec::parse_list(&["none,pld".into()], "dynamic", 8).unwrap();
    BenchResults {
        info: RunInfo {
            command: vec!["treespec".into(), "bench".into()],
            model: ModelInfo {
                name: "tiny".into(),
                path: "/x/tiny.gguf".into(),
                identity: "gguf:tiny".into(),
                arch: "llama".into(),
                n_layers: 2,
                vocab_size: 100,
            },
            machine: MachineInfo {
                cpu: "Test CPU".into(),
                cores: 2,
                threads: 2,
                isa: "scalar".into(),
                os: "linux-x86_64".into(),
            },
            commit: "unknown".into(),
            config: RunConfig {
                datasets: vec!["sb".into(), "mbpp".into()],
                methods,
                max_new_tokens: 64,
                repeats: 1,
                items: 4,
                ..Default::default()
            },
            forward_curve: Some(vec![
                CurvePoint {
                    n: 1,
                    ms: 10.0,
                    ratio: 1.0,
                },
                CurvePoint {
                    n: 8,
                    ms: 14.0,
                    ratio: 1.4,
                },
            ]),
            complete,
            interrupted: !complete,
            ..Default::default()
        },
        records,
        peer: None,
    }
}

/// Every documented field of `results.json`.
fn check_json_fields(v: &serde_json::Value) {
    for k in [
        "schema",
        "command",
        "model",
        "machine",
        "commit",
        "config",
        "forward_curve",
        "started_unix",
        "elapsed_s",
        "complete",
        "interrupted",
        "prompts",
        "aggregate",
        "peer",
        "plots",
    ] {
        assert!(v.get(k).is_some(), "results.json lacks `{k}`");
    }
    for k in ["name", "path", "identity", "arch", "n_layers", "vocab_size"] {
        assert!(v["model"].get(k).is_some(), "model lacks `{k}`");
    }
    for k in ["cpu", "cores", "threads", "isa", "os"] {
        assert!(v["machine"].get(k).is_some(), "machine lacks `{k}`");
    }
    for k in [
        "datasets",
        "methods",
        "max_new_tokens",
        "temperature",
        "repeats",
        "warmup",
        "per_category",
        "limit",
        "ctx_size",
        "items",
    ] {
        assert!(v["config"].get(k).is_some(), "config lacks `{k}`");
    }
    for p in v["prompts"].as_array().unwrap() {
        for k in [
            "dataset",
            "question_id",
            "category",
            "raw_category",
            "turn",
            "repeat",
            "method",
            "prompt_tokens",
            "prefilled_tokens",
            "new_tokens",
            "mat_tokens",
            "steps",
            "wall_s",
            "prefill_ms",
            "decode_ms",
            "mat",
            "drafted_tokens",
            "accepted_tokens",
            "accepted_per_depth",
            "draft_ms",
            "verify_ms",
            "stop",
            "check",
            "first_diff",
            "diff_margin",
        ] {
            assert!(p.get(k).is_some(), "prompt record lacks `{k}`");
        }
    }
    let agg = &v["aggregate"];
    for k in [
        "methods",
        "categories",
        "per_category",
        "overall",
        "peer",
        "peer_unmatched",
        "lossless",
    ] {
        assert!(agg.get(k).is_some(), "aggregate lacks `{k}`");
    }
    for c in agg["per_category"]
        .as_array()
        .unwrap()
        .iter()
        .chain(agg["overall"].as_array().unwrap())
    {
        for k in [
            "method",
            "category",
            "generations",
            "new_tokens",
            "mat_tokens",
            "steps",
            "seconds",
            "tok_s",
            "mat",
            "baseline_seconds",
            "matched_seconds",
            "speedup",
            "accepted_per_depth",
            "draft_ms",
            "verify_ms",
            "exact",
            "near_tie",
            "mismatch",
        ] {
            assert!(c.get(k).is_some(), "aggregate cell lacks `{k}`");
        }
    }
    for k in [
        "exact",
        "near_tie",
        "mismatch",
        "sampled",
        "unchecked",
        "mismatches",
    ] {
        assert!(agg["lossless"].get(k).is_some(), "lossless lacks `{k}`");
    }
}

fn read_json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    serde_json::from_str(&text).expect("results.json parses")
}

#[test]
fn writer_produces_documented_json_and_spec_bench_table() {
    let dir = temp_dir("complete");
    let w = write_results(&dir, &results(records(), true), false).unwrap();
    let v = read_json(&dir);
    check_json_fields(&v);
    assert_eq!(v["schema"], "treespec-bench/1");
    assert_eq!(v["prompts"].as_array().unwrap().len(), 9);
    assert_eq!(v["complete"], true);
    let md = std::fs::read_to_string(&w.markdown).unwrap();
    assert!(md.contains("| Method | Multi-turn Conversation | Translation | Code (MBPP) | #Mean Accepted Tokens | Tokens/s | Overall |"), "{md}");
    assert!(
        md.contains("| none (plain) | 1.00× | 1.00× | 1.00× |"),
        "{md}"
    );
    assert!(
        md.contains("| pld | 1.50× | 0.80× | 1.50× | 1.38 |"),
        "{md}"
    );
    assert!(md.contains("Best method overall: **pld** at 1.11×"), "{md}");
    assert!(md.contains("pld on translation (0.80×)"), "{md}");
    assert!(md.contains("c(8)/c(1) = 1.40"), "{md}");
    // pld's steps: 39 of 80 reached depth 1, no draft model row.
    assert!(md.contains("## Acceptance per depth"), "{md}");
    assert!(md.contains("| pld | 0.4"), "{md}");
    assert!(!md.contains("draft forwards/step"), "{md}");
    // Read back, the records aggregate to the same figures.
    let back = read_results(&w.json).unwrap();
    assert_eq!(back.records.len(), 9);
    assert_eq!(back.info.model.identity, "gguf:tiny");
    assert_eq!(
        aggregate(&back.records, &["none".into(), "pld".into()], None),
        aggregate(&records(), &["none".into(), "pld".into()], None)
    );
    std::fs::write(dir.join("other.json"), "{\"schema\": \"x\"}").unwrap();
    assert!(read_results(&dir.join("other.json")).is_err());
    std::fs::remove_file(dir.join("other.json")).unwrap();
    // No stray temporary files.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interrupted_run_still_writes_valid_partial_output() {
    let dir = temp_dir("partial");
    // Before anything ran, then mid-run (pld ran on an item plain did not reach).
    for recs in [Vec::new(), records()[..5].to_vec(), records()] {
        let w = write_results(&dir, &results(recs.clone(), false), true).unwrap();
        let v = read_json(&dir);
        check_json_fields(&v);
        assert_eq!(v["interrupted"], true);
        assert_eq!(v["complete"], false);
        assert_eq!(v["prompts"].as_array().unwrap().len(), recs.len());
        let md = std::fs::read_to_string(&w.markdown).unwrap();
        assert!(md.contains("partial: interrupted"), "{md}");
        assert!(md.contains("| Method |"), "{md}");
        // Plots are drawn when a font is available, and listed only if drawn.
        let listed = v["plots"].as_array().unwrap();
        assert_eq!(listed.len(), w.plots.len());
        for p in &w.plots {
            assert!(p.exists());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_forward_subcommand_still_parses() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_treespec"))
        .args(["bench", "forward", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--reps"));
    // The suite needs --dataset and --out.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_treespec"))
        .args(["bench", "-m", "smollm2-135m"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dataset"));
}

#[test]
fn end_to_end_on_smollm2() {
    common::model_path("smollm2-135m");
    let dir = temp_dir("e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let peer = dir.join("peer.json");
    std::fs::write(
        &peer,
        r#"{"name": "otherengine", "prompts": [{"question_id": 301, "tokens": 16, "seconds": 0.5}, {"question_id": 2, "turn": 0, "tokens": 16, "seconds": 0.25}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_treespec"))
        .args(["bench", "-m", "smollm2-135m", "--dataset"])
        .arg(fixture())
        .args([
            "--max-new-tokens",
            "16",
            "--no-curve",
            "--methods",
            "none,pld,hybrid",
            "--compare",
        ])
        .arg(&peer)
        .arg("--out")
        .arg(&dir)
        .env("TREESPEC_HOME", common::treespec_home())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "treespec bench failed: {stderr}");
    let v = read_json(&dir);
    check_json_fields(&v);
    assert_eq!(v["complete"], true);
    assert!(v["forward_curve"].is_null());
    // (2 turns + 1 + 1) × 3 methods.
    let prompts = v["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 12);
    for p in prompts {
        assert!(p["new_tokens"].as_u64().unwrap() <= 16);
        assert!(p["wall_s"].as_f64().unwrap() > 0.0);
        let check = p["check"].as_str().unwrap();
        if p["method"] == "none" {
            assert_eq!(check, "baseline");
        } else {
            assert!(check == "exact" || check == "near_tie", "{p}");
        }
    }
    // The second turn reused the first turn's cache.
    let t1 = prompts
        .iter()
        .find(|p| p["turn"] == 1 && p["method"] == "none")
        .unwrap();
    assert!(t1["prefilled_tokens"].as_u64().unwrap() < t1["prompt_tokens"].as_u64().unwrap());
    assert_eq!(v["aggregate"]["lossless"]["mismatch"], 0);
    assert_eq!(v["aggregate"]["overall"].as_array().unwrap().len(), 3);
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert_eq!(v["peer"]["name"], "otherengine");
    let peer_overall = v["aggregate"]["peer"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "overall")
        .expect("peer overall cell");
    assert_eq!(peer_overall["generations"], 2);
    assert!((peer_overall["tok_s"].as_f64().unwrap() - 32.0 / 0.75).abs() < 1e-9);
    for m in [
        "none (plain)",
        "| pld |",
        "| hybrid |",
        "| otherengine (peer) |",
    ] {
        assert!(md.contains(m), "{md}");
    }
    for p in v["plots"].as_array().unwrap() {
        assert!(dir.join(p.as_str().unwrap()).exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench forward` end to end: the documented JSON object on the last line,
/// llama.cpp's figures read from the shared peers file, and the per-stage
/// profile table.
#[test]
fn bench_forward_reports_curve_peers_and_profile() {
    common::model_path("smollm2-135m");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_treespec"))
        .args([
            "bench",
            "forward",
            "-m",
            "smollm2-135m",
            "--n",
            "1,2",
            "--reps",
            "1",
            "--ctx",
            "32",
            "--profile",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "model",
        "threads",
        "isa",
        "decode_tok_s",
        "curve",
        "read_bandwidth_gb_s",
    ] {
        assert!(!v[key].is_null(), "missing {key}: {last}");
    }
    let curve = v["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 2);
    assert_eq!(curve[1]["n"], 2);
    assert!(curve[0]["ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    if std::path::Path::new("../shared/peers.md").exists() {
        let peer = &v["llama_cpp"];
        assert!(peer["decode_tok_s"].as_f64().is_some(), "{last}");
        assert_eq!(peer["curve"][0]["n"], 1);
        assert!(stdout.contains("llama.cpp"));
    }
    // The profile: one row per stage, a column per N, stage times > 0 where
    // work happens.
    let row = |name: &str| -> Vec<f64> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{stdout}"));
        line[name.len()..]
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect()
    };
    for stage in [
        "q,k,v proj",
        "attention",
        "gate,up proj",
        "down proj",
        "lm head",
    ] {
        let r = row(stage);
        assert_eq!(r.len(), 2, "{stage}: {r:?}");
        assert!(r.iter().all(|&ms| ms > 0.0), "{stage}: {r:?}");
    }
}
