//! `peftk bench`: named microbenchmarks printing one JSON line each,
//! `{"op","device","format","dtype","out","in","tokens","rank","algo","median_us","gbps","tflops"}`,
//! preceded by one `memory_bandwidth` line (CPU) so the GEMV GB/s can be read as a fraction of it.
//! Own timing loop: warm-up, N iterations, median, `Device::synchronize` around each call.

use peft_kernels::qmatmul::bench::{Case, Op, Runner, default_cases, host_bandwidth_gbps, rotation_bytes, time_median_us};
use peft_kernels::{Device, Error, Result};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// cpu, cuda or cuda:N (default: cuda when available, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Only cases whose name (`forward/nf4/4096x4096/t1/r16/auto`) matches this regex.
    #[arg(long)]
    filter: Option<String>,
    /// Fewer iterations and no 512-token cases (a few seconds).
    #[arg(long)]
    quick: bool,
    /// Also the 11008x4096 and 4096x11008 shapes (or set PEFT_KERNELS_BENCH_FULL=1).
    #[arg(long)]
    full: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = match &args.device {
        Some(d) => d.parse::<Device>()?,
        None => Device::cuda_if_available(),
    };
    device.check()?;
    let filter = args
        .filter
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::InvalidArgument(format!("--filter: {e}")))?;
    let full = args.full || std::env::var("PEFT_KERNELS_BENCH_FULL").is_ok_and(|v| v == "1");
    let cases: Vec<Case> = default_cases(device, full, args.quick)
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|f| f.is_match(&c.name())))
        .collect();
    let mut stdout = std::io::stdout().lock();
    if device.is_cpu() && filter.as_ref().is_none_or(|f| f.is_match("memory_bandwidth")) {
        let (read, copy) = host_bandwidth_gbps(256 << 20);
        let line = serde_json::json!({
            "op": "memory_bandwidth", "device": device.to_string(), "buffer_mib": 256,
            "read_gbps": round(read), "copy_gbps": round(copy),
        });
        writeln!(stdout, "{line}").map_err(|e| Error::Io { path: "stdout".into(), source: e })?;
    }
    for case in cases {
        let mut runner = Runner::new(case, device, rotation_bytes(device))?;
        // Iterations: enough for a stable median, bounded by ~2 s per case.
        let probe = time_median_us(device, 1, 1, || runner.run().map(|_| ()))?;
        let budget_us = if args.quick { 3e5 } else { 1.5e6 };
        let iters = ((budget_us / probe.max(1.0)) as usize).clamp(3, 200);
        let warmup = (iters / 10).max(1);
        let us = time_median_us(device, warmup, iters, || runner.run().map(|_| ()))?;
        let secs = us * 1e-6;
        let line = serde_json::json!({
            "op": case.op.as_str(),
            "device": device.to_string(),
            "format": case.format.as_str(),
            "dtype": case.format.act_dtype().as_str(),
            "out": case.out,
            "in": case.inp,
            "tokens": case.tokens,
            "rank": case.rank,
            "algo": case.name().rsplit('/').next().unwrap_or("auto"),
            "median_us": round(us),
            "gbps": round(case.bytes() / secs / 1e9),
            "tflops": if case.op == Op::Dequantize { serde_json::Value::Null } else { ((case.flops() / secs / 1e12 * 1e4).round() / 1e4).into() },
            "weight_copies": runner.copies(),
        });
        writeln!(stdout, "{line}").map_err(|e| Error::Io { path: "stdout".into(), source: e })?;
    }
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
