//! Criterion group `qlinear`: the fused 4-bit linear (NF4, NF4 double-quant, FP4) + LoRA r=16 against
//! dense bf16 and f32 + LoRA, forward and backward-input, at 1, 16 and 512 tokens; on CUDA also the
//! 8192² GEMV (4+ rotated weight copies against the 50 MB L2) and a 4096-token training step, fused
//! against dequantize + cuBLAS. Each case includes the LoRA projection GEMM (`u = s·x·Aᵀ` or
//! `v = s·dy·B`) a QLoRA layer runs with it.
//!
//! Default (CPU): only 4096x4096. `PEFT_KERNELS_BENCH_FULL=1` adds 11008x4096 and 4096x11008.
//! After the criterion measurements, a summary in the same run prints, per (op, shape, tokens), every
//! format's median and its ratio to dense bf16 and f32, plus the measured memory bandwidth (CPU) so
//! the GEMV GB/s can be read as a fraction of it.
//!
//! Run: `cargo bench --bench qlinear` (add `--features cuda` on a GPU machine).

// The case list, weights and timing loop that `peftk bench` uses, compiled into this bench too (it is
// not library API).
#[allow(dead_code)]
#[path = "../src/bin/peftk/bench/harness.rs"]
mod harness;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use harness::{Case, Format, Runner, default_cases, host_bandwidth_gbps, rotation_bytes, time_median_us};
use peft_kernels::Device;
use peft_kernels::qmatmul::Algo;
use std::collections::BTreeMap;
use std::time::Duration;

fn full() -> bool {
    std::env::var("PEFT_KERNELS_BENCH_FULL").is_ok_and(|v| v == "1")
}

fn device() -> Device {
    Device::cuda_if_available()
}

fn qlinear(c: &mut Criterion) {
    let dev = device();
    let mut group = c.benchmark_group("qlinear");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for case in default_cases(dev, full(), false) {
        let mut runner = match Runner::new(case, dev, rotation_bytes(dev)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping {}: {e}", case.name());
                continue;
            }
        };
        group.throughput(Throughput::Bytes(case.bytes() as u64));
        group.bench_function(format!("{dev}/{}", case.name()), |b| {
            b.iter(|| {
                let y = runner.run().expect("benchmark case failed");
                dev.synchronize().expect("synchronize failed");
                y
            })
        });
    }
    group.finish();
    summary(dev);
}

/// (op, out, in, tokens): the cases whose ratios are compared.
type GroupKey = (String, usize, usize, usize);

/// Medians of every case in this run, and the ratios the benchmark exists for.
fn summary(dev: Device) {
    println!("\n=== qlinear summary ({dev}) ===");
    let read_bw = dev.is_cpu().then(|| {
        let (read, copy) = host_bandwidth_gbps(1 << 30);
        println!("measured memory bandwidth (1 GiB, all threads): read {read:.1} GB/s, copy {copy:.1} GB/s");
        read
    });
    let mut by_key: BTreeMap<GroupKey, Vec<(Case, f64)>> = BTreeMap::new();
    for case in default_cases(dev, full(), false) {
        let Ok(mut r) = Runner::new(case, dev, rotation_bytes(dev)) else {
            continue;
        };
        let probe = time_median_us(dev, 1, 1, || r.run().map(|_| ())).unwrap_or(f64::NAN);
        let iters = ((1e6 / probe.max(1.0)) as usize).clamp(3, 100);
        let Ok(us) = time_median_us(dev, 1, iters, || r.run().map(|_| ())) else {
            continue;
        };
        by_key
            .entry((case.op.as_str().to_string(), case.out, case.inp, case.tokens))
            .or_default()
            .push((case, us));
    }
    for ((op, out, inp, tokens), cases) in by_key {
        let find = |f: Format| cases.iter().find(|(c, _)| c.format == f).map(|x| x.1);
        let (bf16, f32) = (find(Format::Bf16), find(Format::F32));
        println!("{op} {out}x{inp} tokens={tokens}:");
        for (c, us) in &cases {
            let algo = match c.algo {
                Algo::Auto => "auto",
                Algo::Fused => "fused",
                Algo::DequantGemm => "dequant+gemm",
                Algo::Bf16 => "bf16",
            };
            let gbps = c.bytes() / (us * 1e-6) / 1e9;
            let mut line = format!(
                "  {:7} {:13} {:10.1} us {:8.2} GB/s",
                c.format.as_str(),
                algo,
                us,
                gbps
            );
            if let Some(bw) = read_bw {
                line.push_str(&format!(" ({:3.0}% of read bw)", 100.0 * gbps / bw));
            }
            if let Some(b) = bf16.filter(|_| c.format != Format::Bf16) {
                line.push_str(&format!("  {:6.2}x vs bf16", b / us));
            }
            if let Some(f) = f32.filter(|_| c.format != Format::F32) {
                line.push_str(&format!("  {:6.2}x vs f32", f / us));
            }
            println!("{line}");
        }
    }
}

criterion_group!(benches, qlinear);
criterion_main!(benches);
