//! The llama.cpp peer adapter reads llama-server's answers: a recorded
//! response gives its timings and draft counts; a malformed one is an error,
//! never a row with a made-up speed. (No llama.cpp needed.)

use treespec::bench::llama_server::{parse_completion, DraftCounts, PeerResponseError};

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama_server")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn parses_a_recorded_speculative_completion() {
    let c = parse_completion(&fixture("completion_ngram_simple.json")).unwrap();
    assert!(c.text.starts_with(" apple, banana, cherry"), "{:?}", c.text);
    assert_eq!(c.predicted_n, 40);
    assert_eq!(c.prompt_n, 43);
    assert!((c.predicted_ms - 4811.702).abs() < 1e-9);
    assert!((c.prompt_ms - 1188.758).abs() < 1e-9);
    assert!((c.tok_s() - 40.0 * 1000.0 / 4811.702).abs() < 1e-9);
    assert_eq!(
        c.draft,
        Some(DraftCounts {
            drafted: 22,
            accepted: 4
        })
    );
    assert!((c.acceptance().unwrap() - 4.0 / 22.0).abs() < 1e-12);
    assert_eq!(c.stop.as_deref(), Some("limit"));
}

#[test]
fn parses_a_recorded_plain_chat_completion() {
    let c = parse_completion(&fixture("chat_plain.json")).unwrap();
    assert!(
        c.text.starts_with("A hash map is a data structure"),
        "{:?}",
        c.text
    );
    assert_eq!(c.predicted_n, 16);
    assert_eq!(c.prompt_n, 36);
    assert_eq!(c.draft, None);
    assert_eq!(c.acceptance(), None);
    assert!((c.tok_s() - 16.0 * 1000.0 / 1112.819).abs() < 1e-9);
    assert_eq!(c.stop.as_deref(), Some("length"));
}

#[test]
fn malformed_responses_are_errors() {
    let good: serde_json::Value =
        serde_json::from_str(&fixture("completion_ngram_simple.json")).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        parse_completion(&v.to_string())
    };
    assert!(matches!(
        parse_completion("{\"content\": \"x\", \"timings\": {"),
        Err(PeerResponseError::NotJson(_))
    ));
    assert_eq!(
        with(&|v| {
            v.as_object_mut().unwrap().remove("timings");
        }),
        Err(PeerResponseError::NoTimings)
    );
    assert_eq!(
        with(&|v| {
            v.as_object_mut().unwrap().remove("content");
        }),
        Err(PeerResponseError::NoText)
    );
    assert!(matches!(
        with(&|v| v["timings"]["predicted_ms"] = serde_json::json!(-3.0)),
        Err(PeerResponseError::BadTiming {
            field: "predicted_ms",
            ..
        })
    ));
    assert!(matches!(
        with(&|v| v["timings"]["predicted_n"] = serde_json::json!("twenty")),
        Err(PeerResponseError::BadTiming {
            field: "predicted_n",
            ..
        })
    ));
    assert!(matches!(
        with(&|v| {
            v["timings"].as_object_mut().unwrap().remove("predicted_ms");
        }),
        Err(PeerResponseError::BadTiming {
            field: "predicted_ms",
            ..
        })
    ));
    assert_eq!(
        with(&|v| v["timings"]["draft_n_accepted"] = serde_json::json!(23)),
        Err(PeerResponseError::AcceptedOverDrafted {
            drafted: 22,
            accepted: 23
        })
    );
    assert_eq!(
        with(&|v| v["tokens_predicted"] = serde_json::json!(39)),
        Err(PeerResponseError::CountMismatch {
            timings: 40,
            reported: 39
        })
    );
    // Generated ids (`return_tokens`): kept when they account for the
    // decoded tokens (the end-of-generation token may be left out), refused
    // when they do not.
    let ids: Vec<u32> = (0..40).collect();
    let c = with(&|v| v["tokens"] = serde_json::json!(ids)).unwrap();
    assert_eq!(c.tokens.as_deref(), Some(&ids[..]));
    assert_eq!(
        with(&|v| v["tokens"] = serde_json::json!(ids[..39]))
            .unwrap()
            .tokens
            .map(|t| t.len()),
        Some(39)
    );
    assert_eq!(
        with(&|v| v["tokens"] = serde_json::json!(ids[..30])),
        Err(PeerResponseError::TokenCountMismatch {
            ids: 30,
            decoded: 40
        })
    );
    assert!(matches!(
        with(&|v| v["tokens"] = serde_json::json!(["a"])),
        Err(PeerResponseError::NotJson(_))
    ));
    let err = parse_completion(
        r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#,
    );
    assert_eq!(
        err,
        Err(PeerResponseError::ServerError(
            "the request exceeds the available context size".into()
        ))
    );
}

/// The untimed margin probe (`n_probs: 2`): each token's top-2 margin, from
/// llama-server's `top_logprobs`; a malformed list is an error, not a margin.
#[test]
fn parses_top2_margins_and_refuses_malformed_ones() {
    let body = fixture("completion_plain_n_probs.json");
    let c = parse_completion(&body).unwrap();
    assert_eq!(
        c.tokens.as_deref(),
        Some(&[25870, 317, 198, 504, 2365, 6354][..])
    );
    let m = c.top2_margins.expect("margins");
    assert_eq!(m.len(), 6);
    // Token 0: logprobs -1.8267 (" cob") and -2.4417 (" fox").
    let want = (-1.8266957998275757f64).exp() - (-2.4417243003845215f64).exp();
    assert!((m[0] as f64 - want).abs() < 1e-6, "{}", m[0]);
    assert!(m.iter().all(|&x| (0.0..=1.0).contains(&x)));
    // Without n_probs there are none.
    assert_eq!(
        parse_completion(&fixture("completion_ngram_simple.json"))
            .unwrap()
            .top2_margins,
        None
    );
    let good: serde_json::Value = serde_json::from_str(&body).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        parse_completion(&v.to_string())
    };
    // Post-sampling form (`top_probs` with `prob`) reads the same way.
    let post = with(&|v| {
        let e = &mut v["completion_probabilities"][0];
        e.as_object_mut().unwrap().remove("top_logprobs");
        e["top_probs"] = serde_json::json!([{"id": 1, "prob": 0.7}, {"id": 2, "prob": 0.2}]);
    })
    .unwrap();
    assert!((post.top2_margins.unwrap()[0] - 0.5).abs() < 1e-6);
    for (what, f) in [
        (
            "unsorted",
            &(|v: &mut serde_json::Value| {
                v["completion_probabilities"][1]["top_logprobs"][1]["logprob"] =
                    serde_json::json!(-0.01)
            }) as &dyn Fn(&mut serde_json::Value),
        ),
        ("no list", &|v: &mut serde_json::Value| {
            v["completion_probabilities"][2]
                .as_object_mut()
                .unwrap()
                .remove("top_logprobs");
        }),
        ("not a number", &|v: &mut serde_json::Value| {
            v["completion_probabilities"][0]["top_logprobs"][0]["logprob"] =
                serde_json::json!("high")
        }),
        ("above one", &|v: &mut serde_json::Value| {
            v["completion_probabilities"][0]["top_logprobs"][0]["logprob"] = serde_json::json!(0.5)
        }),
        ("empty", &|v: &mut serde_json::Value| {
            v["completion_probabilities"][3]["top_logprobs"] = serde_json::json!([])
        }),
    ] {
        assert!(
            matches!(with(f), Err(PeerResponseError::BadProbabilities { .. })),
            "{what}: {:?}",
            with(f)
        );
    }
}
