//! AdamW step throughput against a memcpy of the same bytes, measured in the same run.
//!
//! Napkin math: an f32 AdamW step moves 28 B per parameter (read p, g, m, v; write p, m, v), so 16M
//! parameters are 470 MB per step. The baseline copies 14 B per parameter (235 MB read + 235 MB
//! written = the same 470 MB), split over the same rayon pool. AdamW's ~12 FLOPs per element (one
//! sqrt, one divide) are far below what the cores can do at that byte rate, so the ratio of the two
//! GiB/s numbers is the optimizer's efficiency against the machine's copy bandwidth. A memcpy also
//! pays a read-for-ownership of every destination line (3 x 14 B of real DRAM traffic for 2 x 14 B
//! counted), so the second baseline repeats AdamW's exact in-place access pattern with trivial math.
//! bf16 parameters move 24 B per element (p is 2 B each way).
//!
//!     cargo bench --bench optim
//!     cargo bench --bench optim -- 'optim8bit/.*cpu'                          # AdamW8bit vs AdamW
//!     PEFTK_BENCH_CPU_TIME=1 cargo bench --bench optim -- 'optim8bit/.*cpu'   # CPU time per step
//!     cargo bench --bench optim -- optim8bit_in_cache                         # the kernels alone, in L2

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peft_kernels::autograd::{Gradients, ParamStore};
use peft_kernels::optim::{AdamW, AdamWConfig, OptimConfig, OptimKind, Optimizer};
use peft_kernels::{DType, Device, Tensor};
use rayon::prelude::*;
use std::time::Duration;

const N: usize = 16 << 20;

fn setup(dtype: DType, dev: Device) -> (ParamStore, Gradients, AdamW) {
    let mut store = ParamStore::new();
    let id = store
        .insert("w", Tensor::randn(&[N], 0.02, 1, dtype, dev).expect("param"))
        .expect("insert");
    let mut grads = Gradients::new();
    grads
        .insert_or_add(id, Tensor::randn(&[N], 1e-3, 2, DType::F32, dev).expect("grad"))
        .expect("grad");
    let mut opt = AdamW::new(AdamWConfig::default()).expect("config");
    // The first step allocates the moments; the timed steps are steady state.
    opt.step(&mut store, &grads).expect("step");
    (store, grads, opt)
}

fn optim(c: &mut Criterion) {
    let mut group = c.benchmark_group("optim");
    group.sample_size(10);

    group.throughput(Throughput::Bytes(28 * N as u64));
    let (mut store, grads, mut opt) = setup(DType::F32, Device::Cpu);
    group.bench_function("adamw_cpu_f32_16M", |b| {
        b.iter(|| opt.step(&mut store, &grads).expect("step"))
    });
    drop((store, grads, opt));

    // Baseline: the same 28 B/param of traffic as a parallel memcpy in 1 MiB pieces.
    let src = vec![1u8; 14 * N];
    let mut dst = vec![0u8; 14 * N];
    group.bench_function("memcpy_cpu_same_bytes", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    drop((src, dst));

    // Second baseline: AdamW's exact access pattern (read g, p, m, v; write p, m, v in place) with
    // trivial arithmetic. Unlike memcpy it writes lines it has just read (no extra read-for-
    // ownership of a destination), so it is the tighter roofline for the optimizer.
    let g = vec![1e-3f32; N];
    let (mut p, mut m, mut v) = (vec![1f32; N], vec![0f32; N], vec![0f32; N]);
    group.bench_function("same_pattern_trivial_math", |b| {
        b.iter(|| {
            p.par_chunks_mut(1 << 15)
                .zip(g.par_chunks(1 << 15))
                .zip(m.par_chunks_mut(1 << 15).zip(v.par_chunks_mut(1 << 15)))
                .for_each(|((p, g), (m, v))| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        *m += g;
                        *v += g;
                        *p -= g;
                    }
                })
        })
    });
    drop((g, p, m, v));

    group.throughput(Throughput::Bytes(24 * N as u64));
    let (mut store, grads, mut opt) = setup(DType::BF16, Device::Cpu);
    group.bench_function("adamw_cpu_bf16_16M", |b| {
        b.iter(|| opt.step(&mut store, &grads).expect("step"))
    });
    drop((store, grads, opt));

    let dev = Device::cuda_if_available();
    if dev.is_cuda() {
        group.throughput(Throughput::Bytes(28 * N as u64));
        let (mut store, grads, mut opt) = setup(DType::F32, dev);
        group.bench_function("adamw_cuda_f32_16M", |b| {
            b.iter(|| {
                opt.step(&mut store, &grads).expect("step");
                dev.synchronize().expect("sync");
            })
        });
        let src = Tensor::zeros(&[14 * N / 4], DType::F32, dev).expect("src");
        group.bench_function("copy_cuda_same_bytes", |b| {
            b.iter(|| {
                // An elementwise kernel that reads and writes each element once (plus one
                // allocation from the stream pool): the device copy rate.
                let _ = src.scale(1.0).expect("copy");
                dev.synchronize().expect("sync");
            })
        });
    }
    group.finish();
}

/// Last-level cache bytes: `PEFTK_BENCH_LLC_MIB` if set, else Linux sysfs (`cpu0/cache/index3/size`),
/// else 480 MiB (the largest L3 this project benches on).
fn llc_bytes() -> usize {
    let mib = |s: &str| s.trim().parse::<usize>().ok().map(|m| m << 20);
    if let Some(b) = std::env::var("PEFTK_BENCH_LLC_MIB").ok().and_then(|s| mib(&s)) {
        return b;
    }
    let sysfs = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok();
    sysfs
        .and_then(|s| {
            let s = s.trim();
            let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let n: usize = num.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                "G" => n << 30,
                _ => n,
            })
        })
        .unwrap_or(480 << 20)
}

/// This process's CPU time, all threads (`CLOCK_PROCESS_CPUTIME_ID`).
fn process_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant POSIX clock.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One independent (parameters, gradients, optimizer) set of `len` f32 parameters on `dev`, stepped once
/// so that the moments exist and the timed steps are steady state.
fn optim_set(kind: OptimKind, dev: Device, seed: u64, len: usize) -> (ParamStore, Gradients, Optimizer) {
    let mut store = ParamStore::new();
    let id = store
        .insert(
            "w",
            Tensor::randn(&[len], 0.02, seed, DType::F32, dev).expect("param"),
        )
        .expect("insert");
    let mut grads = Gradients::new();
    grads
        .insert_or_add(
            id,
            Tensor::randn(&[len], 1e-3, seed + 1, DType::F32, dev).expect("grad"),
        )
        .expect("grad");
    let mut opt = Optimizer::new(OptimConfig {
        optim: kind,
        ..Default::default()
    })
    .expect("config");
    opt.step(&mut store, grads.clone()).expect("step");
    (store, grads, opt)
}

/// `Optimizer` steps on 16M f32 parameters: AdamW (f32 state) against AdamW8bit (bitsandbytes'
/// blockwise 8-bit state), in the same run. Acceptance for the CPU: the 8-bit step costs at most 1.15x
/// the 32-bit step.
///
/// Bytes per step (the criterion throughput): AdamW reads p, g, m, v and writes p, m, v: 28 B/param,
/// 470 MB. AdamW8bit reads p, g and the two code bytes, writes p and the codes, plus two f32 block
/// maxima per 256: 16.03 B/param, 269 MB. Resident per set: 16 B/param (256 MiB) and 10.03 B/param
/// (160 MiB).
///
/// Two conditions per kind:
/// - `_cold` (the acceptance condition, a real training step): several independent sets, stepped in
///   turn, so that each timed step finds its state evicted by at least twice the last-level cache of
///   other sets' traffic since its previous step, as between the whole forward and backward passes of
///   a training step. The sets per kind follow from [`llc_bytes`] (on a 480 MiB L3: 5 of the 32-bit,
///   7 of the 8-bit kind; on 32 MiB: 2 each).
/// - `_hot`: one set stepped again and again, the bench before the rotation: whatever of the state the
///   last-level cache holds from the previous step stays there (most of it on a 480 MiB L3).
///
/// `grads.clone()` in the timed loop clones a map of one `Tensor`, i.e. an `Arc`, not the 64 MB of
/// gradient.
///
/// With `PEFTK_BENCH_CPU_TIME=1` the reported "time" is the process's CPU time per step (both rayon
/// threads summed, so twice the wall time when both are busy) instead of wall time: on a machine shared
/// with other jobs it counts the work of each step rather than the waits for a core, so that the ratio
/// of the two kinds stays meaningful under load (it hides poor scaling to 2 threads, which the wall
/// time shows on a quiet machine).
fn optimizer_8bit(c: &mut Criterion) {
    let mut group = c.benchmark_group("optim8bit");
    group.sample_size(10);
    let mut devices = vec![Device::Cpu];
    if Device::cuda_if_available().is_cuda() {
        devices.push(Device::cuda_if_available());
    }
    let llc = llc_bytes();
    let cpu_time = std::env::var("PEFTK_BENCH_CPU_TIME").is_ok_and(|v| v == "1");
    for dev in devices {
        let on = if dev.is_cuda() { "cuda" } else { "cpu" };
        // Cold sets only on the CPU (the device's L2 holds no 16M-parameter state).
        let conditions: &[&str] = if dev.is_cuda() { &["hot"] } else { &["cold", "hot"] };
        for &cond in conditions {
            for kind in [OptimKind::AdamW, OptimKind::AdamW8bit] {
                let (traffic, resident) = match kind {
                    OptimKind::AdamW => (28 * N, 16 * N),
                    OptimKind::AdamW8bit => (16 * N + 8 * N / 256, 10 * N + 8 * N / 256),
                };
                let sets = if cond == "cold" {
                    1 + (2 * llc).div_ceil(resident)
                } else {
                    1
                };
                let mut sets: Vec<_> = (0..sets as u64)
                    .map(|k| optim_set(kind, dev, 1 + 2 * k, N))
                    .collect();
                group.throughput(Throughput::Bytes(traffic as u64));
                let name = format!("{kind}_{on}_f32_16M_{cond}");
                let (count, mut next) = (sets.len(), 0);
                let mut step = || {
                    let (store, grads, opt) = &mut sets[next];
                    next = (next + 1) % count;
                    opt.step(store, grads.clone()).expect("step");
                    dev.synchronize().expect("sync");
                };
                group.bench_function(name, |b| {
                    if cpu_time {
                        b.iter_custom(|iters| {
                            let t0 = process_cpu_time();
                            (0..iters).for_each(|_| step());
                            process_cpu_time() - t0
                        })
                    } else {
                        b.iter(&mut step)
                    }
                });
            }
        }
    }
    group.finish();
}

/// The CPU step's compute alone: one 16k-parameter tensor (64 quantization blocks, above bitsandbytes'
/// `min_8bit_size`; one rayon task, so one core) stepped again and again, its whole state resident in
/// L2 (256 KB for AdamW, 160 KB for AdamW8bit). No DRAM traffic, so these rows are the kernels' own
/// cost per element, free of the memory-bandwidth noise of a shared VM; the 16M rows add the memory
/// time on top. They still move with the core's clock (±20% between runs on a 2-vCPU VM): compare the
/// two rows of one run.
fn optimizer_8bit_in_cache(c: &mut Criterion) {
    const SMALL: usize = 64 * 256;
    let mut group = c.benchmark_group("optim8bit_in_cache");
    group.throughput(Throughput::Elements(SMALL as u64));
    for kind in [OptimKind::AdamW, OptimKind::AdamW8bit] {
        let (mut store, grads, mut opt) = optim_set(kind, Device::Cpu, 1, SMALL);
        group.bench_function(format!("{kind}_cpu_f32_16k"), |b| {
            b.iter(|| opt.step(&mut store, grads.clone()).expect("step"))
        });
    }
    group.finish();
}

criterion_group!(benches, optim, optimizer_8bit, optimizer_8bit_in_cache);
criterion_main!(benches);
