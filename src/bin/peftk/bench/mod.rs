//! `peftk bench`: named microbenchmarks printing one JSON line each,
//! `{"op","device","format","dtype","out","in","tokens","rank","algo","median_us","min_us","gbps",
//! "tflops","weight_copies","bw_frac"}` (gbps and tflops from the median), preceded on the CPU by one
//! `memory_bandwidth` line (best-of-5 read and copy over 1 GiB); `bw_frac` = gbps / read bandwidth.
//! Own timing loop: warm-up, N iterations, median and min, `Device::synchronize` around each call.
//! Weights rotate through 1 GiB (CPU) / 200 MiB (CUDA) of copies so caches do not flatter any format.

mod harness;

use harness::{
    Case, Op, Runner, default_cases, host_bandwidth_gbps, rotation_bytes, time_median_us, time_stats_us,
};
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
    /// Replace the shapes with one `OUTxIN` (e.g. 512x4096).
    #[arg(long)]
    shape: Option<String>,
    /// Replace the token counts with this list (e.g. 1,16).
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<usize>>,
    /// MiB of weight copies to rotate through (default: 1024 on the CPU, 200 on CUDA; 0 = one copy,
    /// i.e. cache-resident when it fits, to measure compute throughput).
    #[arg(long)]
    rotate_mib: Option<usize>,
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
    let shape = args
        .shape
        .as_deref()
        .map(|s| {
            s.split_once('x')
                .and_then(|(o, i)| Some((o.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
                .ok_or_else(|| Error::InvalidArgument(format!("--shape {s:?}: expected OUTxIN")))
        })
        .transpose()?;
    let cases: Vec<Case> = default_cases(device, full, args.quick)
        .into_iter()
        .map(|mut c| {
            if let Some((o, i)) = shape {
                (c.out, c.inp) = (o, i);
            }
            c
        })
        .filter(|c| args.tokens.as_ref().is_none_or(|t| t.contains(&c.tokens)) || c.op == Op::Dequantize)
        .collect::<Vec<_>>()
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|f| f.is_match(&c.name())))
        .collect();
    let mut stdout = std::io::stdout().lock();
    // CPU: the read bandwidth every GEMV line is compared with (`bw_frac`).
    let mut read_bw = None;
    if device.is_cpu() {
        let (read, copy) = host_bandwidth_gbps(1 << 30);
        read_bw = Some(read);
        let line = serde_json::json!({
            "op": "memory_bandwidth", "device": device.to_string(), "buffer_mib": 1024,
            "read_gbps": round(read), "copy_gbps": round(copy),
        });
        writeln!(stdout, "{line}").map_err(|e| Error::Io {
            path: "stdout".into(),
            source: e,
        })?;
    }
    for case in cases {
        let rot = args.rotate_mib.map_or(rotation_bytes(device), |m| m << 20);
        let mut runner = Runner::new(case, device, rot)?;
        // Iterations: enough for a stable median within ~0.6 s per case (the default run stays under a
        // minute on a 2-core machine).
        let probe = time_median_us(device, 1, 1, || runner.run().map(|_| ()))?;
        let budget_us = if args.quick { 3e5 } else { 6e5 };
        let iters = ((budget_us / probe.max(1.0)) as usize).clamp(3, 200);
        let warmup = (iters / 10).max(1);
        let (us, min_us) = time_stats_us(device, warmup, iters, || runner.run().map(|_| ()))?;
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
            "min_us": round(min_us),
            "gbps": round(case.bytes() / secs / 1e9),
            "tflops": if case.op == Op::Dequantize { serde_json::Value::Null } else { ((case.flops() / secs / 1e12 * 1e4).round() / 1e4).into() },
            "weight_copies": runner.copies(),
            "bw_frac": read_bw.map(|bw| round(case.bytes() / secs / 1e9 / bw)),
        });
        writeln!(stdout, "{line}").map_err(|e| Error::Io {
            path: "stdout".into(),
            source: e,
        })?;
    }
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
