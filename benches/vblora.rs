//! VB-LoRA on one 4096x4096 layer with 512 tokens (f32), r = 4, a 256x256 bank, top-2: the
//! composition of A and B (and its backward to logits and bank) against the layer's base matmul, and
//! a full adapter training step.
//!
//!     cargo bench --bench vblora                 # criterion group `vblora`, then a ratio report
//!
//! Target: the composition per step is under 5% of the layer's matmul `x·Wᵀ`. Napkin math: 128 rows
//! of 256 logits → top-2, 128·2·256 FMAs forward and ~3x that backward, against 2·512·4096² = 17 GFLOP.
//! The adapter step itself is a rank-4 LoRA product (x·Aᵀ·Bᵀ, dA, dB, optional dx) in f32.

use criterion::{Criterion, criterion_group};
use peft_kernels::adapters::vblora::{VbLoraConfig, VbLoraLayer, vblora_compose_backward};
use peft_kernels::{DType, Device, Result, Tensor};
use std::time::Instant;

const D: usize = 4096;
const T: usize = 512;

struct Setup {
    dev: Device,
    layer: VbLoraLayer,
    bank: Tensor,
    la: Tensor,
    lb: Tensor,
    da: Tensor,
    dmix_b: Tensor,
    x: Tensor,
    dy: Tensor,
    w: Tensor,
}

fn setup(dev: Device) -> Result<Setup> {
    let cfg = VbLoraConfig::default(); // r=4, 256 vectors of 256, top-2
    let layer = VbLoraLayer::new(D, D, &cfg)?;
    let (la, lb) = layer.init_logits(0.1, 1, dev)?;
    Ok(Setup {
        dev,
        bank: cfg.init_bank(0.02, 2, dev)?,
        da: Tensor::randn(&[cfg.r, D], 1.0, 3, DType::F32, dev)?,
        dmix_b: Tensor::randn(&[D / 256, cfg.r, 256], 1.0, 4, DType::F32, dev)?,
        x: Tensor::randn(&[T, D], 1.0, 5, DType::F32, dev)?,
        dy: Tensor::randn(&[T, D], 1.0, 6, DType::F32, dev)?,
        w: Tensor::randn(&[D, D], 0.02, 7, DType::F32, dev)?,
        layer,
        la,
        lb,
    })
}

/// Composition forward (A and B) and backward (to both logits tensors and the bank).
fn composition(s: &Setup) -> Result<()> {
    let ab = s.layer.compose_ab(&s.bank, &s.la, &s.lb)?;
    let ga = vblora_compose_backward(&s.bank, &s.la, 2, &s.da)?;
    let gb = vblora_compose_backward(&s.bank, &s.lb, 2, &s.dmix_b)?;
    std::hint::black_box((ab, ga, gb));
    s.dev.synchronize()
}

fn base_matmul(s: &Setup) -> Result<()> {
    std::hint::black_box(s.x.matmul_t(&s.w, false, true)?);
    s.dev.synchronize()
}

fn adapter_step(s: &Setup, need_dx: bool) -> Result<()> {
    let (a, b) = s.layer.compose_ab(&s.bank, &s.la, &s.lb)?;
    let y = s.layer.forward_delta(&s.x, &a, &b)?;
    let g = s
        .layer
        .backward_with_ab(&s.x, &s.dy, &a, &b, &s.bank, &s.la, &s.lb, need_dx)?;
    std::hint::black_box((y, g));
    s.dev.synchronize()
}

/// What PEFT's peer script measures: base forward plus the adapter's forward and backward, no dx.
fn layer_step_nodx(s: &Setup) -> Result<()> {
    let (a, b) = s.layer.compose_ab(&s.bank, &s.la, &s.lb)?;
    let mut y = s.x.matmul_t(&s.w, false, true)?;
    y.add_scaled_(&s.layer.forward_delta(&s.x, &a, &b)?, 1.0)?;
    let g = s
        .layer
        .backward_with_ab(&s.x, &s.dy, &a, &b, &s.bank, &s.la, &s.lb, false)?;
    std::hint::black_box((y, g));
    s.dev.synchronize()
}

fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if Device::cuda_if_available().is_cuda() {
        v.push(Device::Cuda(0));
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("vblora");
    g.sample_size(10);
    for dev in devices() {
        let s = setup(dev).expect("setup");
        g.bench_function(format!("{dev}/composition_fwd_bwd_r4_256x256"), |b| {
            b.iter(|| composition(&s).unwrap())
        });
        g.bench_function(format!("{dev}/base_matmul_4096x4096_t512"), |b| {
            b.iter(|| base_matmul(&s).unwrap())
        });
        g.bench_function(format!("{dev}/adapter_step_r4"), |b| {
            b.iter(|| adapter_step(&s, true).unwrap())
        });
        g.bench_function(format!("{dev}/adapter_step_r4_nodx"), |b| {
            b.iter(|| adapter_step(&s, false).unwrap())
        });
        g.bench_function(format!("{dev}/layer_step_r4_nodx"), |b| {
            b.iter(|| layer_step_nodx(&s).unwrap())
        });
    }
    g.finish();
}

fn interleaved(fs: &[&dyn Fn() -> Result<()>], reps: usize) -> Vec<(f64, f64)> {
    let mut t = vec![Vec::with_capacity(reps); fs.len()];
    for f in fs {
        f().unwrap();
    }
    for _ in 0..reps {
        for (i, f) in fs.iter().enumerate() {
            let t0 = Instant::now();
            f().unwrap();
            t[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v[v.len() / 2], v[0])
        })
        .collect()
}

fn ratio_report() {
    for dev in devices() {
        let s = setup(dev).expect("setup");
        let r = interleaved(
            &[
                &|| composition(&s),
                &|| base_matmul(&s),
                &|| adapter_step(&s, false),
                &|| layer_step_nodx(&s),
            ],
            15,
        );
        println!(
            "\nvblora ratio report on {dev} ({D}x{D}, {T} tokens, r=4, 256x256 bank, top-2; median / min of 15, interleaved):\n  \
             composition fwd+bwd {:.3} / {:.3} ms vs base x·Wᵀ {:.2} / {:.2} ms: {:.2}% (min {:.2}%)\n  \
             adapter step (no dx) {:.2} / {:.2} ms; layer step incl. base forward (no dx, PEFT's measurement) {:.2} / {:.2} ms",
            r[0].0,
            r[0].1,
            r[1].0,
            r[1].1,
            100.0 * r[0].0 / r[1].0,
            100.0 * r[0].1 / r[1].1,
            r[2].0,
            r[2].1,
            r[3].0,
            r[3].1,
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if !std::env::args().any(|a| a == "--test" || a == "--list") {
        ratio_report();
    }
}
