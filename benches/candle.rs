//! Criterion group `candle`: what the candle boundary costs. One QLoRA layer (4096x4096 NF4 with double
//! quantization, blocksize 64, LoRA r = 16, f32 activations, dropout 0) at 512 tokens, called
//!
//! - `direct`: our layer's tape-free `forward` (and `backward` with `need_dx`), on our tensors;
//! - `candle`: the same layer as `peft_kernels::candle::QLoraLinear` on candle tensors (the input a `Var`,
//!   so candle asks for dx): `forward_t`, and for `step` candle's `backward` from a loss whose gradient
//!   with respect to y is the stored dy. dy is injected at no cost by [`InjectDy`], a custom op that maps
//!   y to a scalar without reading it and whose backward hands back the stored dy (an `Arc` clone);
//! - `noop`: the same candle step around [`NoopOp`], a custom op of the same operands and shapes that
//!   does no arithmetic (its outputs are fresh zeroed buffers). It measures what candle's autograd
//!   charges any op of these shapes: the gradient store's `zeros_like` + `add` for y's gradient and for
//!   each returned gradient (x's 8 MiB, A's, B's), the graph walk, the `Arc`s;
//! - `candle-mul`: the candle step with dy injected the obvious way, `loss = sum(y ⊙ dy)`: candle's
//!   product, sum, broadcast and both sides' gradients (it computes dy's too), each accumulated through
//!   the gradient store. This is harness cost, not boundary cost; kept to show the difference.
//!
//! The boundary's own cost (our op's dispatch, layouts, storage wrapping) is `candle − direct − noop`;
//! what going through candle costs a user against calling the layer directly is `candle / direct − 1`
//! (that includes candle's bookkeeping of our op, which every candle op pays). See `docs/candle.md`.
//!
//! - `dora/direct`, `dora/candle`: the same comparison for a DoRA layer on the same base (the general
//!   layer path: the in-place host op of `src/candle/host.rs`, a ticket op over A, B and the magnitude).
//!
//! After criterion, interleaved medians (alternating, so machine-load drift hits all sides alike) print
//! the overheads. Target: ≤ 5%.
//!
//! Run: `cargo bench --features candle --bench candle` (`PEFT_KERNELS_BENCH_TOKENS=64` for a smaller
//! token count; `PEFT_KERNELS_BENCH_SHAPE=1024` for a smaller square layer; `PEFT_KERNELS_BENCH_REPS`
//! for the interleaved repetitions).
//!
//! Load-independent evidence (a shared machine): `PEFT_KERNELS_CANDLE_ONLY=<forward|step>/<direct|candle>`
//! (also `step/noop`, `step/candle-mul`, `dora-forward/<direct|candle>`, `dora-step/<direct|candle>`, or
//! `setup`) runs only that variant `PEFT_KERNELS_BENCH_REPS` times
//! after the setup and exits, so `/usr/bin/time -v` (user CPU, page faults) or `perf record` of each,
//! minus `setup`, compares the sides' work.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use peft_kernels::adapters::AdapterLinear;
use peft_kernels::adapters::dora::{DoraLinear, DoraOptions};
use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
use peft_kernels::autograd::ParamStore;
use peft_kernels::candle::{DoraLinear as CandleDora, QLoraLinear};
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
    /// `[out, in]` of the layer (for [`NoopOp`]).
    out_in: (usize, usize),
    /// A DoRA layer on the same base (its parameters in `store` too) and its candle twin.
    dora: DoraLinear,
    cdora: CandleDora,
}

/// `loss = inject(y)`: a scalar 0 that never reads y; its backward returns the stored dy (an `Arc`
/// clone, no allocation), so `dloss/dy = dy` reaches the layer with nothing computed on the way.
struct InjectDy(candle_core::Tensor);

impl CustomOp1 for InjectDy {
    fn name(&self) -> &'static str {
        "inject_dy"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from_dims(&[])))
    }
    fn bwd(
        &self,
        _: &candle_core::Tensor,
        _: &candle_core::Tensor,
        _: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// An op of the layer's operands `(x [t, in], A [r, in], B [out, r])` that does no arithmetic: y and the
/// gradients are fresh zeroed buffers of the right shapes. What candle charges around it is what it
/// charges any op of these shapes.
struct NoopOp {
    out: usize,
}

impl CustomOp3 for NoopOp {
    fn name(&self) -> &'static str {
        "noop_linear"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = l1.dims()[0];
        Ok((
            CpuStorage::F32(vec![0.0; t * self.out]),
            Shape::from_dims(&[t, self.out]),
        ))
    }
    fn bwd(
        &self,
        x: &candle_core::Tensor,
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        _: &candle_core::Tensor,
        _: &candle_core::Tensor,
    ) -> candle_core::Result<(
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
    )> {
        Ok((
            Some(x.zeros_like()?),
            Some(a.zeros_like()?),
            Some(b.zeros_like()?),
        ))
    }
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
    let layer = LoraLinear::new(
        "bench",
        BaseWeight::Quantized(q.clone()),
        None,
        &cfg,
        &mut store,
        1,
    )
    .unwrap();
    let vars = candle_nn::VarMap::new();
    let cl = QLoraLinear::new(layer.clone(), &store, &vars, &candle_core::Device::Cpu).unwrap();
    let dora = DoraLinear::new(
        "bench_dora",
        BaseWeight::Quantized(q),
        None,
        &cfg,
        &mut store,
        4,
        DoraOptions::default(),
    )
    .unwrap();
    let cdora = CandleDora::new(dora.clone(), &store, &vars, &candle_core::Device::Cpu).unwrap();
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
        out_in: (side, side),
        dora,
        cdora,
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
        let loss = y.apply_op1(InjectDy(self.cdy.clone())).unwrap();
        std::hint::black_box(loss.backward().unwrap());
    }
    fn noop_step(&self) {
        let [a, b] = self.cl.vars() else {
            unreachable!("a LoRA layer has A and B")
        };
        let op = NoopOp { out: self.out_in.0 };
        let y = self.cx.apply_op3(a.as_tensor(), b.as_tensor(), op).unwrap();
        let loss = y.apply_op1(InjectDy(self.cdy.clone())).unwrap();
        std::hint::black_box(loss.backward().unwrap());
    }
    fn dora_direct_forward(&self) {
        std::hint::black_box(self.dora.forward_eval(&self.store, &self.x).unwrap());
    }
    fn dora_candle_forward(&self) {
        std::hint::black_box(self.cdora.forward_eval(self.cx.as_tensor()).unwrap());
    }
    fn dora_direct_step(&self) {
        let (_y, ctx) = AdapterLinear::forward(&self.dora, &self.store, &self.x, None).unwrap();
        std::hint::black_box(AdapterLinear::backward(&self.dora, &self.store, &ctx, &self.dy, true).unwrap());
    }
    fn dora_candle_step(&self) {
        let y = self.cdora.forward_t(self.cx.as_tensor(), None).unwrap();
        let loss = y.apply_op1(InjectDy(self.cdy.clone())).unwrap();
        std::hint::black_box(loss.backward().unwrap());
    }
    fn candle_mul_step(&self) {
        let y = self.cl.forward_t(self.cx.as_tensor(), None).unwrap();
        let loss = (y * &self.cdy).unwrap().sum_all().unwrap();
        std::hint::black_box(loss.backward().unwrap());
    }
}

/// Medians (seconds) of each of `fs` over `n` rounds that run them in turn.
fn interleaved<const N: usize>(n: usize, fs: [&dyn Fn(); N]) -> [f64; N] {
    let mut times = [(); N].map(|_| Vec::with_capacity(n));
    for _ in 0..n {
        for (f, t) in fs.iter().zip(times.iter_mut()) {
            let start = Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    times.map(|mut v| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    })
}

/// `PEFT_KERNELS_CANDLE_ONLY`: one variant alone (see the module docs).
fn only(s: &Setup, which: &str) {
    let n = env("PEFT_KERNELS_BENCH_REPS", 7);
    let f: &dyn Fn(&Setup) = match which {
        "forward/direct" => &Setup::direct_forward,
        "forward/candle" => &Setup::candle_forward,
        "step/direct" => &Setup::direct_step,
        "step/candle" => &Setup::candle_step,
        "step/noop" => &Setup::noop_step,
        "step/candle-mul" => &Setup::candle_mul_step,
        "dora-forward/direct" => &Setup::dora_direct_forward,
        "dora-forward/candle" => &Setup::dora_candle_forward,
        "dora-step/direct" => &Setup::dora_direct_step,
        "dora-step/candle" => &Setup::dora_candle_step,
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
    g.bench_function("step/noop", |b| b.iter(|| s.noop_step()));
    g.bench_function("step/candle-mul", |b| b.iter(|| s.candle_mul_step()));
    g.bench_function("dora/forward/direct", |b| b.iter(|| s.dora_direct_forward()));
    g.bench_function("dora/forward/candle", |b| b.iter(|| s.dora_candle_forward()));
    g.bench_function("dora/step/direct", |b| b.iter(|| s.dora_direct_step()));
    g.bench_function("dora/step/candle", |b| b.iter(|| s.dora_candle_step()));
    g.finish();
    let n = env("PEFT_KERNELS_BENCH_REPS", 7);
    let [fd, fc] = interleaved(n, [&|| s.direct_forward(), &|| s.candle_forward()]);
    let [sd, sc, sn, sm] = interleaved(
        n,
        [
            &|| s.direct_step(),
            &|| s.candle_step(),
            &|| s.noop_step(),
            &|| s.candle_mul_step(),
        ],
    );
    let shape = s.x.shape();
    let pct = |x: f64| x / sd * 100.0;
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
        "  step (fwd+bwd): direct {:.2} ms, candle {:.2} ms: going through candle {:+.1}%",
        sd * 1e3,
        sc * 1e3,
        pct(sc - sd)
    );
    println!(
        "    of which candle's autograd around any op of these shapes (noop step {:.2} ms) {:.1}%, \
         our boundary (candle - direct - noop) {:+.1}%",
        sn * 1e3,
        pct(sn),
        pct(sc - sd - sn)
    );
    println!(
        "  step with dy injected as sum(y * dy) (harness cost): candle {:.2} ms, {:+.1}% over direct",
        sm * 1e3,
        pct(sm - sd)
    );
    let [dfd, dfc] = interleaved(n, [&|| s.dora_direct_forward(), &|| s.dora_candle_forward()]);
    let [dsd, dsc] = interleaved(n, [&|| s.dora_direct_step(), &|| s.dora_candle_step()]);
    println!(
        "  DoRA (same base, r=16): forward direct {:.2} ms, candle {:.2} ms ({:+.1}%); step direct {:.2} ms, \
         candle {:.2} ms: going through candle {:+.1}%",
        dfd * 1e3,
        dfc * 1e3,
        (dfc / dfd - 1.0) * 100.0,
        dsd * 1e3,
        dsc * 1e3,
        (dsc / dsd - 1.0) * 100.0
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
