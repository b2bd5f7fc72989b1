//! QLoRA end to end: a frozen NF4 student learns a planted low-rank update with LoRA adapters, the
//! autograd tape and AdamW.
//!
//!     cargo run --release --example qlora_train                     # CPU
//!     cargo run --release --features cuda --example qlora_train -- --device cuda
//!
//! The teacher is a 3-layer MLP `W0 + ΔW` where ΔW is a planted rank-4 update plus small full-rank noise.
//! The student starts from `W0` quantized to NF4 with double quantization (bitsandbytes layout) and trains
//! only LoRA A and B on every layer. The loss falls from the size of the planted update towards the floor
//! set by the NF4 rounding of W0 and the noise, which LoRA cannot represent.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::lora::{LoraConfig, LoraLinear};
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::optim::{AdamW, AdamWConfig};
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Result, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts live host bytes so the example can report its peak memory honestly.
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
#[command(about = "Train LoRA adapters on a frozen NF4 MLP to recover a planted low-rank update")]
struct Args {
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Compute dtype of activations: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const DIMS: [usize; 4] = [256, 768, 768, 128];
const PLANTED_RANK: usize = 4;

fn main() -> Result<()> {
    let args = Args::parse();
    let dev: Device = args.device.parse()?;
    dev.check()?;
    let dtype: DType = args.dtype.parse()?;
    let seed = args.seed;

    // Teacher: W0 (kaiming-like scale) plus a planted rank-4 update and small full-rank noise.
    let mut w0 = Vec::new();
    let mut teacher = Vec::new();
    for (l, win) in DIMS.windows(2).enumerate() {
        let (inp, out) = (win[0], win[1]);
        let std = (2.0 / inp as f32).sqrt();
        let w = Tensor::randn(&[out, inp], std, seed + 10 * l as u64, DType::F32, dev)?;
        let u = Tensor::randn(
            &[out, PLANTED_RANK],
            1.0,
            seed + 10 * l as u64 + 1,
            DType::F32,
            dev,
        )?;
        let v = Tensor::randn(
            &[PLANTED_RANK, inp],
            0.6 * std,
            seed + 10 * l as u64 + 2,
            DType::F32,
            dev,
        )?;
        let noise = Tensor::randn(&[out, inp], 0.01 * std, seed + 10 * l as u64 + 3, DType::F32, dev)?;
        teacher.push(
            w.add(&u.matmul(&v)?.scale(1.0 / PLANTED_RANK as f32)?)?
                .add(&noise)?,
        );
        w0.push(w);
    }

    // Student: NF4 (double-quantized) W0 and LoRA on every layer.
    let mut store = ParamStore::new();
    let mut layers = Vec::new();
    let cfg = LoraConfig {
        r: args.rank,
        alpha: 2.0 * args.rank as f32,
        ..LoraConfig::default()
    };
    let mut frozen_bytes = 0usize;
    let mut frozen_params = 0usize;
    for (l, w) in w0.iter().enumerate() {
        let q = QuantizedTensor::quantize(
            w,
            &QuantizeOptions {
                name: format!("layer{l}"),
                ..Default::default()
            },
        )?;
        frozen_bytes += q.size_in_bytes();
        frozen_params += w.numel();
        let base = BaseWeight::Quantized(q);
        layers.push(LoraLinear::new(
            &format!("mlp.{l}"),
            base,
            None,
            &cfg,
            &mut store,
            seed + 100 + l as u64,
        )?);
    }
    let trainable = store.num_trainable_elements();
    println!(
        "device {dev}, compute {dtype}: {} frozen weights in NF4-dq ({:.2} MB, {:.3} bits/weight); {} trainable LoRA parameters (r={}, {:.2}% of the base)",
        frozen_params,
        frozen_bytes as f64 / 1e6,
        frozen_bytes as f64 * 8.0 / frozen_params as f64,
        trainable,
        args.rank,
        100.0 * trainable as f64 / frozen_params as f64
    );

    let mut opt = AdamW::new(AdamWConfig {
        lr: args.lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let batch = |step: usize| -> Result<(Tensor, Tensor)> {
        let x = Tensor::randn(
            &[args.batch, DIMS[0]],
            1.0,
            seed * 1_000_003 + step as u64,
            DType::F32,
            dev,
        )?;
        let mut h = x.clone();
        for (l, w) in teacher.iter().enumerate() {
            h = h.matmul_t(w, false, true)?;
            if l + 1 < teacher.len() {
                h = silu(&h)?;
            }
        }
        Ok((x.to_dtype(dtype)?, h.to_dtype(dtype)?))
    };

    let pb = ProgressBar::new(args.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}] {msg}")
            .map_err(|e| peft_kernels::Error::InvalidArgument(e.to_string()))?,
    );
    let mut times = Vec::with_capacity(args.steps);
    let mut first_loss = None;
    let mut last_losses = Vec::new();
    for step in 0..args.steps {
        let (x, y) = batch(step)?;
        let t0 = Instant::now();
        let mut tape = Tape::new();
        let mut h = tape.leaf(x);
        for (l, layer) in layers.iter().enumerate() {
            h = layer.forward_t(&mut tape, &store, h, Some(step as u64))?;
            if l + 1 < layers.len() {
                h = tape.silu(h)?;
            }
        }
        let loss = tape.mse_loss(h, &y)?;
        let grads = tape.backward(loss)?;
        opt.step(&mut store, &grads)?;
        let loss = tape.value(loss)?.to_scalar()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        first_loss.get_or_insert(loss);
        if step + 20 >= args.steps {
            last_losses.push(loss);
        }
        if step % 10 == 0 || step + 1 == args.steps {
            pb.set_message(format!("loss {loss:.5}"));
            pb.suspend(|| println!("step {step:4}  loss {loss:.6}"));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();

    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2] * 1e3;
    let first = first_loss.unwrap_or(f32::NAN);
    let last = last_losses.iter().sum::<f32>() / last_losses.len().max(1) as f32;
    println!(
        "loss {first:.6} -> {last:.6} ({:.1}x lower) over {} steps",
        first / last,
        args.steps
    );
    println!(
        "median step time {median_ms:.2} ms ({} tokens/step, {:.0} tokens/s)",
        args.batch,
        args.batch as f64 / (median_ms / 1e3)
    );
    println!(
        "peak host memory {:.1} MB (live now {:.1} MB)",
        PEAK.load(Ordering::Relaxed) as f64 / 1e6,
        LIVE.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok(())
}

/// x·sigmoid(x) on plain tensors, for the teacher (no tape needed).
fn silu(x: &Tensor) -> Result<Tensor> {
    let mut tape = Tape::new();
    let v = tape.leaf(x.clone());
    let y = tape.silu(v)?;
    Ok(tape.value(y)?.clone())
}
