//! Benchmark setup shared by `benches/qlinear.rs` (criterion) and `peftk bench`: weight formats,
//! random weights, the LoRA-style call sequence of one case, byte/FLOP counts and a plain timing loop.
//!
//! A "forward" case is what a QLoRA layer does per call: `u = s·x·Aᵀ` (the small LoRA GEMM, through
//! `Tensor::matmul_t`) then `linear_forward(x, W, bias = None, u·bᵀ)`. A "backward_input" case is
//! `v = s·dy·B` then `linear_backward_input(dy, W, v·a)`. The LoRA weight gradients (dA, dB) are not
//! part of either. Weights are random codes with random scales: speed does not depend on the values.
//!
//! The weight-only cases (no tokens) time the conversions of `quant`: `quantize` (a bf16 `[out, in]`
//! weight to the case's 4-bit format), `dequantize` (`BaseWeight::dequantize` into a fresh tensor,
//! whose first-touch page faults are part of what a caller pays) and `dequantize_into` (into one
//! preallocated tensor, reused by every call).

use peft_kernels::qmatmul::{
    Algo, BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward,
};
use peft_kernels::quant::{
    Absmax, NESTED_BLOCKSIZE, QuantState, QuantType, QuantizeOptions, QuantizedTensor,
};
use peft_kernels::rng::Rng;
use peft_kernels::{DType, Device, Error, Result, Tensor};
use std::time::Instant;

/// A base-weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Nf4,
    Nf4Dq,
    Fp4,
    Bf16,
    F16,
    F32,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Nf4,
        Format::Nf4Dq,
        Format::Fp4,
        Format::Bf16,
        Format::F16,
        Format::F32,
    ];

    /// `nf4`, `nf4-dq`, `fp4`, `bf16`, `f16`, `f32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Nf4 => "nf4",
            Format::Nf4Dq => "nf4-dq",
            Format::Fp4 => "fp4",
            Format::Bf16 => "bf16",
            Format::F16 => "f16",
            Format::F32 => "f32",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Format::Nf4 | Format::Nf4Dq | Format::Fp4)
    }

    /// The activation dtype benchmarked with this format (4-bit formats run with bf16 activations,
    /// as in QLoRA training).
    pub fn act_dtype(self) -> DType {
        match self {
            Format::F32 => DType::F32,
            Format::F16 => DType::F16,
            _ => DType::BF16,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("unknown format {s:?} (nf4, nf4-dq, fp4, bf16, f16, f32)"))
            })
    }
}

/// A random bitsandbytes-layout 4-bit `[out, inp]` weight: uniform random codes, absmax in [0.02, 0.1)
/// (typical of bf16 LLM weights), optionally double-quantized with random nested codes.
pub fn random_quantized(
    quant_type: QuantType,
    out: usize,
    inp: usize,
    blocksize: usize,
    double_quant: bool,
    seed: u64,
    device: Device,
) -> Result<QuantizedTensor> {
    let mut rng = Rng::new(seed);
    let n = out
        .checked_mul(inp)
        .ok_or_else(|| Error::InvalidArgument("weight size overflows".into()))?;
    let nblocks = n.div_ceil(blocksize);
    let data: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next_u64() as u8).collect();
    let absmax = if double_quant {
        let codes: Vec<u8> = (0..nblocks).map(|_| rng.next_u64() as u8).collect();
        let nn = nblocks.div_ceil(NESTED_BLOCKSIZE);
        let nested: Vec<f32> = (0..nn).map(|_| rng.uniform_range(0.01, 0.05)).collect();
        // A monotone signed code book in [-1, 1] shaped like the dynamic map (any valid codes work).
        let nested_code: Vec<f32> = (0..256).map(|i| ((i as f32 - 127.5) / 127.5).powi(3)).collect();
        Absmax::Double {
            codes: Tensor::from_vec(codes, &[nblocks], device)?,
            nested_absmax: Tensor::from_vec(nested, &[nn], device)?,
            offset: 0.06,
            nested_code,
            nested_blocksize: NESTED_BLOCKSIZE,
        }
    } else {
        let a: Vec<f32> = (0..nblocks).map(|_| rng.uniform_range(0.02, 0.1)).collect();
        Absmax::F32(Tensor::from_vec(a, &[nblocks], device)?)
    };
    Ok(QuantizedTensor {
        data: Tensor::from_vec(data, &[n.div_ceil(2)], device)?,
        state: QuantState {
            quant_type,
            blocksize,
            code: *quant_type.code(),
            dtype: DType::BF16,
            shape: vec![out, inp],
            absmax,
        },
    })
}

/// A random `[out, inp]` base weight of `format` (4-bit formats use blocksize 64, bitsandbytes' default).
pub fn random_weight(
    format: Format,
    out: usize,
    inp: usize,
    seed: u64,
    device: Device,
) -> Result<BaseWeight> {
    let q = |ty, double_quant| random_quantized(ty, out, inp, 64, double_quant, seed, device);
    Ok(match format {
        Format::Nf4 => BaseWeight::Quantized(q(QuantType::Nf4, false)?),
        Format::Nf4Dq => BaseWeight::Quantized(q(QuantType::Nf4, true)?),
        Format::Fp4 => BaseWeight::Quantized(q(QuantType::Fp4, false)?),
        Format::Bf16 | Format::F16 | Format::F32 => BaseWeight::Dense(Tensor::randn(
            &[out, inp],
            0.02,
            seed,
            format.act_dtype(),
            device,
        )?),
    })
}

fn copy_tensor(t: &Tensor) -> Result<Tensor> {
    Tensor::from_bytes(&t.to_bytes()?, t.dtype(), t.shape(), t.device())
}

/// A copy of `w` in fresh memory.
fn deep_copy(w: &BaseWeight) -> Result<BaseWeight> {
    Ok(match w {
        BaseWeight::Dense(t) => BaseWeight::Dense(copy_tensor(t)?),
        BaseWeight::Quantized(q) => BaseWeight::Quantized(q.try_map_tensors(copy_tensor)?),
        BaseWeight::KBit(k) => BaseWeight::KBit(k.try_map_tensors(copy_tensor)?),
    })
}

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// LoRA projection `u = s·x·Aᵀ` + `linear_forward` with `u·bᵀ`.
    Forward,
    /// LoRA projection `v = s·dy·B` + `linear_backward_input` with `v·a`.
    BackwardInput,
    /// `BaseWeight::dequantize` to the activation dtype (a fresh output tensor per call).
    Dequantize,
    /// `QuantizedTensor::dequantize_into` one preallocated output tensor of the activation dtype.
    DequantizeInto,
    /// `QuantizedTensor::quantize` of a bf16 weight to the case's 4-bit format.
    Quantize,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Forward => "forward",
            Op::BackwardInput => "backward_input",
            Op::Dequantize => "dequantize",
            Op::DequantizeInto => "dequantize_into",
            Op::Quantize => "quantize",
        }
    }

    /// Forward and backward-input take activations (tokens); the other ops convert a weight.
    pub fn takes_tokens(self) -> bool {
        matches!(self, Op::Forward | Op::BackwardInput)
    }
}

/// bitsandbytes' defaults for a 4-bit `format` (blocksize 64; double quantization for `nf4-dq`).
fn quantize_options(format: Format) -> Result<QuantizeOptions> {
    let (quant_type, double_quant) = match format {
        Format::Nf4 => (QuantType::Nf4, false),
        Format::Nf4Dq => (QuantType::Nf4, true),
        Format::Fp4 => (QuantType::Fp4, false),
        other => {
            return Err(Error::InvalidArgument(format!(
                "{} is not a 4-bit format",
                other.as_str()
            )));
        }
    };
    Ok(QuantizeOptions {
        quant_type,
        blocksize: 64,
        double_quant,
        ..Default::default()
    })
}

/// One benchmark configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Case {
    pub op: Op,
    pub format: Format,
    pub out: usize,
    pub inp: usize,
    pub tokens: usize,
    /// LoRA rank (0: no adapter).
    pub rank: usize,
    pub algo: Algo,
}

impl Case {
    /// A case of `op` on an `[out, in]` weight of `format` at `tokens` tokens, LoRA `rank` and `algo`.
    pub fn new(
        op: Op,
        format: Format,
        (out, inp): (usize, usize),
        tokens: usize,
        rank: usize,
        algo: Algo,
    ) -> Case {
        Case {
            op,
            format,
            out,
            inp,
            tokens,
            rank,
            algo,
        }
    }

    /// `forward/nf4/4096x4096/t1/r16/auto`: what `--filter` matches against.
    pub fn name(&self) -> String {
        let algo = match self.algo {
            Algo::Auto => "auto",
            Algo::Fused => "fused",
            Algo::DequantGemm => "dequant-gemm",
            Algo::Bf16 => "bf16",
        };
        format!(
            "{}/{}/{}x{}/t{}/r{}/{algo}",
            self.op.as_str(),
            self.format.as_str(),
            self.out,
            self.inp,
            self.tokens,
            self.rank
        )
    }

    fn weight_bytes(&self) -> f64 {
        let n = (self.out * self.inp) as f64;
        match self.format {
            Format::Nf4 | Format::Fp4 => n * 0.5 + n / 64.0 * 4.0,
            Format::Nf4Dq => n * 0.5 + n / 64.0 + n / 64.0 / 256.0 * 4.0,
            Format::Bf16 | Format::F16 => n * 2.0,
            Format::F32 => n * 4.0,
        }
    }

    /// (tokens, out, in, rank) as f64.
    fn dims(&self) -> (f64, f64, f64, f64) {
        let f = |n: usize| n as f64;
        (f(self.tokens), f(self.out), f(self.inp), f(self.rank))
    }

    /// Minimum bytes moved (weight once, activations in and out, LoRA factors).
    pub fn bytes(&self) -> f64 {
        let e = self.format.act_dtype().size_in_bytes() as f64;
        let (t, o, i, r) = self.dims();
        match self.op {
            Op::Dequantize | Op::DequantizeInto | Op::Quantize => self.weight_bytes() + o * i * e,
            Op::Forward | Op::BackwardInput => self.weight_bytes() + t * (o + i) * e + r * (o + i) * e,
        }
    }

    /// Useful FLOPs (2 per multiply-add; LoRA included).
    pub fn flops(&self) -> f64 {
        let (t, o, i, r) = self.dims();
        match self.op {
            Op::Dequantize | Op::DequantizeInto | Op::Quantize => 0.0,
            Op::Forward | Op::BackwardInput => 2.0 * t * o * i + 2.0 * t * r * (o + i),
        }
    }
}

/// Prepared operands of a case; `weights` rotate so repeated calls do not hit a warm cache (for
/// `quantize` they are the dense bf16 inputs).
pub struct Runner {
    case: Case,
    weights: Vec<BaseWeight>,
    /// The reused output of `dequantize_into`.
    out: Option<Tensor>,
    next: usize,
    act: Tensor,
    a: Tensor,
    b: Tensor,
    scale: f32,
}

impl Runner {
    /// Builds the operands. `min_footprint` bytes of weight copies are rotated through (at least one).
    pub fn new(case: Case, device: Device, min_footprint: usize) -> Result<Runner> {
        let w0 = if case.op == Op::Quantize {
            quantize_options(case.format)?;
            BaseWeight::Dense(Tensor::randn(
                &[case.out, case.inp],
                0.02,
                1,
                DType::BF16,
                device,
            )?)
        } else {
            random_weight(case.format, case.out, case.inp, 1, device)?
        };
        // Above 16 tokens the product is compute-bound (≥ 64 FLOP per weight byte): where the weight
        // comes from does not matter, and one copy saves the setup time.
        let min_footprint = if case.tokens > 16 { 0 } else { min_footprint };
        let copies = min_footprint.div_ceil(w0.size_in_bytes().max(1)).clamp(1, 256);
        let mut weights = Vec::with_capacity(copies);
        for _ in 1..copies {
            // Same values, distinct memory: only the footprint matters for the timing.
            weights.push(deep_copy(&w0)?);
        }
        weights.push(w0);
        let dt = case.format.act_dtype();
        let k = if case.op == Op::BackwardInput {
            case.out
        } else {
            case.inp
        };
        let act = Tensor::randn(&[case.tokens, k], 1.0, 7, dt, device)?;
        let r = case.rank;
        let a = Tensor::randn(&[r, case.inp], 0.02, 8, dt, device)?;
        let b = Tensor::randn(&[case.out, r], 0.02, 9, dt, device)?;
        let out = if case.op == Op::DequantizeInto {
            Some(Tensor::zeros(&[case.out, case.inp], dt, device)?)
        } else {
            None
        };
        Ok(Runner {
            case,
            weights,
            out,
            next: 0,
            act,
            a,
            b,
            scale: 2.0,
        })
    }

    /// Number of rotated weight copies.
    pub fn copies(&self) -> usize {
        self.weights.len()
    }

    /// One call of the case (asynchronous on CUDA: synchronize before reading a clock). Returns the
    /// result tensor (the packed codes for `quantize`; none for `dequantize_into`).
    pub fn run(&mut self) -> Result<Option<Tensor>> {
        let w = &self.weights[self.next];
        self.next = (self.next + 1) % self.weights.len();
        let c = self.case;
        let wrong = || Error::InvalidArgument(format!("{}: operands of another case", c.name()));
        match c.op {
            Op::Dequantize => w.dequantize(c.format.act_dtype()).map(Some),
            Op::DequantizeInto => match (w, self.out.as_mut()) {
                (BaseWeight::Quantized(q), Some(out)) => q.dequantize_into(out).map(|()| None),
                _ => Err(wrong()),
            },
            Op::Quantize => match w {
                BaseWeight::Dense(x) => {
                    QuantizedTensor::quantize(x, &quantize_options(c.format)?).map(|q| Some(q.data))
                }
                BaseWeight::Quantized(_) | BaseWeight::KBit(_) => Err(wrong()),
            },
            Op::Forward => {
                if c.rank == 0 {
                    return linear_forward(&self.act, w, None, None, c.algo).map(Some);
                }
                let u = self.act.matmul_t(&self.a, false, true)?.scale(self.scale)?;
                linear_forward(&self.act, w, None, Some(LowRankFwd { u: &u, b: &self.b }), c.algo).map(Some)
            }
            Op::BackwardInput => {
                if c.rank == 0 {
                    return linear_backward_input(&self.act, w, None, c.algo).map(Some);
                }
                let v = self.act.matmul(&self.b)?.scale(self.scale)?;
                linear_backward_input(&self.act, w, Some(LowRankBwd { v: &v, a: &self.a }), c.algo).map(Some)
            }
        }
    }
}

/// Median wall time in µs of `iters` calls after `warmup` calls, synchronizing `device` around each.
pub fn time_median_us(
    device: Device,
    warmup: usize,
    iters: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    Ok(time_stats_us(device, warmup, iters, f)?.0)
}

/// `(median, min)` wall time in µs of `iters` calls after `warmup` calls. On a shared machine the
/// minimum is the better estimate of the uncontended time; the median is what a user sees.
pub fn time_stats_us(
    device: Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// Measured host memory bandwidth in GB/s: `(read, copy)`. Read: all rayon threads sum disjoint
/// parts of a `bytes` buffer (what a GEMV does); copy: `memcpy` of half the buffer into the other
/// half, counting bytes read + written. Best of 5 after a warm-up (the machine's capability, not
/// its current contention).
pub fn host_bandwidth_gbps(bytes: usize) -> (f64, f64) {
    use rayon::prelude::*;
    // u64 words: integer adds are associative, so the read reduction vectorizes to full-width loads.
    let n = (bytes / 8).max(1 << 15);
    let mut buf = vec![1u64; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4);
    let mut read = Vec::new();
    for _ in 0..6 {
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
            .reduce(|| 0, u64::wrapping_add);
        // The sum keeps the loads alive.
        std::hint::black_box(s);
        read.push((n * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    let mut copy = Vec::new();
    let half = n / 2;
    for _ in 0..6 {
        let (src, dst) = buf.split_at_mut(half);
        let t0 = Instant::now();
        dst[..half]
            .par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&dst[0]);
        copy.push((half * 16) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    let best = |mut v: Vec<f64>| {
        v.remove(0);
        v.into_iter().fold(0.0, f64::max)
    };
    (best(read), best(copy))
}

/// Weight shapes `(out, in)` of the benchmark: a square projection and the two MLP shapes of a
/// 7B-class model.
pub const SHAPES: [(usize, usize); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];

/// Token counts: one decode token, a 16-token decode batch, a 512-token training micro-batch.
pub const TOKENS: [usize; 3] = [1, 16, 512];

/// LoRA rank of the benchmark.
pub const RANK: usize = 16;

/// The default case list: [`cases`] over [`SHAPES`] (only 4096×4096 unless `full`) and [`TOKENS`]
/// (without 512 when `quick`), plus the GPU-sized cases on CUDA.
pub fn default_cases(device: Device, full: bool, quick: bool) -> Vec<Case> {
    let shapes: &[(usize, usize)] = if full { &SHAPES } else { &SHAPES[..1] };
    let tokens: &[usize] = if quick { &TOKENS[..2] } else { &TOKENS };
    let mut v = cases(device, shapes, tokens);
    if device.is_cuda() {
        v.extend(gpu_cases());
    }
    v
}

/// Every shape, token count and op for the 4-bit formats against dense bf16 and f32, and the
/// weight-only ops (quantize, dequantize, dequantize_into) of the 4-bit formats. 4-bit cases run twice
/// at > 16 tokens on CUDA (fused and dequant+GEMM), and on the CPU the 512-token cases too (panels vs
/// dequantize-all).
pub fn cases(device: Device, shapes: &[(usize, usize)], tokens: &[usize]) -> Vec<Case> {
    let formats = [Format::Nf4, Format::Nf4Dq, Format::Fp4, Format::Bf16, Format::F32];
    let mut v = Vec::new();
    for &(out, inp) in shapes {
        for f in formats {
            if f.is_quantized() {
                for op in [Op::Quantize, Op::Dequantize, Op::DequantizeInto] {
                    v.push(Case::new(op, f, (out, inp), 0, 0, Algo::Auto));
                }
            }
        }
        for &t in tokens {
            for op in [Op::Forward, Op::BackwardInput] {
                for f in formats {
                    let algos: &[Algo] = if f.is_quantized() && (t > 16 || device.is_cuda()) {
                        &[Algo::Fused, Algo::DequantGemm]
                    } else {
                        &[Algo::Auto]
                    };
                    for &algo in algos {
                        v.push(Case::new(op, f, (out, inp), t, RANK, algo));
                    }
                }
            }
        }
    }
    v
}

/// The GPU-sized cases: an 8192² GEMV and a 4096-token training step.
fn gpu_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for f in [Format::Nf4, Format::Nf4Dq, Format::Bf16] {
        for t in [1, 16] {
            v.push(Case::new(Op::Forward, f, (8192, 8192), t, RANK, Algo::Auto));
        }
        for op in [Op::Forward, Op::BackwardInput] {
            let algos: &[Algo] = if f.is_quantized() {
                &[Algo::Fused, Algo::DequantGemm]
            } else {
                &[Algo::Auto]
            };
            for &algo in algos {
                v.push(Case::new(op, f, (4096, 4096), 4096, RANK, algo));
            }
        }
    }
    v
}

/// Bytes of weight copies to rotate through, the same for every format so that all of them run in
/// the same memory regime: beyond the last-level cache the kernels see DRAM/HBM. CPU: 1 GiB (the
/// development VM reports a 480 MiB L3 and serves a 67 MB working set several times faster than a
/// 256 MiB one). CUDA: 4× the 50 MB L2.
pub fn rotation_bytes(device: Device) -> usize {
    if device.is_cuda() { 200 << 20 } else { 1 << 30 }
}

#[cfg(test)]
#[allow(unused_imports)] // the benches compile this file too, without its tests
mod tests {
    use super::*;

    /// The weight-only rows do what they are named for: `dequantize_into` writes exactly what
    /// `dequantize` returns for the same weight, and `quantize` produces bitsandbytes' codes.
    #[test]
    fn weight_only_cases_compute_what_they_name() -> Result<()> {
        for (format, qt) in [
            (Format::Nf4, QuantType::Nf4),
            (Format::Nf4Dq, QuantType::Nf4),
            (Format::Fp4, QuantType::Fp4),
        ] {
            let case = |op| Case::new(op, format, (6, 160), 0, 0, Algo::Auto);
            let fresh = Runner::new(case(Op::Dequantize), Device::Cpu, 0)?.run()?;
            let fresh = fresh.expect("dequantize returns its output");
            let mut into = Runner::new(case(Op::DequantizeInto), Device::Cpu, 0)?;
            assert!(into.run()?.is_none());
            let out = into.out.as_ref().expect("dequantize_into has an output");
            assert_eq!(out.to_bytes()?, fresh.to_bytes()?, "{format:?}");
            assert_eq!((out.shape(), out.dtype()), (&[6, 160][..], DType::BF16));

            let mut quant = Runner::new(case(Op::Quantize), Device::Cpu, 0)?;
            let codes = quant.run()?.expect("quantize returns the codes");
            let BaseWeight::Dense(x) = &quant.weights[0] else {
                panic!("quantize input is dense");
            };
            let x = x.to_vec::<half::bf16>()?;
            let (want, _) = peft_kernels::quant::cpu::quantize_reference(&x, qt, 64)?;
            assert_eq!(codes.to_vec::<u8>()?, want, "{format:?}");
        }
        // A dense format has no 4-bit conversion to time.
        let dense = Case::new(Op::Quantize, Format::Bf16, (2, 64), 0, 0, Algo::Auto);
        assert!(Runner::new(dense, Device::Cpu, 0).is_err());
        Ok(())
    }
}
