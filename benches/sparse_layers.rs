//! Whole-layer training steps (forward, then backward with dx) over one frozen NF4 base: the base alone
//! (the floor: a frozen layer still needs `y = x·Wᵀ` and `dx = dy·W`), LoRA r = 16, WaveFT at PEFT's
//! default n_frequency = 2592 (db1), VB-LoRA at PEFT's defaults (r = 4, a 256x256 bank, top-2).
//!
//!     cargo bench --bench sparse_layers          # criterion group `sparse_layers`, then a ratio report
//!
//! Napkin math (D×D base, T tokens, f32 activations): the base costs 2·T·D² FLOPs forward and the same
//! for dx (the 4-bit weight, D²/2 bytes, decoded twice). On top of it:
//! - LoRA r: 4·T·r·D forward (`u = x·Aᵀ`, fused `u·Bᵀ`) and ~8·T·r·D backward: 3r/D of the base (2.3% at
//!   r = 16, D = 2048).
//! - WaveFT: an SpMM over nnz ≤ 4n nonzeros, 2·T·nnz forward, 4·T·nnz backward (SDDMM + SpMM), plus one
//!   extra read-modify-write of y and of dx (2·T·D·4 bytes each): 3·4n/D² of the base FLOPs (0.7% at
//!   n = 2592, D = 2048); the y/dx passes are what is left to see.
//! - VB-LoRA: a rank-4 LoRA (≈ 0.6%) plus the composition of A and B and its backward (2·D/256·4 rows of
//!   top-2 over 256 logits: microseconds).
//!
//! So all three should sit within a few percent of the base step.

use criterion::{Criterion, criterion_group};
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
use peft_kernels::adapters::vblora::{VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions};
use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLinear};
use peft_kernels::autograd::ParamStore;
use peft_kernels::qmatmul::{Algo, BaseWeight, linear_backward_input, linear_forward};
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Result, Tensor};
use std::time::Instant;

const D: usize = 2048;
const T: usize = 256;

struct Setup {
    dev: Device,
    base: BaseWeight,
    store: ParamStore,
    lora: LoraLinear,
    waveft: WaveFtLinear,
    vblora: VbLoraLinear,
    x: Tensor,
    dy: Tensor,
}

fn setup(dev: Device) -> Result<Setup> {
    let w = Tensor::randn(&[D, D], 0.02, 1, DType::F32, dev)?;
    let base = BaseWeight::Quantized(QuantizedTensor::quantize(&w, &QuantizeOptions::default())?);
    let mut store = ParamStore::new();
    let lc = LoraConfig {
        r: 16,
        alpha: 32.0,
        init: LoraInit::Random,
        ..LoraConfig::default()
    };
    let lora = LoraLinear::new("lora", base.clone(), None, &lc, &mut store, 2)?;
    let waveft = WaveFtLinear::new(
        "waveft",
        base.clone(),
        None,
        &WaveFtConfig::default(),
        false,
        &mut store,
        3,
    )?;
    let bank = VbLoraBank::new(&VbLoraConfig::default(), 0.02, &mut store, 4, dev)?;
    let vblora = VbLoraLinear::new(
        "vblora",
        base.clone(),
        None,
        &bank,
        &VbLoraOptions::default(),
        &mut store,
        5,
    )?;
    Ok(Setup {
        dev,
        base,
        store,
        lora,
        waveft,
        vblora,
        x: Tensor::randn(&[T, D], 1.0, 6, DType::F32, dev)?,
        dy: Tensor::randn(&[T, D], 1.0, 7, DType::F32, dev)?,
    })
}

fn base_step(s: &Setup) -> Result<()> {
    let y = linear_forward(&s.x, &s.base, None, None, Algo::Auto)?;
    let dx = linear_backward_input(&s.dy, &s.base, None, Algo::Auto)?;
    std::hint::black_box((y, dx));
    s.dev.synchronize()
}

fn lora_step(s: &Setup) -> Result<()> {
    let (y, ctx) = s.lora.forward(&s.store, &s.x, None)?;
    let g = s.lora.backward(&s.store, &ctx, &s.dy, true)?;
    std::hint::black_box((y, g));
    s.dev.synchronize()
}

fn waveft_step(s: &Setup) -> Result<()> {
    let (y, ctx) = s.waveft.forward(&s.store, &s.x, None)?;
    let g = s.waveft.backward(&s.store, &ctx, &s.dy, true)?;
    std::hint::black_box((y, g));
    s.dev.synchronize()
}

fn vblora_step(s: &Setup) -> Result<()> {
    let (y, ctx) = s.vblora.forward(&s.store, &s.x, None)?;
    let g = s.vblora.backward(&s.store, &ctx, &s.dy, true)?;
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

type Step = fn(&Setup) -> Result<()>;
const STEPS: [(&str, Step); 4] = [
    ("base_nf4", base_step),
    ("lora_r16", lora_step),
    ("waveft_n2592", waveft_step),
    ("vblora_r4", vblora_step),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sparse_layers");
    g.sample_size(10);
    for dev in devices() {
        let s = setup(dev).expect("setup");
        for (name, f) in STEPS {
            g.bench_function(format!("{dev}/{name}_step_{D}x{D}_t{T}"), |b| {
                b.iter(|| f(&s).unwrap())
            });
        }
    }
    g.finish();
}

/// Median and min (ms) of `reps` interleaved runs of each step, so drift hits all of them alike.
fn interleaved(s: &Setup, reps: usize) -> Vec<(f64, f64)> {
    let mut t = vec![Vec::with_capacity(reps); STEPS.len()];
    for (_, f) in STEPS {
        f(s).unwrap();
    }
    for _ in 0..reps {
        for (i, (_, f)) in STEPS.iter().enumerate() {
            let t0 = Instant::now();
            f(s).unwrap();
            t[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.total_cmp(b));
            (v[v.len() / 2], v[0])
        })
        .collect()
}

fn ratio_report() {
    for dev in devices() {
        let s = setup(dev).expect("setup");
        let r = interleaved(&s, 15);
        println!(
            "\nsparse_layers ratio report on {dev} (NF4 {D}x{D}, {T} tokens, f32, forward + backward with dx; \
             median / min of 15, interleaved):"
        );
        for (i, (name, _)) in STEPS.iter().enumerate() {
            println!(
                "  {name:<14} {:8.2} / {:8.2} ms   x{:.3} of the base step   x{:.3} of LoRA r=16",
                r[i].0,
                r[i].1,
                r[i].0 / r[0].0,
                r[i].0 / r[1].0
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
