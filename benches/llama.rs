//! Criterion group `llama`: one causal-LM training step (forward, shifted next-token loss, backward,
//! AdamW) of a randomly initialized Llama-shaped decoder, LoRA r = 16 (alpha 32) on every projection
//! (q/k/v/o/gate/up/down), f32 activations. Cases: `lora` (dense f32 base) and `qlora` (every projection
//! NF4 with double quantization, blocksize 64, quantized on load) and `lora_gc` (`lora` with gradient
//! checkpointing: each layer's activations are recomputed in backward), and `lora_bf16` / `qlora_bf16`
//! (the same with `Algo::Bf16`: the frozen products, decoder linears and `lm_head`, in bf16 compute with
//! f32 accumulation; LoRA, attention, norms and the loss stay f32). Each case first prints the bytes its
//! training forward keeps on the tape.
//!
//! Group `llama_gemm`: the frozen forward product `x·Wᵀ` alone at the step's shapes (`[256, 1024]` times
//! `W [2816, 1024]` and the `[32000, 1024]` LM head), f32 (`auto`) against bf16 compute (`bf16`).
//!
//! The peer, transformers + PEFT on the same model and batch: `benches/peers/llama_step.py`.
//!
//! Shapes: by default a small decoder that fits a short run on two CPU cores (hidden 256, 2 layers, 8
//! query heads and 2 kv heads of 32, intermediate 688, vocab 2048, batch 2 x seq 128).
//! `PEFT_KERNELS_LLAMA_BENCH=full` takes issue 16's shape (hidden 1024, 8 layers, GQA 16:4 of 64,
//! intermediate 2816, vocab 32000, batch 1 x seq 256).
//!
//! Run: `cargo bench --bench llama`.

use criterion::{Criterion, criterion_group, criterion_main};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::io::peft::{AdapterConfig, LoraConfig, MethodConfig, TargetModules};
use peft_kernels::io::{TensorBytes, write_safetensors};
use peft_kernels::models::{self, LlamaForCausalLM, ModelLoadOptions, QuantizeOnLoad, TokenBatch};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::{Algo, BaseWeight, linear_backward_input, linear_forward};
use peft_kernels::{DType, Device, Tensor};
use serde_json::json;
use std::time::Duration;

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    vocab: usize,
    batch: usize,
    seq: usize,
}

fn shape() -> Shape {
    if std::env::var("PEFT_KERNELS_LLAMA_BENCH").is_ok_and(|v| v == "full") {
        Shape {
            hidden: 1024,
            layers: 8,
            heads: 16,
            kv_heads: 4,
            inter: 2816,
            vocab: 32000,
            batch: 1,
            seq: 256,
        }
    } else {
        Shape {
            hidden: 256,
            layers: 2,
            heads: 8,
            kv_heads: 2,
            inter: 688,
            vocab: 2048,
            batch: 2,
            seq: 128,
        }
    }
}

/// A random checkpoint directory (config.json + model.safetensors, f32, weights normal(0, 0.02)).
fn checkpoint(s: &Shape) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let hd = s.hidden / s.heads;
    let config = json!({
        "model_type": "llama", "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "intermediate_size": s.inter,
        "vocab_size": s.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": false,
    });
    std::fs::write(d.path().join("config.json"), config.to_string()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden]),
        ("model.norm.weight".into(), vec![s.hidden]),
        ("lm_head.weight".into(), vec![s.vocab, s.hidden]),
    ];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for (n, sh) in [
            ("self_attn.q_proj", vec![s.heads * hd, s.hidden]),
            ("self_attn.k_proj", vec![s.kv_heads * hd, s.hidden]),
            ("self_attn.v_proj", vec![s.kv_heads * hd, s.hidden]),
            ("self_attn.o_proj", vec![s.hidden, s.heads * hd]),
            ("mlp.gate_proj", vec![s.inter, s.hidden]),
            ("mlp.up_proj", vec![s.inter, s.hidden]),
            ("mlp.down_proj", vec![s.hidden, s.inter]),
            ("input_layernorm", vec![s.hidden]),
            ("post_attention_layernorm", vec![s.hidden]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), sh));
        }
    }
    let entries: Vec<(String, TensorBytes<'static>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, sh))| {
            let v = if sh.len() == 1 {
                vec![1f32; sh[0]]
            } else {
                Tensor::randn(&sh, 0.02, i as u64, DType::F32, Device::Cpu)
                    .unwrap()
                    .to_vec_f32()
                    .unwrap()
            };
            let data = std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
            (
                name,
                TensorBytes {
                    dtype: safetensors::Dtype::F32,
                    shape: sh,
                    data,
                },
            )
        })
        .collect();
    write_safetensors(d.path().join("model.safetensors"), &entries, None).unwrap();
    d
}

fn adapter_config() -> AdapterConfig {
    let mut c = AdapterConfig::new(MethodConfig::Lora(LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        ..Default::default()
    }));
    c.task_type = Some("CAUSAL_LM".into());
    c.target_modules = Some(TargetModules::Names(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    ));
    c
}

fn bench(c: &mut Criterion) {
    let s = shape();
    let dir = checkpoint(&s);
    let ids: Vec<Vec<u32>> = (0..s.batch)
        .map(|b| {
            (0..s.seq)
                .map(|t| ((b * 7919 + t * 104_729) % s.vocab) as u32)
                .collect()
        })
        .collect();
    let mask = vec![vec![1u8; s.seq]; s.batch];
    let batch = TokenBatch::from_rows(&ids, &mask, None).unwrap();
    let mut g = c.benchmark_group("llama");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for (name, quantize, checkpointing, algo) in [
        ("lora", false, false, Algo::Auto),
        ("qlora", true, false, Algo::Auto),
        ("lora_gc", false, true, Algo::Auto),
        ("lora_bf16", false, false, Algo::Bf16),
        ("qlora_bf16", true, false, Algo::Bf16),
    ] {
        let opts = ModelLoadOptions {
            quantize: quantize.then(QuantizeOnLoad::nf4_dq_all_linear),
            algo,
            ..Default::default()
        };
        let mut store = ParamStore::new();
        let mut m: LlamaForCausalLM = models::from_pretrained_causal_lm(dir.path(), &opts).unwrap();
        m.init_adapter(&adapter_config(), &mut store, 1).unwrap();
        m.model_mut().set_gradient_checkpointing(checkpointing);
        // What one training forward keeps on the tape for backward (parameters included).
        let mut tape = Tape::new();
        m.loss_t(&mut tape, &store, &batch, None, Some(0)).unwrap();
        eprintln!(
            "llama/{name}: tape after the training forward and loss {:.1} MiB",
            tape.value_bytes() as f64 / (1 << 20) as f64
        );
        drop(tape);
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut step = 0u64;
        g.bench_function(format!("train_step_{name}"), |bch| {
            bch.iter(|| {
                step += 1;
                m.train_step(&mut store, &mut opt, &batch, None, step).unwrap()
            })
        });
    }
    g.finish();
}

/// The frozen products alone, forward and input gradient, f32 against bf16 compute (FLOPs:
/// 2·256·1024·out per iteration).
fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("llama_gemm");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let (t, inp) = (256, 1024);
    let val = |n: usize, k: usize| {
        (0..n)
            .map(|i| ((i * k) % 1013) as f32 / 1013.0 - 0.5)
            .collect::<Vec<f32>>()
    };
    let x = Tensor::from_vec(val(t * inp, 7), &[t, inp], Device::Cpu).unwrap();
    for out in [2816, 32000] {
        let w = BaseWeight::Dense(Tensor::from_vec(val(out * inp, 13), &[out, inp], Device::Cpu).unwrap());
        let dy = Tensor::from_vec(val(t * out, 11), &[t, out], Device::Cpu).unwrap();
        for (name, algo) in [("auto", Algo::Auto), ("bf16", Algo::Bf16)] {
            g.bench_function(format!("fwd_{t}x{inp}x{out}/{name}"), |b| {
                b.iter(|| linear_forward(&x, &w, None, None, algo).unwrap())
            });
            // The input gradient dx = dy·W (same FLOPs).
            g.bench_function(format!("bwd_{t}x{out}x{inp}/{name}"), |b| {
                b.iter(|| linear_backward_input(&dy, &w, None, algo).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench, gemm);
criterion_main!(benches);
