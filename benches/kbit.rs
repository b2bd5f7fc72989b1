//! The fused linear over each storage tier (criterion group `kbit`): `y = x·Wᵀ` at W 1024×1024,
//! 64 tokens (f32 activations), against the dense f32 gemm in the same run.
//!
//! Bytes and FLOPs per call: every case does 2·64·1024² = 134 MFLOP of gemm. The weight read is
//! 4 MiB for dense f32, 2 MiB for the bf16 tier, 1 MiB + 16 KiB scales for int8, 0.5 MiB + scales for
//! NF4, 384 KiB for 3-bit and 256 KiB for 2-bit (+ 16 Ki double-quantized scales, ~17 KiB); x and y
//! are 256 KiB each. The quantized tiers also decode 1 Mi weights per call into f32 panels (the CPU
//! path: dequantized panels + gemm), so on the CPU they cost more than dense, not less: the win of a
//! narrow tier is memory, and time only where W streams from DRAM (the GEMV decode path, ≤ 16 tokens).
//!
//!     cargo bench --bench kbit                 # CPU
//!     cargo bench --bench kbit --features cuda # plus CUDA when a GPU is present

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peft_kernels::kbit::{KBitTensor, Tier};
use peft_kernels::qmatmul::{Algo, BaseWeight, linear_forward};
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Tensor};
use std::hint::black_box;
use std::time::Duration;

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if peft_kernels::cuda_device_count() > 0 {
        d.push(Device::Cuda(0));
    }
    d
}

fn bench(c: &mut Criterion) {
    let (out, inp, tokens) = (1024usize, 1024usize, 64usize);
    let mut g = c.benchmark_group("kbit");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements((2 * tokens * out * inp) as u64));
    let opts = QuantizeOptions::default();
    for dev in devices() {
        let w = Tensor::randn(&[out, inp], 0.02, 1, DType::F32, dev).unwrap();
        let x = Tensor::randn(&[tokens, inp], 1.0, 2, DType::F32, dev).unwrap();
        let mut cases: Vec<(String, BaseWeight)> = vec![("dense-f32".into(), BaseWeight::Dense(w.clone()))];
        for tier in Tier::ALL {
            let bw = match tier {
                Tier::Bits4 => BaseWeight::Quantized(QuantizedTensor::quantize(&w, &opts).unwrap()),
                t => BaseWeight::KBit(KBitTensor::quantize(&w, t.bits(), &opts).unwrap()),
            };
            cases.push((format!("{}-{}B", bw.format_name(), bw.size_in_bytes()), bw));
        }
        for (name, bw) in &cases {
            g.bench_with_input(BenchmarkId::new(format!("forward-{dev}"), name), bw, |b, bw| {
                b.iter(|| {
                    let y = linear_forward(&x, bw, None, None, Algo::Auto).unwrap();
                    dev.synchronize().unwrap();
                    black_box(y)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(kbit_benches, bench);
criterion_main!(kbit_benches);
