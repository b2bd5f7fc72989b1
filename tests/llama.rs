//! The Llama family (`peft_kernels::models::llama`: Llama with llama3 rope scaling, Qwen2 with q/k/v
//! biases and tied embeddings, Mistral sharded in bf16, a transformers-saved 4-bit Llama) against
//! transformers + PEFT fixtures (`tests/fixtures/gen_llama.py`), and the decoder tape ops
//! (`autograd::decoder`) against plain f64 math.

mod common;

use common::{check_fixture_grads, floats, ints};

use peft_kernels::autograd::decoder::{IGNORE, causal_lm_targets};
use peft_kernels::autograd::gradcheck::{GradCheckConfig, check_gradient};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::models::llama::{LlamaArch, LlamaConfig};
use peft_kernels::models::{
    self, CausalLmTokenizer, LlamaForCausalLM, Model, ModelLoadOptions, QuantizeOnLoad, TokenBatch,
};
use peft_kernels::nn::RopeScaling;
use peft_kernels::quant::QuantizedTensor;
use peft_kernels::{DType, Device, Result, Tensor};
use serde_json::json;
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(case)
}

fn io(case: &str) -> SafetensorsFile {
    SafetensorsFile::open(fixture(case).join("io.safetensors")).unwrap()
}

fn fixture_batch(io: &SafetensorsFile) -> TokenBatch {
    let (_, shape, _) = io.raw("input_ids").unwrap();
    let mask: Vec<Vec<u8>> = ints(io, "attention_mask")
        .chunks(shape[1])
        .map(|r| r.iter().map(|&m| m as u8).collect())
        .collect();
    let ids: Vec<Vec<u32>> = ints(io, "input_ids")
        .chunks(shape[1])
        .map(<[u32]>::to_vec)
        .collect();
    TokenBatch::from_rows(&ids, &mask, None).unwrap()
}

/// The logits rows of real (unpadded) tokens, from a `[batch*seq, vocab]` flat vector.
fn real_rows(logits: &[f32], mask: &[u8], vocab: usize) -> Vec<f32> {
    logits
        .chunks(vocab)
        .zip(mask)
        .filter(|(_, m)| **m == 1)
        .flat_map(|(r, _)| r.iter().copied())
        .collect()
}

fn causal_lm(dir: &Path) -> LlamaForCausalLM {
    models::from_pretrained_causal_lm(dir, &ModelLoadOptions::default()).unwrap()
}

fn config_of(case: &str) -> LlamaConfig {
    let text = std::fs::read_to_string(fixture(case).join("config.json")).unwrap();
    LlamaConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn configs_parse_with_transformers_defaults() {
    let l = config_of("llama");
    assert_eq!(l.arch, LlamaArch::Llama);
    assert_eq!(
        (l.num_attention_heads, l.num_key_value_heads, l.head_dim),
        (4, 2, 8)
    );
    assert!(!l.tie_word_embeddings && !l.qkv_bias && !l.o_bias && !l.mlp_bias);
    assert_eq!(
        l.rope_scaling,
        RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 8.0,
            original_max_position_embeddings: 64
        }
    );
    let q = config_of("qwen2");
    assert_eq!(q.arch, LlamaArch::Qwen2);
    assert!(q.tie_word_embeddings && q.qkv_bias && !q.o_bias);
    assert_eq!((q.head_dim, q.num_key_value_heads, q.rope_theta), (6, 1, 1e6));
    assert_eq!(q.sliding_window, None);
    let m = config_of("mistral");
    assert_eq!((m.head_dim, m.sliding_window), (10, Some(32)));
    // transformers 4 style: rope_theta at the top level and rope_scaling with "type".
    let v4 = json!({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2,
        "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 10, "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [5, 6]});
    let c = LlamaConfig::from_json(&v4).unwrap();
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (500000.0, RopeScaling::Linear { factor: 2.0 })
    );
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.eos_token_id),
        (8, 2, Some(5))
    );
    // Named errors.
    for (bad, needle) in [
        (
            json!({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 3}),
            "multiple of num_key_value_heads",
        ),
        (
            json!({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
            "dynamic",
        ),
        (
            json!({"model_type": "llama", "hidden_size": 15, "num_attention_heads": 3}),
            "head_dim",
        ),
        (json!({"model_type": "gpt2"}), "gpt2"),
        (json!({"model_type": "llama", "vocab_size": 0}), "vocab_size"),
    ] {
        let e = LlamaConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
}

#[test]
fn logits_and_loss_match_transformers() {
    for case in ["llama", "qwen2", "mistral"] {
        let io = io(case);
        let b = fixture_batch(&io);
        let m = causal_lm(&fixture(case));
        let vocab = m.config().vocab_size;
        let store = ParamStore::new();
        let got = m.logits(&store, &b).unwrap().to_vec_f32().unwrap();
        let want = floats(&io, "logits");
        let (g, w) = (
            real_rows(&got, &b.attention_mask, vocab),
            real_rows(&want, &b.attention_mask, vocab),
        );
        // 1e-4 relative, elementwise and to the largest logit (f32 sums in a different order).
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        common::assert_close(&g, &w, 1e-4, 1e-4 * scale, case);
        let (loss, n) = m.loss(&store, &b, None).unwrap();
        let want_loss = floats(&io, "loss")[0];
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
            "{case}: {loss} vs {want_loss}"
        );
        assert_eq!(n, 8 + 5 + 2, "{case}: counted tokens");
    }
}

#[test]
fn bare_model_and_dispatch() {
    let Model::Llama(m) = models::from_pretrained(fixture("qwen2"), &ModelLoadOptions::default()).unwrap()
    else {
        panic!("not a Llama model");
    };
    assert_eq!(m.module_prefix(), "");
    assert_eq!(m.linears().len(), 2 * 7);
    assert_eq!(m.linears()[0].name(), "layers.0.self_attn.q_proj");
    assert!(m.linears()[0].bias().is_some() && m.linears()[3].bias().is_none());
    let e = models::from_pretrained_causal_lm(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny"),
        &ModelLoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a causal LM"), "{e}");
}

#[test]
fn bf16_activations_stay_close() {
    let io = io("llama");
    let b = fixture_batch(&io);
    let opts = ModelLoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let m = models::from_pretrained_causal_lm(fixture("llama"), &opts).unwrap();
    let got = m.logits(&ParamStore::new(), &b).unwrap().to_vec_f32().unwrap();
    let want = floats(&io, "logits");
    let v = m.config().vocab_size;
    common::assert_close_scaled(
        &real_rows(&got, &b.attention_mask, v),
        &real_rows(&want, &b.attention_mask, v),
        0.08,
        "bf16",
    );
}

#[test]
fn transformers_4bit_checkpoint_logits_match() {
    let io = io("llama_nf4");
    let b = fixture_batch(&io);
    let m = causal_lm(&fixture("llama_nf4").join("nf4"));
    assert!(
        m.model()
            .linears()
            .iter()
            .all(|s| matches!(s.base(), peft_kernels::qmatmul::BaseWeight::Quantized(_)))
    );
    let got = m.logits(&ParamStore::new(), &b).unwrap().to_vec_f32().unwrap();
    let v = m.config().vocab_size;
    common::assert_close(
        &real_rows(&got, &b.attention_mask, v),
        &real_rows(&floats(&io, "nf4.logits"), &b.attention_mask, v),
        1e-4,
        1e-4,
        "nf4 logits",
    );
}

#[test]
fn quantize_on_load_selects_projections() {
    let io = io("llama");
    let b = fixture_batch(&io);
    let opts = ModelLoadOptions {
        quantize: Some(QuantizeOnLoad {
            targets: peft_kernels::io::peft::TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
            options: Default::default(),
            tiers: Default::default(),
        }),
        ..Default::default()
    };
    let m = models::from_pretrained_causal_lm(fixture("llama"), &opts).unwrap();
    let q: Vec<&str> = m
        .model()
        .linears()
        .into_iter()
        .filter(|s| matches!(s.base(), peft_kernels::qmatmul::BaseWeight::Quantized(_)))
        .map(|s| s.name())
        .collect();
    assert_eq!(
        q,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    // Every decoder linear to NF4-dq on load gives the dense model whose linear weights went through our
    // quantizer and back (the quantizer itself is checked against bitsandbytes in tests/nf4.rs).
    let opts = ModelLoadOptions {
        quantize: Some(QuantizeOnLoad::nf4_dq_all_linear()),
        ..Default::default()
    };
    let m = models::from_pretrained_causal_lm(fixture("llama"), &opts).unwrap();
    let got = m.logits(&ParamStore::new(), &b).unwrap().to_vec_f32().unwrap();
    let dst = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        dst.path().join("config.json"),
    )
    .unwrap();
    let f = SafetensorsFile::open(fixture("llama").join("model.safetensors")).unwrap();
    let entries: Vec<(String, TensorBytes<'static>)> = f
        .names()
        .iter()
        .map(|n| {
            let mut t = f.load(n, Device::Cpu).unwrap();
            if n.contains("_proj.") {
                let q = QuantizedTensor::quantize(&t, &Default::default()).unwrap();
                t = q.dequantize(DType::F32).unwrap();
            }
            let bytes: Vec<u8> = t
                .to_vec_f32()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let data = std::borrow::Cow::Owned(bytes);
            (
                n.clone(),
                TensorBytes {
                    dtype: safetensors::Dtype::F32,
                    shape: t.shape().to_vec(),
                    data,
                },
            )
        })
        .collect();
    write_safetensors(dst.path().join("model.safetensors"), &entries, None).unwrap();
    let want = causal_lm(dst.path())
        .logits(&ParamStore::new(), &b)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!(want != floats(&io, "logits"));
    common::assert_close(&got, &want, 1e-5, 1e-5, "nf4 on load");
}

#[test]
fn peft_adapters_give_peft_logits_and_gradients() {
    for case in ["llama", "qwen2"] {
        let io = io(case);
        let b = fixture_batch(&io);
        for kind in ["lora", "dora"] {
            let what = format!("{case}/{kind}");
            let mut store = ParamStore::new();
            let mut m = causal_lm(&fixture(case));
            m.load_adapter(fixture(case).join(kind), &mut store).unwrap();
            assert_eq!(m.model().adapter_layers().len(), 2 * 7, "{what}");
            let v = m.config().vocab_size;
            let mut tape = Tape::new();
            let logits = m.forward_t(&mut tape, &store, &b, None).unwrap();
            let got = tape.value(logits).unwrap().to_vec_f32().unwrap();
            let want = floats(&io, &format!("{kind}.logits"));
            common::assert_close(
                &real_rows(&got, &b.attention_mask, v),
                &real_rows(&want, &b.attention_mask, v),
                1e-4,
                1e-5,
                &what,
            );
            let loss = tape
                .causal_lm_loss(logits, &b.input_ids, &b.attention_mask, b.batch, b.seq, None)
                .unwrap();
            let want_loss = floats(&io, &format!("{kind}.loss"))[0];
            let l = tape.value(loss).unwrap().to_scalar().unwrap();
            assert!(
                (l - want_loss).abs() < 1e-5 * want_loss.max(1.0),
                "{what}: {l} vs {want_loss}"
            );
            let grads = tape.backward(loss).unwrap();
            let n = check_fixture_grads(&io, &format!("{kind}.grad."), &store, &grads, &what);
            assert_eq!(n, grads.len(), "{what}: every trainable parameter checked");
            assert!(n >= 2 * 7 * 2, "{what}");
        }
    }
}

#[test]
fn saved_adapter_reloads_with_the_same_logits() {
    use peft_kernels::io::peft::{AdapterConfig, InitLoraWeights, LoraConfig, MethodConfig, PeftAdapter};
    let b = fixture_batch(&io("llama"));
    for kind in ["lora", "dora"] {
        let peft = PeftAdapter::load(fixture("llama").join(kind), Device::Cpu).unwrap();
        let mut config: AdapterConfig = peft.config.clone();
        if let MethodConfig::Lora(LoraConfig {
            init_lora_weights, ..
        }) = &mut config.method
        {
            *init_lora_weights = InitLoraWeights::Bool(false); // B != 0
        }
        let mut store = ParamStore::new();
        let mut m = causal_lm(&fixture("llama"));
        let names = m.init_adapter(&config, &mut store, 5).unwrap();
        assert_eq!(names.len(), 14);
        let logits = m.logits(&store, &b).unwrap().to_vec_f32().unwrap();
        let d = tempfile::tempdir().unwrap();
        m.save_adapter(&config, &store, d.path()).unwrap();
        let mut store2 = ParamStore::new();
        let mut m2 = causal_lm(&fixture("llama"));
        m2.load_adapter(d.path(), &mut store2).unwrap();
        assert_eq!(
            logits,
            m2.logits(&store2, &b).unwrap().to_vec_f32().unwrap(),
            "{kind}"
        );
        if let Ok(out) = std::env::var("PEFT_KERNELS_WRITE_LLAMA_ROUNDTRIP") {
            let dst = Path::new(&out).join(kind);
            m.save_adapter(&config, &store, &dst).unwrap();
            let ids: Vec<u32> = logits.iter().map(|x| x.to_bits()).collect();
            std::fs::write(dst.join("our_logits.json"), serde_json::to_string(&ids).unwrap()).unwrap();
        }
    }
}

#[test]
fn training_lowers_the_loss() {
    use peft_kernels::io::peft::AdapterConfig;
    let b = fixture_batch(&io("llama"));
    let config = AdapterConfig::from_json_str(
        &json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": "all-linear", "lora_dropout": 0.0
        })
        .to_string(),
    )
    .unwrap();
    let mut store = ParamStore::new();
    let mut m = causal_lm(&fixture("llama"));
    assert_eq!(
        m.init_adapter(&config, &mut store, 1).unwrap().len(),
        14,
        "all-linear leaves lm_head out"
    );
    let mut opt = peft_kernels::optim::AdamW::new(peft_kernels::optim::AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    })
    .unwrap();
    let first = m.train_step(&mut store, &mut opt, &b, None, 0).unwrap();
    let mut last = first;
    for s in 1..15 {
        last = m.train_step(&mut store, &mut opt, &b, None, s).unwrap();
    }
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

/// Loss and sorted gradients of one training micro-step, and the bytes the forward keeps on the tape.
fn step_grads(
    m: &LlamaForCausalLM,
    store: &ParamStore,
    b: &TokenBatch,
    seed: u64,
) -> (f32, Vec<Vec<f32>>, usize) {
    let (loss, g) = m.loss_and_grads(store, b, None, seed).unwrap();
    let mut grads: Vec<_> = g
        .iter()
        .map(|(id, t)| (id.index(), t.to_vec_f32().unwrap()))
        .collect();
    grads.sort_by_key(|(i, _)| *i);
    let mut tape = Tape::new();
    m.forward_t(&mut tape, store, b, Some(seed)).unwrap();
    (
        loss,
        grads.into_iter().map(|(_, v)| v).collect(),
        tape.value_bytes(),
    )
}

#[test]
fn gradient_checkpointing_gives_identical_gradients_and_keeps_less() {
    use peft_kernels::io::peft::AdapterConfig;
    for (case, method) in [
        ("llama", "LORA"),
        ("qwen2", "LORA"),
        ("mistral", "LORA"),
        ("llama", "DORA"),
    ] {
        let b = fixture_batch(&io(case));
        let config = AdapterConfig::from_json_str(
            &json!({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                "target_modules": "all-linear", "lora_dropout": 0.2, "use_dora": method == "DORA"
            })
            .to_string(),
        )
        .unwrap();
        let mut store = ParamStore::new();
        let mut m = causal_lm(&fixture(case));
        m.init_adapter(&config, &mut store, 3).unwrap();
        // One step first so that B is not zero and every adapter parameter gets a gradient.
        let mut opt = peft_kernels::optim::AdamW::new(peft_kernels::optim::AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        })
        .unwrap();
        m.train_step(&mut store, &mut opt, &b, None, 7).unwrap();
        assert!(!m.model().gradient_checkpointing(), "off by default");
        let (l0, g0, bytes0) = step_grads(&m, &store, &b, 11);
        m.model_mut().set_gradient_checkpointing(true);
        let (l1, g1, bytes1) = step_grads(&m, &store, &b, 11);
        assert_eq!(g0.len(), m.param_ids().len(), "{case}: a gradient per parameter");
        assert!(
            g0.iter().all(|g| g.iter().any(|&x| x != 0.0)),
            "{case}: zero gradient"
        );
        assert_eq!(l0.to_bits(), l1.to_bits(), "{case} {method}: loss");
        assert_eq!(g0, g1, "{case} {method}: gradients differ with checkpointing");
        // Another seed gives other dropout masks (the recomputation must use the step's own).
        let (_, g2, _) = step_grads(&m, &store, &b, 12);
        assert_ne!(g1, g2, "{case}: dropout seed has no effect");
        assert!(
            bytes1 < bytes0,
            "{case}: checkpointed tape {bytes1} B, plain {bytes0} B"
        );
    }
}

#[test]
fn tokenizer_and_eval_loss_match_transformers() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("texts_expected.json")).unwrap()).unwrap();
    let tok = CausalLmTokenizer::from_file(fixture("tokenizer.json"), None).unwrap();
    let texts: Vec<String> = std::fs::read_to_string(fixture("texts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    for (t, w) in texts.iter().zip(&want_ids) {
        assert_eq!(&tok.encode(t, 512).unwrap(), w, "{t}");
    }
    // One right-padded batch gives transformers' per-text mean NLL, token-weighted.
    let m = causal_lm(&fixture("llama"));
    let b = tok.encode_batch(&texts, 512).unwrap();
    assert_eq!(b.input_ids[b.seq - 1], tok.pad_id(), "the first text is padded");
    let (loss, n) = m.loss(&ParamStore::new(), &b, None).unwrap();
    assert_eq!(n as u64, expected["tokens"].as_u64().unwrap());
    let want = expected["loss"].as_f64().unwrap() as f32;
    assert!((loss - want).abs() < 1e-5 * want, "{loss} vs {want}");
}

#[test]
fn bad_batches_and_checkpoints_are_errors() {
    let m = causal_lm(&fixture("mistral"));
    let store = ParamStore::new();
    let too_big = TokenBatch::from_rows(&[vec![1, 2, 41]], &[vec![1, 1, 1]], None).unwrap();
    assert!(
        m.logits(&store, &too_big)
            .unwrap_err()
            .to_string()
            .contains("vocab_size")
    );
    let long = TokenBatch::from_rows(&[vec![1; 33]], &[vec![1; 33]], None).unwrap();
    assert!(
        m.logits(&store, &long)
            .unwrap_err()
            .to_string()
            .contains("sliding window")
    );
    // Untied config without lm_head: a named missing tensor.
    let d = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2").join("config.json")).unwrap())
            .unwrap();
    cfg["tie_word_embeddings"] = json!(false);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("qwen2").join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    let e = models::from_pretrained_causal_lm(d.path(), &ModelLoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    // Llama config over Qwen2 weights: the q_proj biases are not expected, the sizes differ.
    cfg["model_type"] = json!("llama");
    cfg["tie_word_embeddings"] = json!(true);
    cfg["num_key_value_heads"] = json!(5);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = models::from_pretrained_causal_lm(d.path(), &ModelLoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("k_proj.weight"), "{e}");
}

// ------------------------------------------------------------------------------ tape ops

#[test]
fn causal_lm_targets_shift_and_mask() {
    // Row 0 right-padded (3 real), row 1 left-padded (2 real), row 2 full with a prompt mask.
    let ids = [5, 6, 7, 0, /**/ 0, 0, 8, 9, /**/ 1, 2, 3, 4];
    let mask = [1, 1, 1, 0, /**/ 0, 0, 1, 1, /**/ 1, 1, 1, 1];
    let lm = [1, 1, 1, 1, /**/ 1, 1, 1, 1, /**/ 0, 0, 1, 1];
    let t = causal_lm_targets(&ids, &mask, 3, 4, Some(&lm)).unwrap();
    let i = IGNORE;
    assert_eq!(t, [6, 7, i, i, /**/ i, i, 9, i, /**/ i, 3, 4, i]);
    assert!(causal_lm_targets(&ids, &mask, 3, 5, None).is_err());
}

fn causal_loss_matches_f64(dev: Device) -> Result<()> {
    let (batch, seq, vocab) = (2, 5, 7);
    let logits = Tensor::randn(&[batch * seq, vocab], 3.0, 11, DType::F32, Device::Cpu)?;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 5 % vocab) as u32).collect();
    let mask = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1];
    let lv = logits.to_vec_f32()?;
    // f64: mean over counted positions of logsumexp - logit[target].
    let (mut sum, mut n) = (0f64, 0);
    for b in 0..batch {
        for t in 0..seq - 1 {
            let (c, nx) = (b * seq + t, b * seq + t + 1);
            if mask[c] == 1 && mask[nx] == 1 {
                let row: Vec<f64> = lv[c * vocab..(c + 1) * vocab].iter().map(|&x| x as f64).collect();
                let mx = row.iter().cloned().fold(f64::MIN, f64::max);
                let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                sum += lse - row[ids[nx] as usize];
                n += 1;
            }
        }
    }
    let want = sum / n as f64;
    let f = |x: &Tensor| -> Result<f32> {
        let mut tape = Tape::new();
        let l = tape.leaf(x.to_device(dev)?);
        let loss = tape.causal_lm_loss(l, &ids, &mask, batch, seq, None)?;
        tape.value(loss)?.to_scalar()
    };
    let got = f(&logits)?;
    assert!((got as f64 - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
    // Gradient through a parameter.
    let mut store = ParamStore::new();
    let id = store.insert("logits", logits.to_device(dev)?)?;
    let mut tape = Tape::new();
    let l = tape.param(&store, id)?;
    let loss = tape.causal_lm_loss(l, &ids, &mask, batch, seq, None)?;
    let g = tape.backward(loss)?;
    let cfg = GradCheckConfig {
        eps: 1e-2,
        rtol: 2e-2,
        atol: 2e-4,
        ..Default::default()
    };
    check_gradient(
        "causal_lm_loss",
        f,
        &logits,
        &g.get(id).unwrap().to_device(Device::Cpu)?,
        &cfg,
    )?;
    Ok(())
}

/// The fused LM-head loss (`Tape::lm_head_causal_lm_loss`) against f64 math: loss and `dh`, with
/// padding and a loss mask, for a vocabulary that fits one chunk and one that needs several. A CPU f32
/// fast path: bf16 is an error.
#[test]
fn lm_head_loss_matches_f64() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, seq, hidden) = (2, 6, 5);
    let mask = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1];
    let loss_mask = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1];
    for vocab in [11usize, 300_007] {
        let h = Tensor::randn(&[batch * seq, hidden], 1.0, 5, DType::F32, Device::Cpu)?;
        let w = Tensor::randn(&[vocab, hidden], 0.7, 6, DType::F32, Device::Cpu)?;
        let ids: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 3) % vocab) as u32)
            .collect();
        let (hv, wv) = (h.to_vec_f32()?, w.to_vec_f32()?);
        let targets = causal_lm_targets(&ids, &mask, batch, seq, Some(&loss_mask))?;
        let counted: Vec<usize> = (0..batch * seq).filter(|&i| targets[i] != IGNORE).collect();
        assert_eq!(counted.len(), 7, "positions 0-2 and 6, 8, 9, 10 count");
        let nc = counted.len() as f64;
        let (mut sum, mut dh) = (0f64, vec![0f64; batch * seq * hidden]);
        for &r in &counted {
            let logits: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..hidden)
                        .map(|k| hv[r * hidden + k] as f64 * wv[v * hidden + k] as f64)
                        .sum()
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
            let t = targets[r] as usize;
            sum += mx + z.ln() - logits[t];
            for (v, l) in logits.iter().enumerate() {
                let p = (l - mx).exp() / z - if v == t { 1.0 } else { 0.0 };
                for k in 0..hidden {
                    dh[r * hidden + k] += p * wv[v * hidden + k] as f64 / nc;
                }
            }
        }
        let want = sum / nc;
        let mut store = ParamStore::new();
        let id = store.insert("h", h.to_device(dev)?)?;
        let mut tape = Tape::new();
        let hvar = tape.param(&store, id)?;
        let wd = w.to_device(dev)?;
        let loss = tape.lm_head_causal_lm_loss(hvar, &wd, &ids, &mask, batch, seq, Some(&loss_mask))?;
        let got = tape.value(loss)?.to_scalar()? as f64;
        assert!(
            (got - want).abs() < 1e-5 * want.abs(),
            "vocab {vocab}: loss {got} vs {want}"
        );
        let g = tape.backward(loss)?.get(id).unwrap().to_vec_f32()?;
        for (i, (&a, &b)) in g.iter().zip(&dh).enumerate() {
            assert!(
                (a as f64 - b).abs() < 1e-5 + 1e-4 * b.abs(),
                "vocab {vocab}: dh[{i}] {a} vs {b}"
            );
        }
        let rows_without: Vec<usize> = (0..batch * seq).filter(|i| !counted.contains(i)).collect();
        assert!(
            rows_without
                .iter()
                .all(|&r| g[r * hidden..(r + 1) * hidden].iter().all(|&x| x == 0.0))
        );
        // Evaluation (no gradient) gives the same loss; nothing counting gives 0.
        let mut tape = Tape::new();
        let hl = tape.leaf(h.to_device(dev)?);
        let l = tape.lm_head_causal_lm_loss(hl, &wd, &ids, &mask, batch, seq, Some(&loss_mask))?;
        assert_eq!(tape.value(l)?.to_scalar()? as f64, got);
        let l = tape.lm_head_causal_lm_loss(hl, &wd, &ids, &[0; 12], batch, seq, None)?;
        assert_eq!(tape.value(l)?.to_scalar()?, 0.0);
        // A target outside the vocabulary and a wrong weight width are errors.
        let hb = tape.leaf(h.to_dtype(DType::BF16)?);
        let wb = w.to_dtype(DType::BF16)?;
        assert!(
            tape.lm_head_causal_lm_loss(hb, &wb, &ids, &mask, batch, seq, None)
                .is_err()
        );
        for bad in [[vocab, hidden + 1], [2, hidden]] {
            let wb = Tensor::zeros(&bad, DType::F32, dev)?;
            assert!(
                tape.lm_head_causal_lm_loss(hl, &wb, &ids, &mask, batch, seq, None)
                    .is_err()
            );
        }
    }
    Ok(())
}

fn silu_mul_matches_f64(dev: Device) -> Result<()> {
    let g = Tensor::randn(&[5, 9], 2.0, 3, DType::F32, Device::Cpu)?;
    let u = Tensor::randn(&[5, 9], 1.5, 4, DType::F32, Device::Cpu)?;
    let (gv, uv) = (g.to_vec_f32()?, u.to_vec_f32()?);
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let want: Vec<f32> = gv
        .iter()
        .zip(&uv)
        .map(|(&a, &b)| (silu(a as f64) * b as f64) as f32)
        .collect();
    let mut store = ParamStore::new();
    let (gi, ui) = (
        store.insert("g", g.to_device(dev)?)?,
        store.insert("u", u.to_device(dev)?)?,
    );
    let mut tape = Tape::new();
    let (gvar, uvar) = (tape.param(&store, gi)?, tape.param(&store, ui)?);
    let y = tape.silu_mul(gvar, uvar)?;
    common::assert_close(&tape.value(y)?.to_vec_f32()?, &want, 1e-5, 1e-6, "silu_mul");
    // loss = sum(y * w) for a fixed w: dg = w·u·silu'(g), du = w·silu(g).
    let w = Tensor::randn(&[5, 9], 1.0, 5, DType::F32, Device::Cpu)?;
    let grads = tape.backward_with(y, w.to_device(dev)?)?;
    let wv = w.to_vec_f32()?;
    let dsilu = |x: f64| {
        let s = 1.0 / (1.0 + (-x).exp());
        s * (1.0 + x * (1.0 - s))
    };
    let dg: Vec<f32> = (0..45)
        .map(|i| (wv[i] as f64 * uv[i] as f64 * dsilu(gv[i] as f64)) as f32)
        .collect();
    let du: Vec<f32> = (0..45)
        .map(|i| (wv[i] as f64 * silu(gv[i] as f64)) as f32)
        .collect();
    common::assert_close(&grads.get(gi).unwrap().to_vec_f32()?, &dg, 1e-5, 1e-6, "dgate");
    common::assert_close(&grads.get(ui).unwrap().to_vec_f32()?, &du, 1e-5, 1e-6, "dup");
    Ok(())
}

device_test!(causal_loss_matches_f64, silu_mul_matches_f64);

#[test]
fn sequence_classification_matches_transformers_and_peft() {
    for case in ["llama", "qwen2"] {
        let io = io(case);
        let b = fixture_batch(&io);
        let labels = ints(&io, "cls.labels");
        let dir = fixture(case).join("seq_cls");
        let mut store = ParamStore::new();
        let m =
            models::from_pretrained_llama_seq_cls(&dir, &ModelLoadOptions::default(), &mut store, 0).unwrap();
        let got = m.logits(&store, &b).unwrap().to_vec_f32().unwrap();
        common::assert_close(&got, &floats(&io, "cls.logits"), 1e-4, 1e-5, case);
        // With a PEFT SEQ_CLS LoRA adapter (score in modules_to_save): logits, loss, every gradient.
        let mut store = ParamStore::new();
        let mut m =
            models::from_pretrained_llama_seq_cls(&dir, &ModelLoadOptions::default(), &mut store, 0).unwrap();
        m.load_adapter(fixture(case).join("cls_lora"), &mut store)
            .unwrap();
        let mut tape = Tape::new();
        let logits = m.forward_t(&mut tape, &store, &b, None).unwrap();
        let got = tape.value(logits).unwrap().to_vec_f32().unwrap();
        common::assert_close(&got, &floats(&io, "cls_lora.logits"), 1e-4, 1e-5, case);
        let loss = tape.cross_entropy(logits, &labels).unwrap();
        let want = floats(&io, "cls_lora.loss")[0];
        assert!((tape.value(loss).unwrap().to_scalar().unwrap() - want).abs() < 1e-5 * want.max(1.0));
        let grads = tape.backward(loss).unwrap();
        let n = check_fixture_grads(&io, "cls_lora.grad.", &store, &grads, case);
        assert_eq!((n, grads.len()), (2 * 7 * 2 + 1, n), "{case}");
        // Saved by us, loaded by us: the same logits (score head included).
        let d = tempfile::tempdir().unwrap();
        let peft =
            peft_kernels::io::peft::PeftAdapter::load(fixture(case).join("cls_lora"), Device::Cpu).unwrap();
        m.save_adapter(&peft.config, &store, d.path()).unwrap();
        let mut store2 = ParamStore::new();
        let mut m2 =
            models::from_pretrained_llama_seq_cls(&dir, &ModelLoadOptions::default(), &mut store2, 9)
                .unwrap();
        m2.load_adapter(d.path(), &mut store2).unwrap();
        assert_eq!(
            m.logits(&store, &b).unwrap().to_vec_f32().unwrap(),
            m2.logits(&store2, &b).unwrap().to_vec_f32().unwrap()
        );
    }
}

#[test]
fn last_token_rows_follow_transformers() {
    use peft_kernels::models::llama::seq_cls::last_token_rows;
    let b = TokenBatch::from_rows(
        &[vec![5, 6, 3, 3], vec![3, 3, 7, 8], vec![3, 3, 3, 3]],
        &[vec![1; 4], vec![1; 4], vec![1; 4]],
        None,
    )
    .unwrap();
    assert_eq!(last_token_rows(&b, Some(3)).unwrap(), [1, 7, 8]);
    assert!(last_token_rows(&b, None).is_err());
}

// ------------------------------------------------------------------------------ CLI

fn peftk(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peftk"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "peftk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cli_causal_lm_finetune_and_eval() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(fixture("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let texts = fixture("texts.jsonl");
    let (m, t) = (model.to_str().unwrap(), texts.to_str().unwrap());
    // No training step: LoRA's B starts at 0, so eval gives the base model's mean token NLL, which
    // must be transformers' on the same texts.
    let out0 = d.path().join("out0");
    let o0 = out0.to_str().unwrap();
    peftk(&[
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        m,
        "--data",
        t,
        "--test",
        t,
        "--epochs",
        "0",
        "--quantize",
        "none",
        "--out",
        o0,
        "--quiet",
    ]);
    let adapter = out0.join("adapter");
    let line = peftk(&[
        "eval",
        "--task",
        "causal-lm",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        t,
        "--quantize",
        "none",
        "--json",
    ]);
    let got: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("texts_expected.json")).unwrap()).unwrap();
    assert_eq!(got["n"], 5);
    assert_eq!(got["tokens"], want["tokens"]);
    let (gl, wl) = (got["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap());
    assert!((gl - wl).abs() < 1e-5 * wl, "{gl} vs {wl}");
    assert!((got["perplexity"].as_f64().unwrap() - wl.exp()).abs() < 1e-4 * wl.exp());
    // QLoRA (the default NF4) for a few epochs: the training loss falls, metrics per epoch, an adapter.
    let out1 = d.path().join("out1");
    peftk(&[
        "finetune",
        "--task",
        "causal-lm",
        "--model",
        m,
        "--data",
        t,
        "--split",
        "0.2",
        "--epochs",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "0.01",
        "--dropout",
        "0",
        "--out",
        out1.to_str().unwrap(),
        "--quiet",
    ]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out1.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let (first, last) = (
        lines[0]["loss"].as_f64().unwrap(),
        lines[3]["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "train loss {first} -> {last}");
    assert!(lines[3]["test_perplexity"].as_f64().unwrap().is_finite());
    let cfg = std::fs::read_to_string(out1.join("adapter/adapter_config.json")).unwrap();
    assert!(cfg.contains("CAUSAL_LM") && cfg.contains("down_proj"), "{cfg}");
}

#[test]
fn cli_causal_lm_resume_continues_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(fixture("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let texts = fixture("texts.jsonl");
    let (m, t) = (model.to_str().unwrap(), texts.to_str().unwrap());
    // 4 training texts, micro-batches of 1, 2 per optimizer step: 2 steps per epoch, 4 in all, with
    // the 8-bit optimizer and a cosine schedule (the seq-cls loop's optimizer flags).
    let run = |out: &Path, accum: &str, extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--task",
            "causal-lm",
            "--model",
            m,
            "--data",
            t,
            "--split",
            "0.2",
            "--epochs",
            "2",
            "--batch-size",
            "1",
            "--grad-accum",
            accum,
            "--optim",
            "adamw8bit",
            "--schedule",
            "cosine",
            "--warmup",
            "1",
            "--lr",
            "0.01",
            "--quantize",
            "none",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        peftk(&args)
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run(&a, "2", &[]);
    run(&b, "2", &["--stop-after-steps", "1"]);
    let ck = b.join("checkpoint");
    assert!(
        ck.join("params.safetensors").exists(),
        "no checkpoint after the stop"
    );
    let stopped = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert_eq!(stopped.lines().count(), 1, "one metrics line at the stop");
    run(&b, "2", &["--resume", ck.to_str().unwrap()]);
    let read = |p: &Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        read(&a) == read(&b),
        "resumed adapter differs from the uninterrupted run"
    );
    let last = |p: &Path| {
        let s = std::fs::read_to_string(p.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(s.lines().last().unwrap()).unwrap();
        (v["step"].clone(), v["loss"].clone(), v["test_loss"].clone())
    };
    assert_eq!(last(&a), last(&b));
    assert_eq!(last(&a).0, 4, "2 epochs of 2 optimizer steps");
    // Gradient accumulation changes the run: 1 micro-batch per step gives another adapter.
    let c = d.path().join("c");
    run(&c, "1", &[]);
    assert!(read(&a) != read(&c), "--grad-accum has no effect");
}

/// `Algo::Bf16` (the frozen products, decoder linears and `lm_head`, with operands rounded to bf16 and
/// f32 accumulation) on the tiny Llama: logits and LoRA gradients stay close to the f32 path, and the
/// default load options keep the f32 path (whose 1e-4 parity with transformers the tests above hold).
///
/// Tolerance: each bf16 rounding is a relative error ≤ 2^-9, so a product of two rounded operands is
/// off by ≤ ~2^-8 ≈ 0.4% of |x||w|; the errors compound through the two layers, the head and the
/// backward chain (every `dy·W` of the chain is bf16 too), and this tiny model (hidden 32) sums few
/// terms, so cancellations are large relative to the result. Measured (printed): logits ≤ 1.5%, LoRA
/// gradients ≤ 4.4% of each tensor's largest magnitude; the bound is 8% (the bf16-activations test
/// above uses the same), while a dropped or doubled term would be off by O(100%).
#[test]
fn bf16_compute_stays_close_to_f32_and_is_opt_in() {
    use peft_kernels::io::peft::AdapterConfig;
    use peft_kernels::qmatmul::Algo;
    assert_eq!(ModelLoadOptions::default().algo, Algo::Auto, "f32 by default");
    let b = fixture_batch(&io("llama"));
    assert!(
        b.attention_mask.len() > 16,
        "the bf16 path needs the batch (> 16 token) path"
    );
    let config = AdapterConfig::from_json_str(
        &json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": "all-linear", "lora_dropout": 0.0, "init_lora_weights": false
        })
        .to_string(),
    )
    .unwrap();
    let load = |algo: Algo, store: &mut ParamStore| {
        let opts = ModelLoadOptions {
            algo,
            ..Default::default()
        };
        let mut m = models::from_pretrained_causal_lm(fixture("llama"), &opts).unwrap();
        m.init_adapter(&config, store, 3).unwrap();
        m
    };
    let mut store = ParamStore::new();
    let m32 = load(Algo::Auto, &mut store);
    let m16 = load(Algo::Bf16, &mut ParamStore::new());
    assert_eq!(m32.param_ids(), m16.param_ids(), "same adapter parameters");
    let v = m32.config().vocab_size;
    let l32 = m32.logits(&store, &b).unwrap().to_vec_f32().unwrap();
    let l16 = m16.logits(&store, &b).unwrap().to_vec_f32().unwrap();
    let (l32, l16) = (
        real_rows(&l32, &b.attention_mask, v),
        real_rows(&l16, &b.attention_mask, v),
    );
    assert_ne!(l32, l16, "Algo::Bf16 did not change the frozen products");
    let err = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    eprintln!(
        "bf16 compute: logits max error {:.2e} of the largest",
        err(&l16, &l32)
    );
    common::assert_close_scaled(&l16, &l32, 0.08, "bf16 logits");
    let (loss32, g32, _) = step_grads(&m32, &store, &b, 5);
    let (loss16, g16, _) = step_grads(&m16, &store, &b, 5);
    assert!(
        (loss16 - loss32).abs() <= 0.01 * loss32.abs(),
        "loss {loss16} vs {loss32}"
    );
    assert_eq!(g32.len(), g16.len());
    for (i, (a, w)) in g16.iter().zip(&g32).enumerate() {
        assert!(w.iter().any(|&x| x != 0.0), "gradient {i} is zero");
        eprintln!(
            "bf16 compute: gradient {i} max error {:.2e} of the largest",
            err(a, w)
        );
        common::assert_close_scaled(a, w, 0.08, &format!("bf16 gradient {i}"));
    }
}
