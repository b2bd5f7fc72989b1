//! QLoRA in candle with this crate's layers: a BERT encoder written in candle ops whose every linear is
//! a `peft_kernels::candle` QLoRA layer (frozen NF4 base with double quantization, LoRA r=8), trained with
//! candle-nn's AdamW, saved as a PEFT adapter.
//!
//! ```sh
//! cargo run --release --features candle --example candle_finetune [-- --epochs 1 --layers 6 --train 2000 --test 1000]
//! ```
//!
//! With the demo (`scripts/fetch-demo.sh`: all-MiniLM-L6-v2 and the UCI sentiment sentences under
//! `~/.cache/peft-kernels/demo` or `$PEFT_KERNELS_DEMO_DIR`) it fine-tunes MiniLM on imdb + yelp and
//! reports accuracy on amazon. The encoder uses candle-nn's `layer_norm_slow` and `ops::softmax`, which
//! record their backward pass (candle-nn's fast `layer_norm` does not). Without the demo it trains a
//! QLoRA MLP on a synthetic regression task instead.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use peft_kernels::candle::{CandleAdapter, CandleLinear, QLoraLinear};
use std::path::{Path, PathBuf};
use std::time::Instant;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg(name: &str, default: usize) -> R<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or("missing value")?.parse()?),
        None => Ok(default),
    }
}

fn main() -> R<()> {
    let root = std::env::var_os("PEFT_KERNELS_DEMO_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/peft-kernels/demo")))
        .ok_or("no HOME")?;
    if root.join("minilm/model.safetensors").is_file() && root.join("sentiment/imdb.json").is_file() {
        demo(&root)
    } else {
        println!(
            "demo not found under {} (scripts/fetch-demo.sh): synthetic task",
            root.display()
        );
        synthetic()
    }
}

/// A frozen tensor of the checkpoint as a candle tensor.
fn frozen(file: &peft_kernels::io::SafetensorsFile, name: &str) -> R<Tensor> {
    let t = file
        .load(name, peft_kernels::Device::Cpu)?
        .to_dtype(peft_kernels::DType::F32)?;
    Ok(Tensor::from_vec(t.to_vec_f32()?, t.shape(), &Device::Cpu)?)
}

/// One BERT layer's frozen LayerNorms and its six QLoRA linears.
struct Layer {
    q: CandleLinear,
    k: CandleLinear,
    v: CandleLinear,
    o: CandleLinear,
    ln1: (Tensor, Tensor),
    up: CandleLinear,
    down: CandleLinear,
    ln2: (Tensor, Tensor),
}

fn demo(root: &Path) -> R<()> {
    use peft_kernels::io::peft::{AdapterConfig, LoraConfig, MethodConfig, TargetModules};
    use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
    use peft_kernels::quant::{QuantizeOptions, QuantizedTensor, io as qio};
    let (epochs, n_layers) = (arg("--epochs", 1)?, arg("--layers", 6)?.min(6));
    let dev = Device::Cpu;
    let file = SafetensorsFile::open(root.join("minilm/model.safetensors"))?;
    // The encoder's linears as a bitsandbytes NF4 (double-quant) checkpoint, biases dense: what
    // transformers + bitsandbytes save with load_in_4bit.
    let tmp = tempfile::tempdir()?;
    let qpath = tmp.path().join("minilm-nf4.safetensors");
    let mut entries = Vec::new();
    for l in 0..n_layers {
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            let name = format!("encoder.layer.{l}.{m}");
            let w = file.load(&format!("{name}.weight"), peft_kernels::Device::Cpu)?;
            let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
            entries.extend(qio::to_safetensors_entries(&q, &format!("{name}.weight"))?);
            let b = file.load(&format!("{name}.bias"), peft_kernels::Device::Cpu)?;
            entries.push((format!("{name}.bias"), TensorBytes::from_tensor(&b)?));
        }
    }
    write_safetensors(&qpath, &entries, None)?;
    let qfile = SafetensorsFile::open(&qpath)?;
    // A fresh PEFT LoRA adapter on every linear (r=8, alpha 16, dropout 0.1), as get_peft_model makes it.
    let mut config = AdapterConfig::new(MethodConfig::Lora(LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        ..Default::default()
    }));
    config.target_modules = Some(TargetModules::Names(
        ["query", "key", "value", "dense"].map(String::from).to_vec(),
    ));
    let mut adapter = CandleAdapter::init(&qfile, &config, 0, &dev)?;
    let lin = |l: usize, m: &str| -> R<CandleLinear> {
        Ok(adapter
            .layer(&format!("encoder.layer.{l}.{m}"))
            .ok_or("missing layer")?
            .clone())
    };
    let ln = |n: &str| -> R<(Tensor, Tensor)> {
        Ok((
            frozen(&file, &format!("{n}.weight"))?,
            frozen(&file, &format!("{n}.bias"))?,
        ))
    };
    let layers = (0..n_layers)
        .map(|l| -> R<Layer> {
            Ok(Layer {
                q: lin(l, "attention.self.query")?,
                k: lin(l, "attention.self.key")?,
                v: lin(l, "attention.self.value")?,
                o: lin(l, "attention.output.dense")?,
                ln1: ln(&format!("encoder.layer.{l}.attention.output.LayerNorm"))?,
                up: lin(l, "intermediate.dense")?,
                down: lin(l, "output.dense")?,
                ln2: ln(&format!("encoder.layer.{l}.output.LayerNorm"))?,
            })
        })
        .collect::<R<Vec<_>>>()?;
    let word = frozen(&file, "embeddings.word_embeddings.weight")?;
    let pos = frozen(&file, "embeddings.position_embeddings.weight")?;
    let typ = frozen(&file, "embeddings.token_type_embeddings.weight")?;
    let emb_ln = ln("embeddings.LayerNorm")?;
    // The classification head: a plain candle Linear, trained with the adapter.
    let head_vars = candle_nn::VarMap::new();
    let head = candle_nn::linear(
        384,
        2,
        VarBuilder::from_varmap(&head_vars, DType::F32, &dev).pp("classifier"),
    )?;
    let tok = peft_kernels::models::tokenizer::BertTokenizer::from_file(root.join("minilm/tokenizer.json"))?;
    let (train, test) = peft_kernels::data::demo_sentiment(root)?;
    // `--train N` / `--test N`: the first N examples after a fixed shuffle (for a quick run).
    let mut rng = peft_kernels::rng::Rng::new(1);
    let head_of = |d: &peft_kernels::data::Dataset, n: usize, rng: &mut peft_kernels::rng::Rng| {
        let mut idx: Vec<usize> = (0..d.len()).collect();
        peft_kernels::data::shuffle(&mut idx, rng);
        idx.truncate(n);
        d.subset(&idx)
    };
    let train = head_of(&train, arg("--train", train.len())?, &mut rng);
    let test = head_of(&test, arg("--test", test.len())?, &mut rng);

    let (heads, hd) = (12, 32);
    let forward = |texts: &[String], seed: Option<u64>| -> R<Tensor> {
        let b = tok.encode_batch(texts, 64)?;
        let (nb, t) = (b.batch, b.seq);
        let ids = Tensor::from_vec(b.input_ids.clone(), nb * t, &dev)?;
        let positions: Vec<u32> = (0..nb * t).map(|i| (i % t) as u32).collect();
        let positions = Tensor::from_vec(positions, nb * t, &dev)?;
        let types = Tensor::from_vec(b.token_type_ids.clone(), nb * t, &dev)?;
        let mask: Vec<f32> = b.attention_mask.iter().map(|&m| m as f32).collect();
        let mask = Tensor::from_vec(mask, (nb, t), &dev)?;
        let bias = ((mask.clone() - 1.0)? * 1e4)?.reshape((nb, 1, 1, t))?;
        let e = (word.index_select(&ids, 0)? + pos.index_select(&positions, 0)?)?;
        let mut h = candle_nn::ops::layer_norm_slow(
            &(e + typ.index_select(&types, 0)?)?,
            &emb_ln.0,
            &emb_ln.1,
            1e-12,
        )?;
        let split = |x: Tensor| x.reshape((nb, t, heads, hd))?.transpose(1, 2)?.contiguous();
        for (i, l) in layers.iter().enumerate() {
            let s = seed.map(|s| s * 31 + i as u64);
            let q = split(l.q.forward_t(&h, s)?)?;
            let k = split(l.k.forward_t(&h, s)?)?;
            let v = split(l.v.forward_t(&h, s)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((nb * t, heads * hd))?;
            let a = (l.o.forward_t(&ctx, s)? + &h)?;
            h = candle_nn::ops::layer_norm_slow(&a, &l.ln1.0, &l.ln1.1, 1e-12)?;
            let f = l.up.forward_t(&h, s)?.gelu_erf()?;
            let f = (l.down.forward_t(&f, s)? + &h)?;
            h = candle_nn::ops::layer_norm_slow(&f, &l.ln2.0, &l.ln2.1, 1e-12)?;
        }
        // Mean pooling over real tokens (sentence-transformers' pooling for MiniLM).
        let h = h.reshape((nb, t, 384))?;
        let m = mask.unsqueeze(2)?;
        let pooled = h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
        Ok(head.forward(&pooled)?)
    };

    let mut vars = adapter.var_map().all_vars();
    vars.extend(head_vars.all_vars());
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    println!(
        "MiniLM, {n_layers} layers, {} QLoRA linears (NF4-dq base, r=8); {trainable} trainable parameters; {} train / {} test sentences",
        adapter.layers().len(),
        train.len(),
        test.len()
    );
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let batch = 16;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut step = 0u64;
    for epoch in 0..epochs {
        peft_kernels::data::shuffle(&mut order, &mut rng);
        let (t0, mut times) = (Instant::now(), Vec::new());
        let mut total = 0f32;
        for (i, chunk) in order.chunks(batch).enumerate() {
            let s0 = Instant::now();
            let texts: Vec<String> = chunk.iter().map(|&j| train.texts[j].clone()).collect();
            let labels: Vec<u32> = chunk.iter().map(|&j| train.labels[j]).collect();
            let logits = forward(&texts, Some(step))?;
            let loss =
                candle_nn::loss::cross_entropy(&logits, &Tensor::from_vec(labels, chunk.len(), &dev)?)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()?;
            times.push(s0.elapsed().as_secs_f64());
            step += 1;
            if i % 25 == 0 {
                println!("epoch {epoch} step {i:4} loss {:.4}", loss.to_scalar::<f32>()?);
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let n = times.len().max(1);
        println!(
            "epoch {epoch}: mean loss {:.4}, {:.1} s, median step {:.0} ms",
            total / n as f32,
            t0.elapsed().as_secs_f64(),
            times[n / 2] * 1e3
        );
        let mut correct = 0;
        for chunk in (0..test.len()).collect::<Vec<_>>().chunks(64) {
            let texts: Vec<String> = chunk.iter().map(|&j| test.texts[j].clone()).collect();
            let pred = forward(&texts, None)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += chunk
                .iter()
                .zip(pred)
                .filter(|&(&j, p)| test.labels[j] == p)
                .count();
        }
        println!(
            "epoch {epoch}: amazon accuracy {:.3} ({correct}/{})",
            correct as f64 / test.len() as f64,
            test.len()
        );
    }
    let out = tmp.path().join("adapter");
    adapter.save(&out)?;
    let back = CandleAdapter::load(&qfile, &out, &dev)?;
    let probe = Tensor::randn(0f32, 1.0, (2, 384), &dev)?;
    let name = "encoder.layer.0.attention.self.query";
    let same = (back.layer(name).ok_or("layer")?.forward(&probe)?
        - adapter.layer(name).ok_or("layer")?.forward(&probe)?)?
    .abs()?
    .max_all()?
    .to_scalar::<f32>()?;
    println!("saved the PEFT adapter and loaded it back (max output difference {same:e})");
    Ok(())
}

/// No demo: a QLoRA MLP (NF4-dq bases, LoRA r=8) recovers a planted low-rank change of its teacher.
fn synthetic() -> R<()> {
    use peft_kernels::adapters::lora::{LoraConfig, LoraLinear};
    use peft_kernels::qmatmul::BaseWeight;
    use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
    let dev = Device::Cpu;
    let (d, hidden) = (256, 512);
    let vars = candle_nn::VarMap::new();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        ..Default::default()
    };
    let mk = |name: &str, o: usize, i: usize, seed: u64, vars: &candle_nn::VarMap| -> R<QLoraLinear> {
        let mut store = peft_kernels::autograd::ParamStore::new();
        let w = peft_kernels::Tensor::randn(
            &[o, i],
            1.0 / (i as f32).sqrt(),
            seed,
            peft_kernels::DType::F32,
            peft_kernels::Device::Cpu,
        )?;
        let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
        let l = LoraLinear::new(name, BaseWeight::Quantized(q), None, &cfg, &mut store, seed + 100)?;
        Ok(QLoraLinear::new(l, &store, vars, &dev)?)
    };
    let l1 = mk("mlp.up", hidden, d, 1, &vars)?;
    let l2 = mk("mlp.down", d, hidden, 2, &vars)?;
    let model = |x: &Tensor| -> candle_core::Result<Tensor> { l2.forward(&l1.forward(x)?.gelu_erf()?) };
    // The teacher: the same frozen bases (B = 0 at the start, never trained) on the input plus a
    // planted rank-4 change of it.
    let frozen_vars = candle_nn::VarMap::new();
    let (t1, t2) = (
        mk("mlp.up", hidden, d, 1, &frozen_vars)?,
        mk("mlp.down", d, hidden, 2, &frozen_vars)?,
    );
    let u = (Tensor::randn(0f32, 1.0, (d, 4), &dev)? * 0.3)?;
    let v = (Tensor::randn(0f32, 1.0, (4, d), &dev)? * 0.3)?;
    let teacher = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x = (x + x.matmul(&u)?.matmul(&v)?)?;
        Ok(t2.forward_eval(&t1.forward_eval(&x)?.gelu_erf()?)?.detach())
    };
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let mut first = None;
    for step in 0..200 {
        let x = Tensor::randn(0f32, 1.0, (128, d), &dev)?;
        let y = teacher(&x)?;
        let loss = (model(&x)? - y)?.sqr()?.mean_all()?;
        let lv = loss.to_scalar::<f32>()?;
        first.get_or_insert(lv);
        if step % 50 == 0 {
            println!("step {step:3} loss {lv:.6}");
        }
        opt.backward_step(&loss)?;
    }
    let x = Tensor::randn(0f32, 1.0, (128, d), &dev)?;
    let last = (model(&x)? - teacher(&x)?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?;
    println!(
        "loss {:.6} -> {last:.6} over 200 steps ({:.1} s)",
        first.unwrap_or(f32::NAN),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
