//! Criterion group `models`: one training step of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a
//! sequence classifier: batch 16 sentences of the sentiment demo data (padded per batch, truncated to 48
//! tokens), adapters r = 8 on every `query`, `key`, `value` and `dense` linear (pooler included, as PEFT
//! matches it), classifier trained (`modules_to_save`), f32 activations, AdamW, dropout on. Cases:
//! `lora` (dense f32 base), `dora` (dense base), `qlora` (NF4 with double quantization, blocksize 64,
//! quantized on load), and `lora_ckpt` (LoRA with gradient checkpointing).
//!
//! Needs the demo model and data (`scripts/fetch-demo.sh`); without them it prints SKIPPED. Peer:
//! transformers 5.24 + PEFT 0.21 on the same machine (see the README's numbers).
//!
//! Run: `cargo bench --bench models`.

use criterion::{Criterion, criterion_group, criterion_main};
use peft_kernels::autograd::ParamStore;
use peft_kernels::io::peft::{AdapterConfig, LoraConfig, MethodConfig, TargetModules};
use peft_kernels::models::{
    self, BertBatch, BertForSequenceClassification, ModelLoadOptions, QuantizeOnLoad,
};
use peft_kernels::optim::{AdamW, AdamWConfig};
use std::path::PathBuf;
use std::time::Duration;

fn demo() -> Option<PathBuf> {
    let root = std::env::var_os("PEFT_KERNELS_DEMO_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-kernels/demo")))?;
    (root.join("minilm/model.safetensors").exists() && root.join("sentiment/imdb.json").exists())
        .then_some(root)
}

fn adapter_config(dora: bool) -> AdapterConfig {
    let mut c = AdapterConfig::new(MethodConfig::Lora(LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        use_dora: dora,
        ..Default::default()
    }));
    c.task_type = Some("SEQ_CLS".into());
    c.target_modules = Some(TargetModules::Names(
        ["query", "key", "value", "dense"].map(String::from).to_vec(),
    ));
    c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
    c
}

struct Case {
    model: BertForSequenceClassification,
    store: ParamStore,
    opt: AdamW,
}

fn setup(root: &std::path::Path, quantize: bool, dora: bool, ckpt: bool) -> Case {
    let opts = ModelLoadOptions {
        quantize: quantize.then(QuantizeOnLoad::nf4_dq_all_linear),
        ..Default::default()
    };
    let mut store = ParamStore::new();
    let mut model = models::from_pretrained_seq_cls(root.join("minilm"), &opts, &mut store, 0).unwrap();
    model.init_adapter(&adapter_config(dora), &mut store, 1).unwrap();
    model.bert_mut().set_gradient_checkpointing(ckpt);
    let opt = AdamW::new(AdamWConfig {
        lr: 2e-4,
        ..Default::default()
    })
    .unwrap();
    Case { model, store, opt }
}

fn batch(root: &std::path::Path) -> (BertBatch, Vec<u32>) {
    let tok = models::BertTokenizer::from_file(root.join("minilm/tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(root.join("sentiment/imdb.json")).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let rows = &rows[..16];
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let labels: Vec<u32> = rows.iter().map(|r| r["class"].as_u64().unwrap() as u32).collect();
    (tok.encode_batch(&texts, 48).unwrap(), labels)
}

fn bench(c: &mut Criterion) {
    let Some(root) = demo() else {
        println!("SKIPPED (demo model missing: run scripts/fetch-demo.sh)");
        return;
    };
    let (b, labels) = batch(&root);
    println!("batch {} x {} tokens ({} real)", b.batch, b.seq, b.num_tokens());
    let mut g = c.benchmark_group("models");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for (name, q, dora, ckpt) in [
        ("lora", false, false, false),
        ("dora", false, true, false),
        ("qlora", true, false, false),
        ("lora_ckpt", false, false, true),
    ] {
        let mut case = setup(&root, q, dora, ckpt);
        let mut step = 0u64;
        g.bench_function(format!("minilm_train_step/{name}/b16"), |bch| {
            bch.iter(|| {
                step += 1;
                case.model
                    .train_step(&mut case.store, &mut case.opt, &b, &labels, step)
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
