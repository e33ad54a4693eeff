//! Loading a Hugging Face directory (config.json + *.safetensors +
//! tokenizer.json). The directory is made from SmolLM2's GGUF: weights
//! dequantized (q/k rows un-permuted back to HF's rotate-half layout), so the
//! HF path must agree with the GGUF path up to quantization noise.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use treespec::model::{LogitRows, Model};
use treespec::sampling::{argmax, top2_margin};

fn write_hf_dir(dir: &std::path::Path) {
    let path = common::model_path("smollm2-135m");
    let mut f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let u = |k: &str| ct.metadata[k].to_u32().unwrap() as usize;
    let (layers, hidden, heads, kv) = (
        u("llama.block_count"),
        u("llama.embedding_length"),
        u("llama.attention.head_count"),
        u("llama.attention.head_count_kv"),
    );
    let hd = hidden / heads;
    let dev = Device::Cpu;
    let mut get = |name: &str| -> Tensor {
        ct.tensor(&mut f, name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    // GGUF llama q/k rows are permuted so rotary pairs are adjacent; undo it.
    let unpermute = |t: Tensor, n_head: usize| -> Tensor {
        let dim = t.dims()[1];
        t.reshape((n_head, hd / 2, 2, dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((n_head * hd, dim))
            .unwrap()
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    w.insert("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let b = format!("blk.{i}");
        let q = unpermute(get(&format!("{b}.attn_q.weight")), heads);
        let k = unpermute(get(&format!("{b}.attn_k.weight")), kv);
        w.insert(format!("{p}.self_attn.q_proj.weight"), q);
        w.insert(format!("{p}.self_attn.k_proj.weight"), k);
        for (hf, gg) in [
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ] {
            w.insert(format!("{p}.{hf}.weight"), get(&format!("{b}.{gg}.weight")));
        }
    }
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": u("llama.feed_forward_length"),
        "vocab_size": 49152,
        "max_position_embeddings": u("llama.context_length"),
        "rms_norm_eps": ct.metadata["llama.attention.layer_norm_rms_epsilon"].to_f32().unwrap(),
        "rope_theta": ct.metadata["llama.rope.freq_base"].to_f32().unwrap(),
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    common::write_smollm2_hf_tokenizer(dir);
}

fn forced(model: &Model, seq: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.decoder.new_cache(seq.len() + 1);
    let pos: Vec<usize> = (0..seq.len()).collect();
    let par: Vec<Option<usize>> = (0..seq.len()).map(|i| i.checked_sub(1)).collect();
    let l = model
        .decoder
        .forward(&mut cache, seq, &pos, &par, LogitRows::All)
        .unwrap();
    (0..l.rows).map(|r| l.row(r).to_vec()).collect()
}

#[test]
fn hf_directory_agrees_with_gguf() {
    let dir = std::env::temp_dir().join(format!("treespec-hf-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_hf_dir(&dir);
    let hf = Model::load(&dir).expect("HF directory loads");
    let gguf = Model::load(&common::model_path("smollm2-135m")).unwrap();
    assert_eq!(hf.config().n_layers, gguf.config().n_layers);

    let g = common::golden("smollm2-135m")
        .into_iter()
        .find(|g| g["kind"] == "generate")
        .unwrap();
    let prompt = common::ids(&g["prompt_ids"]);
    assert_eq!(
        hf.tokenizer
            .encode(g["prompt"].as_str().unwrap(), true)
            .unwrap(),
        prompt
    );
    let mut seq = prompt.clone();
    seq.extend(common::ids(&g["tokens"]).iter().take(24));
    let a = forced(&hf, &seq);
    let b = forced(&gguf, &seq);
    let mut agree = 0;
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate().skip(prompt.len() - 1) {
        if argmax(ra) == argmax(rb) {
            agree += 1;
        } else {
            assert!(
                top2_margin(rb) < 0.1,
                "position {i}: HF and GGUF disagree with a clear margin"
            );
        }
    }
    println!(
        "HF vs GGUF: argmax agrees at {agree} of {} generated positions",
        a.len() - prompt.len() + 1
    );
    assert!(agree * 10 >= (a.len() - prompt.len() + 1) * 8);
    std::fs::remove_dir_all(&dir).ok();

    // A broken directory gives a clear error naming what is wrong.
    let bad = std::env::temp_dir().join(format!("treespec-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("config.json"),
        "{\"architectures\": [\"MambaForCausalLM\"]}",
    )
    .unwrap();
    let e = Model::load(&bad).err().expect("must fail").to_string();
    assert!(e.contains("unsupported architecture"), "{e}");
    std::fs::remove_dir_all(&bad).ok();
}
