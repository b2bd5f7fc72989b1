//! Criterion group `candle`: what the candle boundary costs. One QLoRA layer (4096x4096 NF4 with double
//! quantization, blocksize 64, LoRA r = 16, f32 activations, dropout 0) at 512 tokens, called
//!
//! - `direct`: our layer's tape-free `forward` (and `backward` with `need_dx`), on our tensors;
//! - `candle`: the same layer as `peft_kernels::candle::QLoraLinear` on candle tensors (the input a `Var`,
//!   so candle asks for dx): `forward_t`, and for `step` candle's `backward` of `sum(y ⊙ dy)` (candle's
//!   elementwise product, sum and gradient bookkeeping are in this number, so `step` is an upper bound
//!   of the boundary).
//!
//! After criterion, an interleaved median of both (alternating, so machine-load drift hits both alike)
//! prints the overhead `candle / direct - 1`. Target: ≤ 5%.
//!
//! Run: `cargo bench --features candle --bench candle` (`PEFT_KERNELS_BENCH_TOKENS=64` for a smaller
//! token count; `PEFT_KERNELS_BENCH_SHAPE=1024` for a smaller square layer).
//!
//! Load-independent evidence (a shared machine): `PEFT_KERNELS_CANDLE_ONLY=<forward|step>/<direct|candle>`
//! (or `setup`) runs only that variant `PEFT_KERNELS_BENCH_REPS` times after the setup and exits, so
//! `perf stat -e instructions,page-faults` of each, minus `setup`, compares the two sides' work.

use candle_core::Var;
use criterion::{Criterion, criterion_group, criterion_main};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
use peft_kernels::autograd::ParamStore;
use peft_kernels::candle::QLoraLinear;
use peft_kernels::qmatmul::BaseWeight;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Tensor};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Setup {
    layer: LoraLinear,
    store: ParamStore,
    cl: QLoraLinear,
    x: Tensor,
    dy: Tensor,
    cx: Var,
    cdy: candle_core::Tensor,
}

fn setup() -> Setup {
    let (tokens, side) = (
        env("PEFT_KERNELS_BENCH_TOKENS", 512),
        env("PEFT_KERNELS_BENCH_SHAPE", 4096),
    );
    let dev = Device::Cpu;
    let w = Tensor::randn(&[side, side], 0.02, 0, DType::F32, dev).unwrap();
    let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default()).unwrap();
    let mut store = ParamStore::new();
    let cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        init: LoraInit::Random,
        ..LoraConfig::default()
    };
    let layer = LoraLinear::new("bench", BaseWeight::Quantized(q), None, &cfg, &mut store, 1).unwrap();
    let vars = candle_nn::VarMap::new();
    let cl = QLoraLinear::new(layer.clone(), &store, &vars, &candle_core::Device::Cpu).unwrap();
    let x = Tensor::randn(&[tokens, side], 1.0, 2, DType::F32, dev).unwrap();
    let dy = Tensor::randn(&[tokens, side], 1.0, 3, DType::F32, dev).unwrap();
    let c = |t: &Tensor| {
        candle_core::Tensor::from_vec(t.to_vec_f32().unwrap(), t.shape(), &candle_core::Device::Cpu).unwrap()
    };
    let cx = Var::from_tensor(&c(&x)).unwrap();
    let cdy = c(&dy);
    Setup {
        layer,
        store,
        cl,
        x,
        dy,
        cx,
        cdy,
    }
}

impl Setup {
    fn direct_forward(&self) {
        std::hint::black_box(self.layer.forward_eval(&self.store, &self.x).unwrap());
    }
    fn candle_forward(&self) {
        std::hint::black_box(self.cl.forward_eval(self.cx.as_tensor()).unwrap());
    }
    fn direct_step(&self) {
        let (_y, ctx) = AdapterLinear::forward(&self.layer, &self.store, &self.x, None).unwrap();
        std::hint::black_box(
            AdapterLinear::backward(&self.layer, &self.store, &ctx, &self.dy, true).unwrap(),
        );
    }
    fn candle_step(&self) {
        let y = self.cl.forward_t(self.cx.as_tensor(), None).unwrap();
        let loss = (y * &self.cdy).unwrap().sum_all().unwrap();
        std::hint::black_box(loss.backward().unwrap());
    }
}

/// Medians (seconds) of `a` and `b` over `n` alternating runs.
fn interleaved(n: usize, a: impl Fn(), b: impl Fn()) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        a();
        ta.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b();
        tb.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    (med(&mut ta), med(&mut tb))
}

/// `PEFT_KERNELS_CANDLE_ONLY`: one variant alone (see the module docs).
fn only(s: &Setup, which: &str) {
    let n = env("PEFT_KERNELS_BENCH_REPS", 7);
    let f: &dyn Fn(&Setup) = match which {
        "forward/direct" => &Setup::direct_forward,
        "forward/candle" => &Setup::candle_forward,
        "step/direct" => &Setup::direct_step,
        "step/candle" => &Setup::candle_step,
        _ => &|_: &Setup| {},
    };
    let before = peft_kernels::candle::boundary_copies();
    let t = Instant::now();
    for _ in 0..n {
        f(s);
    }
    let after = peft_kernels::candle::boundary_copies();
    println!(
        "{which}: {n} calls in {:.1} ms; boundary copies {} ({} bytes)",
        t.elapsed().as_secs_f64() * 1e3,
        after.copies - before.copies,
        after.bytes - before.bytes
    );
}

fn bench(c: &mut Criterion) {
    let s = setup();
    if let Ok(which) = std::env::var("PEFT_KERNELS_CANDLE_ONLY") {
        only(&s, &which);
        return;
    }
    let mut g = c.benchmark_group("candle");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("forward/direct", |b| b.iter(|| s.direct_forward()));
    g.bench_function("forward/candle", |b| b.iter(|| s.candle_forward()));
    g.bench_function("step/direct", |b| b.iter(|| s.direct_step()));
    g.bench_function("step/candle", |b| b.iter(|| s.candle_step()));
    g.finish();
    let n = env("PEFT_KERNELS_BENCH_REPS", 7);
    let (fd, fc) = interleaved(n, || s.direct_forward(), || s.candle_forward());
    let (sd, sc) = interleaved(n, || s.direct_step(), || s.candle_step());
    let shape = s.x.shape();
    println!(
        "candle boundary, QLoRA NF4-dq {}x{} r=16, {} tokens, interleaved medians of {n}:",
        shape[1], shape[1], shape[0]
    );
    println!(
        "  forward: direct {:.2} ms, candle {:.2} ms, overhead {:+.1}%",
        fd * 1e3,
        fc * 1e3,
        (fc / fd - 1.0) * 100.0
    );
    println!(
        "  step (fwd+bwd): direct {:.2} ms, candle {:.2} ms, overhead {:+.1}%",
        sd * 1e3,
        sc * 1e3,
        (sc / sd - 1.0) * 100.0
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
