//! NF4 quantize / dequantize throughput (criterion group `nf4`).
//!
//! Throughput is bytes moved: the float tensor read plus the packed data and absmax written
//! (quantize), or the packed data and absmax read plus the float tensor written (dequantize), so the
//! GB/s compare directly with memory bandwidth. The in-run baselines are the scalar reference path
//! (CPU) and a read+write elementwise kernel over the same bytes (CUDA, `scale(1.0)`).
//!
//!     cargo bench --bench nf4                      # CPU
//!     cargo bench --bench nf4 --features cuda      # plus CUDA when a GPU is present
//!     NF4_CPUTIME=1 cargo bench --bench nf4 -- --list   # only the wall / CPU-time table of the peer script
//!
//! Compare with bitsandbytes on the same machine: `benches/peers/bnb_nf4.py`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use peft_kernels::quant::cpu::{self, Isa};
use peft_kernels::quant::{QuantType, QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Tensor};
use std::hint::black_box;
use std::time::Duration;

/// Bytes moved by a bf16 quantize (or dequantize) of `n` elements at blocksize 64 without double
/// quantization: 2n (bf16) + n/2 (packed) + 4n/64 (absmax).
fn bytes_moved(n: usize) -> u64 {
    (2 * n + n / 2 + 4 * n.div_ceil(64)) as u64
}

fn opts(dq: bool) -> QuantizeOptions {
    QuantizeOptions {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: dq,
        ..Default::default()
    }
}

/// A named operation to time.
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

/// User + system CPU time of this process in ms (Linux `/proc/self/stat`; 10 ms ticks).
fn process_cpu_ms() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
    Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 * 10.0)
}

/// With `NF4_CPUTIME=1`: median wall time and mean process CPU time per call for the cases of
/// `benches/peers/bnb_nf4.py`, printed as the same table (CPU time stays meaningful on a shared machine).
fn cpu_time_table() {
    if std::env::var("NF4_CPUTIME").map_or(true, |v| v != "1") {
        return;
    }
    let reps = 20;
    for (rows, cols) in [(4096usize, 4096usize), (11008, 4096)] {
        let x = Tensor::randn(&[rows, cols], 0.02, 0, DType::BF16, Device::Cpu).unwrap();
        for dq in [false, true] {
            let q = QuantizedTensor::quantize(&x, &opts(dq)).unwrap();
            let scratch =
                std::cell::RefCell::new(Tensor::zeros(&[rows * cols], DType::BF16, Device::Cpu).unwrap());
            let cases: [Case; 3] = [
                (
                    "quantize  ",
                    Box::new(|| drop(QuantizedTensor::quantize(&x, &opts(dq)).unwrap())),
                ),
                (
                    "dequantize",
                    Box::new(|| drop(q.dequantize(DType::BF16).unwrap())),
                ),
                (
                    "dequantize_into",
                    Box::new(|| q.dequantize_into(&mut scratch.borrow_mut()).unwrap()),
                ),
            ];
            for (name, f) in cases {
                f();
                let c0 = process_cpu_ms().unwrap_or(0.0);
                let mut walls: Vec<f64> = (0..reps)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                let cpu = (process_cpu_ms().unwrap_or(0.0) - c0) / reps as f64;
                walls.sort_by(f64::total_cmp);
                println!(
                    "peft-kernels {name} nf4 bf16 {rows}x{cols} dq={dq:<5}  wall {:9.2} ms  cpu {cpu:9.2} ms",
                    walls[reps / 2]
                );
            }
        }
    }
}

fn cpu_benches(c: &mut Criterion) {
    cpu_time_table();
    let mut g = c.benchmark_group("nf4");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (rows, cols) in [(4096usize, 4096usize), (11008, 4096)] {
        let n = rows * cols;
        let x = Tensor::randn(&[rows, cols], 0.02, 1, DType::BF16, Device::Cpu).unwrap();
        let xs: Vec<bf16> = x.to_vec::<bf16>().unwrap();
        let size = format!("{rows}x{cols}");
        g.throughput(Throughput::Bytes(bytes_moved(n)));

        g.bench_function(BenchmarkId::new("cpu_quantize_bf16", &size), |b| {
            b.iter(|| QuantizedTensor::quantize(black_box(&x), &opts(false)).unwrap())
        });
        g.bench_function(BenchmarkId::new("cpu_quantize_bf16_dq", &size), |b| {
            b.iter(|| QuantizedTensor::quantize(black_box(&x), &opts(true)).unwrap())
        });
        let q = QuantizedTensor::quantize(&x, &opts(false)).unwrap();
        let qdq = QuantizedTensor::quantize(&x, &opts(true)).unwrap();
        g.bench_function(BenchmarkId::new("cpu_dequantize_bf16", &size), |b| {
            b.iter(|| black_box(&q).dequantize(DType::BF16).unwrap())
        });
        g.bench_function(BenchmarkId::new("cpu_dequantize_bf16_dq", &size), |b| {
            b.iter(|| black_box(&qdq).dequantize(DType::BF16).unwrap())
        });
        // Into a reused buffer: no allocation, no fresh pages (a training step's scratch buffer).
        let mut scratch = Tensor::zeros(&[n], DType::BF16, Device::Cpu).unwrap();
        g.bench_function(BenchmarkId::new("cpu_dequantize_into_bf16", &size), |b| {
            b.iter(|| black_box(&q).dequantize_into(&mut scratch).unwrap())
        });

        if rows == 4096 {
            // In-run baselines: the scalar single-threaded reference, and the portable / AVX2 paths.
            g.bench_function(BenchmarkId::new("cpu_reference_quantize_bf16", &size), |b| {
                b.iter(|| cpu::quantize_reference(black_box(&xs), QuantType::Nf4, 64).unwrap())
            });
            let (packed, absmax) = cpu::quantize_reference(&xs, QuantType::Nf4, 64).unwrap();
            g.bench_function(BenchmarkId::new("cpu_reference_dequantize_bf16", &size), |b| {
                b.iter(|| {
                    cpu::dequantize_reference::<bf16>(black_box(&packed), &absmax, QuantType::Nf4, 64, n)
                        .unwrap()
                })
            });
            for isa in Isa::available() {
                if isa == Isa::best() {
                    continue;
                }
                let name = format!("{isa:?}").to_lowercase();
                g.bench_function(
                    BenchmarkId::new(format!("cpu_{name}_quantize_bf16"), &size),
                    |b| {
                        b.iter(|| cpu::quantize(black_box(&xs), QuantType::Nf4, 64, isa, false, "x").unwrap())
                    },
                );
                g.bench_function(
                    BenchmarkId::new(format!("cpu_{name}_dequantize_bf16"), &size),
                    |b| {
                        b.iter(|| {
                            cpu::dequantize::<bf16>(black_box(&packed), &absmax, QuantType::Nf4, 64, n, isa)
                                .unwrap()
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

fn cuda_benches(c: &mut Criterion) {
    let dev = Device::cuda_if_available();
    if dev.is_cpu() {
        println!("nf4 CUDA benches: SKIPPED (no CUDA device)");
        return;
    }
    let mut g = c.benchmark_group("nf4");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (rows, cols, copies) in [(4096usize, 4096usize, 1usize), (11008, 4096, 1), (8192, 8192, 4)] {
        let n = rows * cols;
        let size = format!("{rows}x{cols}");
        // Several copies, used in turn, so that the 50 MB L2 never holds the operand of the next call.
        let xs: Vec<Tensor> = (0..copies)
            .map(|i| Tensor::randn(&[rows, cols], 0.02, i as u64, DType::BF16, dev).unwrap())
            .collect();
        let qs: Vec<QuantizedTensor> = xs
            .iter()
            .map(|x| QuantizedTensor::quantize(x, &opts(false)).unwrap())
            .collect();
        let qdqs: Vec<QuantizedTensor> = xs
            .iter()
            .map(|x| QuantizedTensor::quantize(x, &opts(true)).unwrap())
            .collect();
        g.throughput(Throughput::Bytes(bytes_moved(n)));
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("cuda_quantize_bf16", &size), |b| {
            b.iter(|| {
                i += 1;
                let q = QuantizedTensor::quantize(&xs[i % copies], &opts(false)).unwrap();
                dev.synchronize().unwrap();
                q
            })
        });
        g.bench_function(BenchmarkId::new("cuda_quantize_bf16_dq", &size), |b| {
            b.iter(|| {
                i += 1;
                let q = QuantizedTensor::quantize(&xs[i % copies], &opts(true)).unwrap();
                dev.synchronize().unwrap();
                q
            })
        });
        g.bench_function(BenchmarkId::new("cuda_dequantize_bf16", &size), |b| {
            b.iter(|| {
                i += 1;
                let d = qs[i % copies].dequantize(DType::BF16).unwrap();
                dev.synchronize().unwrap();
                d
            })
        });
        let mut scratch = Tensor::zeros(&[n], DType::BF16, dev).unwrap();
        g.bench_function(BenchmarkId::new("cuda_dequantize_into_bf16", &size), |b| {
            b.iter(|| {
                i += 1;
                qs[i % copies].dequantize_into(&mut scratch).unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("cuda_dequantize_bf16_dq", &size), |b| {
            b.iter(|| {
                i += 1;
                let d = qdqs[i % copies].dequantize(DType::BF16).unwrap();
                dev.synchronize().unwrap();
                d
            })
        });
        // Copy-bandwidth baseline over the same bytes: read bf16 and write bf16 (2n + 2n bytes; the
        // throughput is set to the bytes it really moves).
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_function(BenchmarkId::new("cuda_copy_baseline_bf16", &size), |b| {
            b.iter(|| {
                i += 1;
                let y = xs[i % copies].scale(1.0).unwrap();
                dev.synchronize().unwrap();
                y
            })
        });
    }
    g.finish();
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
