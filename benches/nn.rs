//! Transformer ops at MiniLM's training shapes (batch 16 x seq 64 = 1024 tokens, hidden 384, vocab
//! 30522), CPU and (when present) CUDA, with a same-bytes copy as the baseline.
//!
//! Napkin math (f32): LayerNorm forward reads x and writes y, 2 x 1.5 MB; its backward reads x and
//! dy and writes dx, 3 x 1.5 MB; an embedding gather reads 1024 table rows and writes them, 2 x 1.5 MB.
//! At the ~10-20 GB/s two cores stream from L2/L3, each is a 0.1-0.4 ms pass; the `copy` baseline
//! (`Tensor::scale(1.0)` of the same activation: read 1.5 MB + write 1.5 MB) shows how close to the
//! copy rate the ops run.
//!
//!     cargo bench --bench nn

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use peft_kernels::nn;
use peft_kernels::{DType, Device, Tensor};

const TOKENS: usize = 16 * 64;
const HIDDEN: usize = 384;
const VOCAB: usize = 30522;

fn bench_device(c: &mut Criterion, dev: Device, tag: &str) {
    let mut group = c.benchmark_group("nn");
    group.sample_size(20);
    let sync = || {
        if dev.is_cuda() {
            dev.synchronize().expect("sync");
        }
    };
    let act_bytes = (TOKENS * HIDDEN * 4) as u64;
    let x = Tensor::randn(&[TOKENS, HIDDEN], 1.0, 1, DType::F32, dev).expect("x");
    let dy = Tensor::randn(&[TOKENS, HIDDEN], 1.0, 2, DType::F32, dev).expect("dy");
    let w = Tensor::randn(&[HIDDEN], 0.1, 3, DType::F32, dev).expect("w");
    let b = Tensor::randn(&[HIDDEN], 0.1, 4, DType::F32, dev).expect("b");
    let table = Tensor::randn(&[VOCAB, HIDDEN], 0.05, 5, DType::F32, dev).expect("table");
    let ids: Vec<u32> = (0..TOKENS as u64)
        .map(|i| ((i * 7919) % VOCAB as u64) as u32)
        .collect();

    group.throughput(Throughput::Bytes(2 * act_bytes));
    group.bench_function(format!("copy_{tag}_f32_1024x384"), |bch| {
        bch.iter(|| {
            let _ = x.scale(1.0).expect("copy");
            sync();
        })
    });
    group.bench_function(format!("layer_norm_fwd_{tag}_f32_1024x384"), |bch| {
        bch.iter(|| {
            let _ = nn::layer_norm_forward(&x, &w, &b, 1e-12).expect("ln");
            sync();
        })
    });
    group.bench_function(format!("embedding_{tag}_f32_1024x384"), |bch| {
        bch.iter(|| {
            let _ = nn::embedding(&table, &ids).expect("embedding");
            sync();
        })
    });
    let (_, saved) = nn::layer_norm_forward(&x, &w, &b, 1e-12).expect("ln");
    group.throughput(Throughput::Bytes(3 * act_bytes));
    group.bench_function(format!("layer_norm_bwd_{tag}_f32_1024x384"), |bch| {
        bch.iter(|| {
            let _ = nn::layer_norm_backward(&x, &dy, &saved).expect("ln bwd");
            sync();
        })
    });
    let xb = x.to_dtype(DType::BF16).expect("bf16");
    group.throughput(Throughput::Bytes(act_bytes));
    group.bench_function(format!("layer_norm_fwd_{tag}_bf16_1024x384"), |bch| {
        bch.iter(|| {
            let _ = nn::layer_norm_forward(&xb, &w, &b, 1e-12).expect("ln");
            sync();
        })
    });
    group.finish();
}

fn nn_ops(c: &mut Criterion) {
    bench_device(c, Device::Cpu, "cpu");
    let dev = Device::cuda_if_available();
    if dev.is_cuda() {
        bench_device(c, dev, "cuda");
    }
}

criterion_group!(benches, nn_ops);
criterion_main!(benches);
