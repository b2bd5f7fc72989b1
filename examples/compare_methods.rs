//! Method comparison: LoRA, DoRA, WaveFT and VB-LoRA on the same frozen NF4 base and the same task,
//! side by side: trainable parameters, step time, peak memory and quality.
//!
//!     cargo run --release --example compare_methods                    # CPU
//!     cargo run --release --features cuda --example compare_methods -- --device cuda
//!
//! The task is the one of `qlora_train`: a 3-layer teacher MLP `W0 + ΔW` (ΔW a planted rank-4 update plus
//! small full-rank noise), a student whose base is `W0` in NF4 with double quantization, and one adapter
//! per layer trained with the tape and AdamW on fresh batches. Quality is the held-out MSE after training
//! and the fraction of the initial error it removed. The planted update is low-rank and dense, which suits
//! LoRA-style methods; WaveFT's sparse wavelet coefficients suit localized updates, and it shows.

use clap::Parser;
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::dora::{DoraLinear, DoraOptions};
use peft_kernels::adapters::lora::{LoraConfig, LoraLinear};
use peft_kernels::adapters::vblora::{VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions};
use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLinear};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Result, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct CountingAlloc;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds relaxed counters.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as System::alloc.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as System::dealloc.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Parser, Debug)]
#[command(about = "LoRA vs DoRA vs WaveFT vs VB-LoRA on one frozen NF4 MLP")]
struct Args {
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Optimizer steps per method.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const DIMS: [usize; 4] = [256, 768, 768, 128];
const PLANTED_RANK: usize = 4;

/// One slot per layer, whatever the method.
type Layer = Box<dyn AdapterLinear>;

struct Method {
    name: &'static str,
    detail: String,
    lr: f32,
}

fn build(
    method: usize,
    bases: &[BaseWeight],
    store: &mut ParamStore,
    seed: u64,
    dev: Device,
) -> Result<(Method, Vec<Layer>)> {
    let lora_cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        ..LoraConfig::default()
    };
    let mut layers: Vec<Layer> = Vec::new();
    let m = match method {
        0 => {
            for (l, b) in bases.iter().enumerate() {
                let name = format!("mlp.{l}");
                layers.push(Box::new(LoraLinear::new(
                    &name,
                    b.clone(),
                    None,
                    &lora_cfg,
                    store,
                    seed + l as u64,
                )?));
            }
            Method {
                name: "LoRA",
                detail: "r=8, alpha=16".into(),
                lr: 3e-3,
            }
        }
        1 => {
            for (l, b) in bases.iter().enumerate() {
                let name = format!("mlp.{l}");
                let layer = DoraLinear::new(
                    &name,
                    b.clone(),
                    None,
                    &lora_cfg,
                    store,
                    seed + l as u64,
                    DoraOptions::default(),
                )?;
                layers.push(Box::new(layer));
            }
            Method {
                name: "DoRA",
                detail: "r=8, alpha=16, norm detached".into(),
                lr: 3e-3,
            }
        }
        2 => {
            let n = 4096;
            for (l, b) in bases.iter().enumerate() {
                let name = format!("mlp.{l}");
                let cfg = WaveFtConfig {
                    n_frequency: n,
                    ..WaveFtConfig::default()
                };
                let layer = WaveFtLinear::new(&name, b.clone(), None, &cfg, true, store, seed + l as u64)?;
                layers.push(Box::new(layer));
            }
            Method {
                name: "WaveFT",
                detail: format!("n_frequency={n}, db1, scaling=25"),
                lr: 3e-4,
            }
        }
        _ => {
            let cfg = VbLoraConfig {
                r: 4,
                num_vectors: 256,
                vector_length: 128,
                topk: 2,
            };
            let bank = VbLoraBank::new(&cfg, 0.02, store, seed, dev)?;
            for (l, b) in bases.iter().enumerate() {
                let name = format!("mlp.{l}");
                let layer = VbLoraLinear::new(
                    &name,
                    b.clone(),
                    None,
                    &bank,
                    &VbLoraOptions::default(),
                    store,
                    seed + l as u64,
                )?;
                layers.push(Box::new(layer));
            }
            Method {
                name: "VB-LoRA",
                detail: "r=4, bank 256x128, top-2".into(),
                lr: 1e-2,
            }
        }
    };
    Ok((m, layers))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev: Device = args.device.parse()?;
    dev.check()?;
    let seed = args.seed;

    let mut teacher = Vec::new();
    let mut bases = Vec::new();
    let mut base_params = 0usize;
    for (l, win) in DIMS.windows(2).enumerate() {
        let (inp, out) = (win[0], win[1]);
        let s = seed + 10 * l as u64;
        let std = (2.0 / inp as f32).sqrt();
        let w = Tensor::randn(&[out, inp], std, s, DType::F32, dev)?;
        let u = Tensor::randn(&[out, PLANTED_RANK], 1.0, s + 1, DType::F32, dev)?;
        let v = Tensor::randn(&[PLANTED_RANK, inp], 0.6 * std, s + 2, DType::F32, dev)?;
        let noise = Tensor::randn(&[out, inp], 0.01 * std, s + 3, DType::F32, dev)?;
        teacher.push(
            w.add(&u.matmul(&v)?.scale(1.0 / PLANTED_RANK as f32)?)?
                .add(&noise)?,
        );
        let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default())?;
        bases.push(BaseWeight::Quantized(q));
        base_params += out * inp;
    }
    let batch = |s: u64| -> Result<(Tensor, Tensor)> {
        let x = Tensor::randn(&[args.batch, DIMS[0]], 1.0, s, DType::F32, dev)?;
        let mut h = x.clone();
        for (l, w) in teacher.iter().enumerate() {
            h = h.matmul_t(w, false, true)?;
            if l + 1 < teacher.len() {
                let mut t = Tape::new();
                let v = t.leaf(h);
                let v = t.silu(v)?;
                h = t.value(v)?.clone();
            }
        }
        Ok((x, h))
    };
    let (x_eval, y_eval) = batch(u64::MAX - seed)?;
    let train: Vec<(Tensor, Tensor)> = (0..args.steps)
        .map(|s| batch(seed * 1_000_003 + s as u64))
        .collect::<Result<_>>()?;

    println!(
        "task: 3-layer MLP {DIMS:?}, NF4-dq base ({base_params} frozen weights), planted rank-{PLANTED_RANK} update, {} steps x {} tokens, device {dev}\n",
        args.steps, args.batch
    );
    println!(
        "| method | config | trainable params | % of base | median step | peak memory | eval MSE start -> end | error removed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for method in 0..4 {
        let mut store = ParamStore::new();
        let (m, layers) = build(method, &bases, &mut store, seed + 100, dev)?;
        let trainable = store.num_trainable_elements();
        let mut opt = AdamW::new(AdamWConfig {
            lr: m.lr,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        })?;
        let eval = |store: &ParamStore| -> Result<f32> {
            let mut tape = Tape::new();
            let mut h = tape.leaf(x_eval.clone());
            for (l, layer) in layers.iter().enumerate() {
                h = layer.forward_t(&mut tape, store, h, None)?;
                if l + 1 < layers.len() {
                    h = tape.silu(h)?;
                }
            }
            let loss = tape.mse_loss(h, &y_eval)?;
            tape.value(loss)?.to_scalar()
        };
        let start = eval(&store)?;
        let live0 = LIVE.load(Ordering::Relaxed);
        PEAK.store(live0, Ordering::Relaxed);
        let mut times = Vec::with_capacity(args.steps);
        for (step, (x, y)) in train.iter().enumerate() {
            let t0 = Instant::now();
            let mut tape = Tape::new();
            let mut h = tape.leaf(x.clone());
            for (l, layer) in layers.iter().enumerate() {
                h = layer.forward_t(&mut tape, &store, h, Some(step as u64))?;
                if l + 1 < layers.len() {
                    h = tape.silu(h)?;
                }
            }
            let loss = tape.mse_loss(h, y)?;
            let grads = tape.backward(loss)?;
            opt.step(&mut store, &grads)?;
            dev.synchronize()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(live0);
        let end = eval(&store)?;
        times.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {} | {:.2}% | {:.1} ms | {:.1} MB | {:.4} -> {:.4} | {:.0}% |",
            m.name,
            m.detail,
            trainable,
            100.0 * trainable as f64 / base_params as f64,
            times[times.len() / 2] * 1e3,
            peak as f64 / 1e6,
            start,
            end,
            100.0 * (1.0 - end / start)
        );
    }
    println!(
        "\npeak memory: host bytes allocated during training above what was live before it (adapter state, optimizer state, activations)"
    );
    Ok(())
}
