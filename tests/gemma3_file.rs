//! The real Gemma 3 file (`treespec pull gemma3-270m`): its SentencePiece
//! vocabulary (`tokenizer.ggml.model = llama`, no space prefix, byte
//! fallback) encodes as llama.cpp encodes it, and its window pattern and
//! RoPE bases are read as llama.cpp reads them. The maths of the
//! architecture is checked against candle-transformers in
//! tests/arch_reference.rs; greedy losslessness on prompts longer than the
//! window in tests/lossless.rs.

mod common;

use treespec::model::Model;

#[test]
fn gemma3_270m_loads_with_its_window_pattern_and_tokenizes_as_llama_cpp() {
    let model = Model::load(&common::model_path("gemma3-270m")).unwrap();
    let c = model.config();
    assert_eq!(c.arch.name(), "gemma3");
    assert_eq!((c.n_layers, c.hidden, c.head_dim), (18, 640, 256));
    assert_eq!(c.sliding_window, Some(512));
    // Layers 5, 11 and 17 are global.
    let global: Vec<usize> = (0..18).filter(|&l| c.window_of(l).is_none()).collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!((c.rope_theta, c.rope_theta_local), (1e6, Some(10_000.0)));
    assert_eq!(
        c.context_length, 32768,
        "the window does not cap the context"
    );
    // Ids from llama.cpp's llama-server `/tokenize` (add_special) on the
    // same file, built by scripts/peers/llama_cpp.sh.
    let cases: [(&str, &[u32]); 2] = [
        ("The capital of France is", &[2, 818, 5279, 529, 7001, 563]),
        (
            "def fill(text):\n    \"\"\"Wrap café 日本 🙂\"\"\"\n\treturn  x",
            &[
                2, 2063, 5727, 236769, 1005, 1473, 107, 140, 12234, 47352, 33443, 33375, 57235,
                12234, 107, 255968, 2060, 138, 236781,
            ],
        ),
    ];
    for (text, want) in cases {
        let mut ids: Vec<u32> = model.tokenizer.bos_to_add().into_iter().collect();
        ids.extend(model.tokenizer.encode(text, true).unwrap());
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(model.tokenizer.decode(&ids[1..]).unwrap(), text);
    }
}
