//! Criterion group `dora`: the DoRA layer against the LoRA layer (same A, B, base weight and input),
//! and the per-step DoRA norm against one read of the 4-bit weight.
//!
//! - `step`: forward + backward of one layer, r = 16, dropout 0, at 1, 16 and 512 tokens, dense f32 and
//!   NF4 (double quant, blocksize 64) bases, with `need_dx = false` (adapter gradients only, what HF PEFT
//!   computes when the base is frozen and x needs no gradient) and `need_dx = true`. Activations are f32
//!   on the CPU (the CPU computes in f32 anyway) and, on CUDA, f32 for the dense base and bf16 for NF4.
//!   Default 4096x4096; `PEFT_KERNELS_BENCH_FULL=1` adds 11008x4096 and 4096x11008;
//!   `PEFT_KERNELS_BENCH_TOKENS=512` (a comma list) restricts the token counts.
//! - `norm`: `DoraLinear::weight_norm_in` (the norm a training step computes: `Pᵀ = A·Wᵀ` through the
//!   fused GEMV, `A·Aᵀ`, the assembly) for an 8192x8192 NF4 layer with r = 16, against qmatmul's
//!   1-token NF4 GEMV (`linear_forward`, one read of W), both rotating over 4 weight copies so the
//!   37.7 MB weight is not served from the H200's 50 MB L2. Target on the GPU: ≤ 1.2x. On the CPU it
//!   is informative only (the CPU runs the 16-row product in f32).
//!
//! After the criterion measurements, a summary of the same run prints every median and the ratios the
//! benchmark exists for (DoRA / LoRA per case, norm / GEMV).
//! Peer: `benches/peers/peft_lora_dora.py` (HF PEFT on the same shapes).
//!
//! Run: `cargo bench --bench dora` (add `--features cuda` on a GPU machine).

// The case list, weights and timing loop that `peftk bench` uses, compiled into this bench too (it is
// not library API).
#[allow(dead_code)]
#[path = "../src/bin/peftk/bench/harness.rs"]
mod harness;

use criterion::{Criterion, criterion_group, criterion_main};
use harness::{Format, random_weight, time_median_us};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::dora::{DoraContext, DoraLinear, DoraOptions};
use peft_kernels::adapters::lora::{LoraConfig, LoraContext, LoraInit, LoraLinear};
use peft_kernels::autograd::ParamStore;
use peft_kernels::qmatmul::{Algo, BaseWeight, linear_forward};
use peft_kernels::{DType, Device, Result, Tensor};
use std::time::Duration;

fn full() -> bool {
    std::env::var("PEFT_KERNELS_BENCH_FULL").is_ok_and(|v| v == "1")
}

fn device() -> Device {
    Device::cuda_if_available()
}

const RANK: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq)]
struct StepCase {
    out: usize,
    inp: usize,
    tokens: usize,
    format: Format,
    need_dx: bool,
}

impl StepCase {
    fn name(&self, method: &str) -> String {
        format!(
            "step/{method}/{}/{}x{}/t{}{}",
            self.format.as_str(),
            self.out,
            self.inp,
            self.tokens,
            if self.need_dx { "/dx" } else { "" }
        )
    }
    fn act_dtype(&self, dev: Device) -> DType {
        if dev.is_cpu() {
            DType::F32
        } else {
            self.format.act_dtype()
        }
    }
}

/// Token counts of the step cases: 1, 16, 512, or the comma list in `PEFT_KERNELS_BENCH_TOKENS`.
fn tokens_list() -> Vec<usize> {
    std::env::var("PEFT_KERNELS_BENCH_TOKENS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|t| t.trim().parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![1, 16, 512])
}

fn step_cases() -> Vec<StepCase> {
    let mut shapes = vec![(4096, 4096)];
    if full() {
        shapes.extend([(11008, 4096), (4096, 11008)]);
    }
    let mut v = Vec::new();
    for (out, inp) in shapes {
        for tokens in tokens_list() {
            for format in [Format::F32, Format::Nf4Dq] {
                for need_dx in [false, true] {
                    v.push(StepCase {
                        out,
                        inp,
                        tokens,
                        format,
                        need_dx,
                    });
                }
            }
        }
    }
    v
}

enum Layer {
    Lora(LoraLinear),
    Dora(DoraLinear),
}

/// One layer, its parameters and a fixed input and output gradient.
struct Step {
    layer: Layer,
    store: ParamStore,
    x: Tensor,
    dy: Tensor,
    need_dx: bool,
}

impl Step {
    fn new(c: StepCase, dora: bool, dev: Device) -> Result<Step> {
        let act = c.act_dtype(dev);
        let w = match (c.format, act) {
            // A dense base has the activation dtype.
            (Format::F32, _) => BaseWeight::Dense(Tensor::randn(&[c.out, c.inp], 0.02, 1, act, dev)?),
            (f, _) => random_weight(f, c.out, c.inp, 1, dev)?,
        };
        let cfg = LoraConfig {
            r: RANK,
            alpha: 2.0 * RANK as f32,
            init: LoraInit::Random,
            ..LoraConfig::default()
        };
        let mut store = ParamStore::new();
        let layer = if dora {
            Layer::Dora(DoraLinear::new(
                "proj",
                w,
                None,
                &cfg,
                &mut store,
                2,
                DoraOptions::default(),
            )?)
        } else {
            Layer::Lora(LoraLinear::new("proj", w, None, &cfg, &mut store, 2)?)
        };
        let x = Tensor::randn(&[c.tokens, c.inp], 1.0, 3, act, dev)?;
        let dy = Tensor::randn(&[c.tokens, c.out], 1.0, 4, act, dev)?;
        Ok(Step {
            layer,
            store,
            x,
            dy,
            need_dx: c.need_dx,
        })
    }

    /// Forward + backward of a training step (dropout seed given, as in training).
    fn run(&self) -> Result<()> {
        match &self.layer {
            Layer::Lora(l) => {
                let (_y, ctx): (Tensor, LoraContext) = l.forward(&self.store, &self.x, Some(1))?;
                l.backward(&self.store, &ctx, &self.dy, self.need_dx)?;
            }
            Layer::Dora(l) => {
                let (_y, ctx): (Tensor, DoraContext) = l.forward(&self.store, &self.x, Some(1))?;
                l.backward(&self.store, &ctx, &self.dy, self.need_dx)?;
            }
        }
        Ok(())
    }
}

/// The norm of 4 DoRA layers over 4 copies of an 8192² NF4 weight, and 1-token GEMVs over the same
/// copies (round robin).
struct NormCase {
    layers: Vec<(DoraLinear, ParamStore)>,
    x1: Tensor,
    compute: DType,
    next: usize,
}

impl NormCase {
    const N: usize = 8192;
    const COPIES: usize = 4;

    fn new(dev: Device) -> Result<NormCase> {
        let compute = if dev.is_cpu() { DType::F32 } else { DType::BF16 };
        let cfg = LoraConfig {
            r: RANK,
            alpha: 2.0 * RANK as f32,
            init: LoraInit::Random,
            ..LoraConfig::default()
        };
        let mut layers = Vec::new();
        for i in 0..Self::COPIES {
            let w = random_weight(Format::Nf4Dq, Self::N, Self::N, 10 + i as u64, dev)?;
            let mut store = ParamStore::new();
            let l = DoraLinear::new(
                "proj",
                w,
                None,
                &cfg,
                &mut store,
                20 + i as u64,
                DoraOptions::default(),
            )?;
            layers.push((l, store));
        }
        let x1 = Tensor::randn(&[1, Self::N], 1.0, 5, compute, dev)?;
        Ok(NormCase {
            layers,
            x1,
            compute,
            next: 0,
        })
    }

    fn norm(&mut self) -> Result<()> {
        let (l, s) = &self.layers[self.next % Self::COPIES];
        self.next += 1;
        l.weight_norm_in(s, self.compute)?;
        Ok(())
    }

    fn gemv(&mut self) -> Result<()> {
        let (l, _) = &self.layers[self.next % Self::COPIES];
        self.next += 1;
        linear_forward(&self.x1, l.base(), None, None, Algo::Fused)?;
        Ok(())
    }
}

fn dora(c: &mut Criterion) {
    let dev = device();
    let mut group = c.benchmark_group("dora");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for case in step_cases() {
        for dora in [false, true] {
            let step = match Step::new(case, dora, dev) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("skipping {}: {e}", case.name(if dora { "dora" } else { "lora" }));
                    continue;
                }
            };
            group.bench_function(
                format!("{dev}/{}", case.name(if dora { "dora" } else { "lora" })),
                |b| {
                    b.iter(|| {
                        step.run().expect("benchmark step failed");
                        dev.synchronize().expect("synchronize failed");
                    })
                },
            );
        }
    }
    match NormCase::new(dev) {
        Ok(mut nc) => {
            group.bench_function(format!("{dev}/norm/nf4-dq/8192x8192/r16"), |b| {
                b.iter(|| {
                    nc.norm().expect("norm failed");
                    dev.synchronize().expect("synchronize failed");
                })
            });
            group.bench_function(format!("{dev}/gemv1/nf4-dq/8192x8192"), |b| {
                b.iter(|| {
                    nc.gemv().expect("gemv failed");
                    dev.synchronize().expect("synchronize failed");
                })
            });
        }
        Err(e) => eprintln!("skipping the norm case: {e}"),
    }
    group.finish();
    summary(dev);
}

/// Alternates single calls of `a` and `b` (synchronized), `n` pairs after one warm-up pair, and returns
/// (median a, median b, median of the per-pair ratios b / a): a change of machine load hits both sides
/// of a ratio alike.
fn paired_us(
    dev: Device,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> (f64, f64, f64) {
    let once =
        |f: &mut dyn FnMut() -> Result<()>| -> f64 { time_median_us(dev, 0, 1, &mut *f).unwrap_or(f64::NAN) };
    let probe = once(&mut a) + once(&mut b);
    let n = ((4e6 / probe.max(1.0)) as usize).clamp(7, 201) | 1;
    let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let (x, y) = (once(&mut a), once(&mut b));
        ta.push(x);
        tb.push(y);
        ratio.push(y / x);
    }
    for v in [&mut ta, &mut tb, &mut ratio] {
        v.sort_by(f64::total_cmp);
    }
    (ta[n / 2], tb[n / 2], ratio[n / 2])
}

/// DoRA / LoRA per case and norm / GEMV, all measured in this run (see [`paired_us`]).
fn summary(dev: Device) {
    println!("\n=== dora summary ({dev}, r = {RANK}; medians of alternating calls) ===");
    for case in step_cases() {
        let (Ok(l), Ok(d)) = (Step::new(case, false, dev), Step::new(case, true, dev)) else {
            continue;
        };
        let (ml, md, ratio) = paired_us(dev, || l.run(), || d.run());
        println!(
            "{:6} {:>10} t={:<4} {:13}  LoRA {:11.1} us  DoRA {:11.1} us  DoRA/LoRA {:5.2}x",
            case.format.as_str(),
            format!("{}x{}", case.out, case.inp),
            case.tokens,
            if case.need_dx { "with dx" } else { "adapter only" },
            ml,
            md,
            ratio
        );
    }
    if let Ok(nc) = NormCase::new(dev) {
        let nc = std::cell::RefCell::new(nc);
        let (tg, tn, ratio) = paired_us(dev, || nc.borrow_mut().gemv(), || nc.borrow_mut().norm());
        let target = if dev.is_cpu() {
            " (CPU: informative; the target is for the GPU)"
        } else {
            " (target <= 1.2x)"
        };
        println!(
            "norm 8192x8192 nf4-dq r=16 ({}): {tn:.1} us; 1-token NF4 GEMV: {tg:.1} us; norm/GEMV {ratio:.2}x{target}",
            nc.borrow().compute.as_str(),
        );
    }
}

criterion_group!(benches, dora);
criterion_main!(benches);
