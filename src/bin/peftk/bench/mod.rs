//! `peftk bench`: named microbenchmarks printing one JSON line each,
//! `{"op","device","format","dtype","out","in","tokens","rank","algo","median_us","min_us","gbps",
//! "tflops","weight_copies","bw_frac"}` (gbps and tflops from the median), preceded on the CPU by one
//! `memory_bandwidth` line (best-of-5 read and copy over 1 GiB); `bw_frac` = gbps / read bandwidth.
//! Own timing loop: warm-up, N iterations, median and min, `Device::synchronize` around each call.
//! Weights rotate through 1 GiB (CPU) / 200 MiB (CUDA) of copies so caches do not flatter any format.
//! The weight-only rows (`quantize`, `dequantize`, `dequantize_into`; `tokens` 0, `tflops` null)
//! time the 4-bit conversions themselves; see `harness.rs` for what each case calls.

mod harness;
mod models;

use harness::{
    Runner, SHAPES, TOKENS, default_cases, host_bandwidth_gbps, rotation_bytes, time_median_us, time_stats_us,
};
use peft_kernels::{Device, Error, Result};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// cpu, cuda or cuda:N (default: cuda when available, else cpu).
    #[arg(long)]
    device: Option<Device>,
    /// Run only the cases whose name matches this regex. Names look like
    /// `forward/nf4/4096x4096/t1/r16/auto` (op/format/OUTxIN/tokens/LoRA rank/algorithm); ops are
    /// forward, backward_input, quantize, dequantize and dequantize_into. A filter that matches no case
    /// is an error.
    #[arg(long, value_name = "REGEX", value_parser = parse_filter)]
    filter: Option<regex::Regex>,
    /// Fewer iterations per case and no 512-token cases (a few seconds).
    #[arg(long)]
    quick: bool,
    /// Also the two MLP shapes of a 7B-class model, 11008x4096 and 4096x11008, after 4096x4096 (also
    /// turned on by the environment variable PEFT_KERNELS_BENCH_FULL=1).
    #[arg(long)]
    full: bool,
    /// Run every case at this one weight shape `OUTxIN` (e.g. 512x4096) instead of the default
    /// shapes; both sides at least 1.
    #[arg(long, value_name = "OUTxIN", value_parser = parse_shape)]
    shape: Option<(usize, usize)>,
    /// Token counts of the forward and backward cases, comma separated (e.g. 1,16), instead of
    /// 1,16,512; each at least 1.
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = parse_tokens)]
    tokens: Option<Vec<usize>>,
    /// MiB of weight copies each case rotates through, so that every call reads its weight from
    /// memory rather than cache (default: 1024 on the CPU, 200 on CUDA). 0 = one copy, cache-resident
    /// when it fits, to measure compute throughput.
    #[arg(long, value_name = "MIB")]
    rotate_mib: Option<usize>,
}

fn parse_filter(s: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| e.to_string())
}

fn parse_shape(s: &str) -> std::result::Result<(usize, usize), String> {
    let (o, i) = s
        .split_once('x')
        .and_then(|(o, i)| Some((o.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
        .ok_or_else(|| format!("{s:?} is not OUTxIN (e.g. 512x4096)"))?;
    if o == 0 || i == 0 {
        return Err(format!("{s:?}: both sides must be at least 1"));
    }
    Ok((o, i))
}

fn parse_tokens(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("token counts must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device.unwrap_or_else(Device::cuda_if_available);
    device.check()?;
    let full = args.full || std::env::var("PEFT_KERNELS_BENCH_FULL").is_ok_and(|v| v == "1");
    let mut cases = if args.shape.is_none() && args.tokens.is_none() {
        default_cases(device, full, args.quick)
    } else {
        let shapes = match args.shape {
            Some(s) => vec![s],
            None if full => SHAPES.to_vec(),
            None => SHAPES[..1].to_vec(),
        };
        let quick_tokens = &TOKENS[..2];
        let tokens = args
            .tokens
            .as_deref()
            .unwrap_or(if args.quick { quick_tokens } else { &TOKENS });
        harness::cases(device, &shapes, tokens)
    };
    if let Some(f) = &args.filter {
        cases.retain(|c| f.is_match(&c.name()));
        if cases.is_empty() && !models::any_match(f) {
            return Err(Error::InvalidArgument(format!(
                "--filter {:?} matches no case (names look like forward/nf4/4096x4096/t1/r16/auto)",
                f.as_str()
            )));
        }
    }
    let mut stdout = std::io::stdout().lock();
    // CPU: the read bandwidth every GEMV line is compared with (`bw_frac`); not measured when only
    // the model rows run (its 1 GiB buffer would dominate their peak memory and page faults).
    let mut read_bw = None;
    if device.is_cpu() && !cases.is_empty() {
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
        let rot = args
            .rotate_mib
            .map_or(rotation_bytes(device), |m| m.saturating_mul(1 << 20));
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
            "tflops": if !case.op.takes_tokens() { serde_json::Value::Null } else { ((case.flops() / secs / 1e12 * 1e4).round() / 1e4).into() },
            "weight_copies": runner.copies(),
            "bw_frac": read_bw.map(|bw| round(case.bytes() / secs / 1e9 / bw)),
        });
        writeln!(stdout, "{line}").map_err(|e| Error::Io {
            path: "stdout".into(),
            source: e,
        })?;
    }
    models::run(device, args.quick, args.filter.as_ref(), &mut stdout)?;
    Ok(())
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
