//! WaveFT training step vs LoRA r=16 on one 4096x4096 layer with 512 tokens (f32), on the CPU (and on
//! CUDA when present).
//!
//!     cargo bench --bench waveft                 # criterion group `waveft`, then a ratio report
//!
//! Measured per step (forward + backward):
//! - adapter only: WaveFT `x·ΔWᵀ`, dspectrum and dx (sparse, n = 5000 Haar coefficients) against LoRA
//!   `x·Aᵀ·Bᵀ`, dA, dB and dx through `Tensor::matmul_t`;
//! - the whole layer as a user sees it: plus the frozen base `x·Wᵀ` and `dy·W` (dense f32);
//! - `nodx` variants (no input gradient, as for a first layer; this is what the PEFT peer script
//!   `benches/peers/peft_waveft_vblora.py` measures).
//!
//! Napkin math (see `src/adapters/waveft/cpu.rs`): WaveFT moves the same bytes as LoRA's adapter (x and
//! dy read, y and dx written, 8 MB each) but does ~7x fewer FLOPs (2·T·nnz ≈ 20 MFLOP per product vs
//! 134 MFLOP); the base layer costs 2·T·in·out = 17 GFLOP per product and dominates the whole layer.
//! The ratio report at the end times each variant again (median of 15) in the same process.

use criterion::{Criterion, criterion_group};
use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLayer};
use peft_kernels::{DType, Device, Result, Tensor};
use std::time::Instant;

const D: usize = 4096;
const T: usize = 512;
const N: usize = 5000;
const R: usize = 16;

struct Setup {
    dev: Device,
    layer: WaveFtLayer,
    spectrum: Tensor,
    x: Tensor,
    dy: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
}

fn setup(dev: Device, use_idwt: bool) -> Result<Setup> {
    let cfg = WaveFtConfig {
        n_frequency: N,
        use_idwt,
        ..Default::default()
    };
    let layer = WaveFtLayer::new(D, D, &cfg, dev)?;
    Ok(Setup {
        dev,
        spectrum: Tensor::randn(&[N], 0.01, 1, DType::F32, dev)?,
        x: Tensor::randn(&[T, D], 1.0, 2, DType::F32, dev)?,
        dy: Tensor::randn(&[T, D], 1.0, 3, DType::F32, dev)?,
        w: Tensor::randn(&[D, D], 0.02, 4, DType::F32, dev)?,
        a: Tensor::randn(&[R, D], 0.02, 5, DType::F32, dev)?,
        b: Tensor::randn(&[D, R], 0.02, 6, DType::F32, dev)?,
        layer,
    })
}

fn waveft_adapter(s: &Setup, need_dx: bool) -> Result<()> {
    let y = s.layer.forward_delta(&s.x, &s.spectrum)?;
    let (dx, ds) = s.layer.backward_delta(&s.x, &s.dy, &s.spectrum, need_dx)?;
    std::hint::black_box((y, dx, ds));
    s.dev.synchronize()
}

fn lora_adapter(s: &Setup, need_dx: bool) -> Result<()> {
    let h = s.x.matmul_t(&s.a, false, true)?; // [T, r]
    let y = h.matmul_t(&s.b, false, true)?.scale(2.0)?; // [T, out]
    let dys = s.dy.scale(2.0)?;
    let db = dys.matmul_t(&h, true, false)?; // [out, r]
    let dh = dys.matmul(&s.b)?; // [T, r]
    let da = dh.matmul_t(&s.x, true, false)?; // [r, in]
    let dx = if need_dx { Some(dh.matmul(&s.a)?) } else { None };
    std::hint::black_box((y, db, da, dx));
    s.dev.synchronize()
}

fn waveft_layer(s: &Setup, need_dx: bool) -> Result<()> {
    let mut y = s.x.matmul_t(&s.w, false, true)?;
    s.layer.forward_delta_add(&s.x, &s.spectrum, &mut y)?;
    let ds = if need_dx {
        let mut dx = s.dy.matmul(&s.w)?;
        let ds = s.layer.backward_delta_add_dx(&s.x, &s.dy, &s.spectrum, &mut dx)?;
        std::hint::black_box(dx);
        ds
    } else {
        s.layer.backward_delta(&s.x, &s.dy, &s.spectrum, false)?.1
    };
    std::hint::black_box((y, ds));
    s.dev.synchronize()
}

fn lora_layer(s: &Setup, need_dx: bool) -> Result<()> {
    let mut y = s.x.matmul_t(&s.w, false, true)?;
    let h = s.x.matmul_t(&s.a, false, true)?;
    y.add_scaled_(&h.matmul_t(&s.b, false, true)?, 2.0)?;
    let dys = s.dy.scale(2.0)?;
    let db = dys.matmul_t(&h, true, false)?;
    let dh = dys.matmul(&s.b)?;
    let da = dh.matmul_t(&s.x, true, false)?;
    if need_dx {
        let mut dx = s.dy.matmul(&s.w)?;
        dx.add_scaled_(&dh.matmul(&s.a)?, 1.0)?;
        std::hint::black_box(dx);
    }
    std::hint::black_box((y, db, da));
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
    let mut g = c.benchmark_group("waveft");
    g.sample_size(10);
    for dev in devices() {
        let s = setup(dev, true).expect("setup");
        let s_plain = setup(dev, false).expect("setup");
        g.bench_function(format!("{dev}/waveft_n5000_adapter_fwd_bwd"), |b| {
            b.iter(|| waveft_adapter(&s, true).unwrap())
        });
        g.bench_function(format!("{dev}/waveft_n5000_adapter_fwd_bwd_nodx"), |b| {
            b.iter(|| waveft_adapter(&s, false).unwrap())
        });
        g.bench_function(format!("{dev}/waveft_n5000_noidwt_adapter_fwd_bwd"), |b| {
            b.iter(|| waveft_adapter(&s_plain, true).unwrap())
        });
        g.bench_function(format!("{dev}/waveft_n5000_fwd"), |b| {
            b.iter(|| {
                std::hint::black_box(s.layer.forward_delta(&s.x, &s.spectrum).unwrap());
                dev.synchronize().unwrap()
            })
        });
        g.bench_function(format!("{dev}/lora_r16_adapter_fwd_bwd"), |b| {
            b.iter(|| lora_adapter(&s, true).unwrap())
        });
        g.bench_function(format!("{dev}/lora_r16_adapter_fwd_bwd_nodx"), |b| {
            b.iter(|| lora_adapter(&s, false).unwrap())
        });
        g.bench_function(format!("{dev}/waveft_n5000_layer_fwd_bwd"), |b| {
            b.iter(|| waveft_layer(&s, true).unwrap())
        });
        g.bench_function(format!("{dev}/lora_r16_layer_fwd_bwd"), |b| {
            b.iter(|| lora_layer(&s, true).unwrap())
        });
        g.bench_function(format!("{dev}/waveft_n5000_layer_fwd_bwd_nodx"), |b| {
            b.iter(|| waveft_layer(&s, false).unwrap())
        });
        g.bench_function(format!("{dev}/lora_r16_layer_fwd_bwd_nodx"), |b| {
            b.iter(|| lora_layer(&s, false).unwrap())
        });
    }
    g.finish();
}

/// Times the closures interleaved (so machine noise hits all of them alike): (median, min) in ms.
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

/// Ratios measured in this process (target: WaveFT ≤ 1.2x LoRA r=16).
fn ratio_report() {
    for dev in devices() {
        let s = setup(dev, true).expect("setup");
        println!(
            "\nwaveft ratio report on {dev} ({D}x{D}, {T} tokens, f32, n={N} db1 vs LoRA r={R}; median / min of 15, interleaved):"
        );
        for (what, dx) in [("with dx", true), ("no dx", false)] {
            let r = interleaved(
                &[
                    &|| waveft_adapter(&s, dx),
                    &|| lora_adapter(&s, dx),
                    &|| waveft_layer(&s, dx),
                    &|| lora_layer(&s, dx),
                ],
                15,
            );
            let (wa, la, wl, ll) = (r[0], r[1], r[2], r[3]);
            println!(
                "  {what:<8} adapter: waveft {:7.2} / {:7.2} ms, lora {:7.2} / {:7.2} ms, ratio {:.2}x (min {:.2}x) | \
                 whole layer: waveft {:8.2} ms, lora {:8.2} ms, ratio {:.2}x (min {:.2}x)",
                wa.0,
                wa.1,
                la.0,
                la.1,
                wa.0 / la.0,
                wa.1 / la.1,
                wl.0,
                ll.0,
                wl.0 / ll.0,
                wl.1 / ll.1
            );
        }
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
