//! The fused linear family against f64 math: 4-bit weights built from random packed bytes and
//! random scales (every code and block layout is valid), decoded by an independent oracle
//! (`code[nibble] * absmax` in f32, double-quant absmax `nested_code[c] * nested_absmax + offset`
//! with two roundings), then f64 matmuls. Every path (decode GEMV, panels + gemm, dequantize + gemm,
//! CUDA kernels) is checked against it, on odd shapes where blocks cross rows and rows start on a
//! low nibble.

mod common;

use half::{bf16, f16};
use peft_kernels::qmatmul::{
    Algo, BaseWeight, LowRankBwd, LowRankFwd, linear_backward_input, linear_forward,
};
use peft_kernels::quant::{Absmax, QuantState, QuantType, QuantizedTensor};
use peft_kernels::rng::Rng;
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const ALGOS: [Algo; 3] = [Algo::Auto, Algo::Fused, Algo::DequantGemm];

/// How to build a random 4-bit weight.
#[derive(Clone, Copy, Debug)]
struct QSpec {
    qt: QuantType,
    bs: usize,
    double: bool,
    out: usize,
    inp: usize,
    /// absmax values are drawn from [lo, 2 lo).
    absmax_lo: f32,
    /// Every `zero_every`-th block gets absmax 0 (0: none).
    zero_every: usize,
    seed: u64,
}

impl QSpec {
    fn new(qt: QuantType, bs: usize, double: bool, out: usize, inp: usize, seed: u64) -> QSpec {
        QSpec {
            qt,
            bs,
            double,
            out,
            inp,
            absmax_lo: 0.5,
            zero_every: 0,
            seed,
        }
    }
}

/// The dynamic-map-like nested code book (monotone, signed, exact zero in the middle).
fn nested_code() -> Vec<f32> {
    (0..256)
        .map(|i| {
            let v = (i as f32 - 127.0) / 128.0;
            v * v * v.signum()
        })
        .collect()
}

fn build_q(s: QSpec, dev: Device) -> Result<QuantizedTensor> {
    let mut r = Rng::new(s.seed);
    let n = s.out * s.inp;
    let nb = n.div_ceil(s.bs);
    let data: Vec<u8> = (0..n.div_ceil(2)).map(|_| r.next_u64() as u8).collect();
    let absmax = if s.double {
        let mut codes: Vec<u8> = (0..nb).map(|_| r.next_u64() as u8).collect();
        if s.zero_every > 0 {
            // Code 127 is 0.0 in the nested book; with offset 0 the block's absmax is exactly 0.
            for (i, c) in codes.iter_mut().enumerate() {
                if i % s.zero_every == 0 {
                    *c = 127;
                }
            }
        }
        let nn = nb.div_ceil(256);
        let nested: Vec<f32> = (0..nn)
            .map(|_| r.uniform_range(s.absmax_lo, 2.0 * s.absmax_lo))
            .collect();
        let offset = if s.zero_every > 0 { 0.0 } else { 0.3 * s.absmax_lo };
        Absmax::Double {
            codes: Tensor::from_vec(codes, &[nb], dev)?,
            nested_absmax: Tensor::from_vec(nested, &[nn], dev)?,
            offset,
            nested_code: nested_code(),
            nested_blocksize: 256,
        }
    } else {
        let a: Vec<f32> = (0..nb)
            .map(|i| {
                if s.zero_every > 0 && i % s.zero_every == 0 {
                    0.0
                } else {
                    r.uniform_range(s.absmax_lo, 2.0 * s.absmax_lo)
                }
            })
            .collect();
        Absmax::F32(Tensor::from_vec(a, &[nb], dev)?)
    };
    Ok(QuantizedTensor {
        data: Tensor::from_vec(data, &[n.div_ceil(2)], dev)?,
        state: QuantState {
            quant_type: s.qt,
            blocksize: s.bs,
            code: *s.qt.code(),
            dtype: DType::BF16,
            shape: vec![s.out, s.inp],
            absmax,
        },
    })
}

/// The oracle's decode of a whole weight: f32 products exactly as bitsandbytes forms them, widened.
fn decode_ref(w: &BaseWeight) -> Result<Vec<f64>> {
    match w {
        BaseWeight::Dense(t) => Ok(t.to_vec_f32()?.iter().map(|&v| v as f64).collect()),
        BaseWeight::KBit(k) => Ok(k
            .dequantize(DType::F32)?
            .to_vec_f32()?
            .iter()
            .map(|&v| v as f64)
            .collect()),
        BaseWeight::Quantized(q) => {
            let st = &q.state;
            let data = q.data.to_vec::<u8>()?;
            let absmax: Vec<f32> = match &st.absmax {
                Absmax::F32(t) => t.to_vec::<f32>()?,
                Absmax::Double {
                    codes,
                    nested_absmax,
                    offset,
                    nested_code,
                    nested_blocksize,
                } => {
                    let c = codes.to_vec::<u8>()?;
                    let na = nested_absmax.to_vec::<f32>()?;
                    c.iter()
                        .enumerate()
                        .map(|(i, &c)| {
                            let m: f32 = nested_code[c as usize] * na[i / nested_blocksize];
                            m + offset
                        })
                        .collect()
                }
            };
            let n = st.shape.iter().product::<usize>();
            Ok((0..n)
                .map(|f| {
                    let b = data[f / 2];
                    let nib = if f % 2 == 0 { b >> 4 } else { b & 15 };
                    (st.code[nib as usize] * absmax[f / st.blocksize]) as f64
                })
                .collect())
        }
    }
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_vec_f32()?.iter().map(|&v| v as f64).collect())
}

/// Largest relative error a path may make, relative to Σ|terms| of each output, plus the output
/// rounding relative to |y|. CPU accumulates f32 products of exact f32 weights. CUDA tensor-core
/// paths round W, u, b, v, a to the 16-bit activation dtype first.
fn tolerances(dev: Device, dtype: DType) -> (f64, f64) {
    let out_round = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 1.0 / 128.0,
    };
    let accum = match (dev, dtype) {
        (Device::Cuda(_), DType::F16) => 2.0 / 1024.0,
        (Device::Cuda(_), DType::BF16) => 2.0 / 128.0,
        _ => 2e-5,
    };
    (accum, out_round)
}

#[track_caller]
fn check(got: &Tensor, want: &[f64], scale: &[f64], dev: Device, what: &str) -> Result<()> {
    let (accum, out_round) = tolerances(dev, got.dtype());
    // Below the smallest normal the output's rounding error is absolute: half the subnormal spacing
    // (2^-25 for f16; f32 and bf16 share f32's exponent range).
    let floor = if got.dtype() == DType::F16 {
        2f64.powi(-25)
    } else {
        1e-37
    };
    let g = got.to_vec_f32()?;
    assert_eq!(g.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in g.iter().zip(want).zip(scale).enumerate() {
        let tol = accum * s + out_round * w.abs() + floor;
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol && g.is_finite(),
            "{what}: index {i}: got {g}, expected {w} (|err| {err:e} > tol {tol:e}, row scale {s:e})"
        );
    }
    Ok(())
}

/// Operands of one forward/backward check, all generated on the host and uploaded.
struct Operands {
    act: Tensor,
    bias: Option<Tensor>,
    lhs: Option<Tensor>,
    rhs: Option<Tensor>,
}

#[allow(clippy::too_many_arguments)]
fn operands(
    dev: Device,
    dtype: DType,
    tokens: usize,
    k: usize,
    bias_len: Option<usize>,
    lr: Option<(usize, usize, usize)>,
    aux_f32: bool,
    seed: u64,
) -> Result<Operands> {
    let aux = if aux_f32 { DType::F32 } else { dtype };
    Ok(Operands {
        act: Tensor::randn(&[tokens, k], 1.0, seed, dtype, dev)?,
        bias: bias_len
            .map(|n| Tensor::randn(&[n], 0.5, seed + 1, aux, dev))
            .transpose()?,
        lhs: lr
            .map(|(r, _, _)| Tensor::randn(&[tokens, r], 1.0, seed + 2, aux, dev))
            .transpose()?,
        rhs: lr
            .map(|(_, a, b)| Tensor::randn(&[a, b], 0.3, seed + 3, aux, dev))
            .transpose()?,
    })
}

/// Forward through every algorithm, checked against f64.
#[allow(clippy::too_many_arguments)]
fn check_forward(
    dev: Device,
    w: &BaseWeight,
    dtype: DType,
    tokens: usize,
    rank: Option<usize>,
    bias: bool,
    aux_f32: bool,
    seed: u64,
    what: &str,
) -> Result<()> {
    let (out, inp) = (w.out_features(), w.in_features());
    let ops = operands(
        dev,
        dtype,
        tokens,
        inp,
        bias.then_some(out),
        rank.map(|r| (r, out, r)),
        aux_f32,
        seed,
    )?;
    let wr = decode_ref(w)?;
    let x = host_f64(&ops.act)?;
    let bv = ops.bias.as_ref().map(host_f64).transpose()?;
    let lr = match (&ops.lhs, &ops.rhs) {
        (Some(u), Some(b)) => Some((host_f64(u)?, host_f64(b)?, rank.unwrap_or(0))),
        _ => None,
    };
    let mut want = vec![0f64; tokens * out];
    let mut scale = vec![0f64; tokens * out];
    for t in 0..tokens {
        for o in 0..out {
            let (mut y, mut s) = (0f64, 0f64);
            for k in 0..inp {
                let p = wr[o * inp + k] * x[t * inp + k];
                y += p;
                s += p.abs();
            }
            if let Some(b) = &bv {
                y += b[o];
                s += b[o].abs();
            }
            if let Some((u, b, r)) = &lr {
                for j in 0..*r {
                    let p = u[t * r + j] * b[o * r + j];
                    y += p;
                    s += p.abs();
                }
            }
            want[t * out + o] = y;
            scale[t * out + o] = s;
        }
    }
    for algo in ALGOS {
        let low = match (&ops.lhs, &ops.rhs) {
            (Some(u), Some(b)) => Some(LowRankFwd { u, b }),
            _ => None,
        };
        let y = linear_forward(&ops.act, w, ops.bias.as_ref(), low, algo)?;
        assert_eq!(y.shape(), &[tokens, out], "{what}");
        assert_eq!(y.dtype(), dtype, "{what}");
        assert_eq!(y.device(), dev, "{what}");
        check(&y, &want, &scale, dev, &format!("forward {what} {algo:?}"))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_backward(
    dev: Device,
    w: &BaseWeight,
    dtype: DType,
    tokens: usize,
    rank: Option<usize>,
    aux_f32: bool,
    seed: u64,
    what: &str,
) -> Result<()> {
    let (out, inp) = (w.out_features(), w.in_features());
    let ops = operands(
        dev,
        dtype,
        tokens,
        out,
        None,
        rank.map(|r| (r, r, inp)),
        aux_f32,
        seed,
    )?;
    let wr = decode_ref(w)?;
    let dy = host_f64(&ops.act)?;
    let lr = match (&ops.lhs, &ops.rhs) {
        (Some(v), Some(a)) => Some((host_f64(v)?, host_f64(a)?, rank.unwrap_or(0))),
        _ => None,
    };
    let mut want = vec![0f64; tokens * inp];
    let mut scale = vec![0f64; tokens * inp];
    for t in 0..tokens {
        for o in 0..out {
            let d = dy[t * out + o];
            for k in 0..inp {
                let p = d * wr[o * inp + k];
                want[t * inp + k] += p;
                scale[t * inp + k] += p.abs();
            }
        }
        if let Some((v, a, r)) = &lr {
            for j in 0..*r {
                for k in 0..inp {
                    let p = v[t * r + j] * a[j * inp + k];
                    want[t * inp + k] += p;
                    scale[t * inp + k] += p.abs();
                }
            }
        }
    }
    for algo in ALGOS {
        let low = match (&ops.lhs, &ops.rhs) {
            (Some(v), Some(a)) => Some(LowRankBwd { v, a }),
            _ => None,
        };
        let dx = linear_backward_input(&ops.act, w, low, algo)?;
        assert_eq!(dx.shape(), &[tokens, inp], "{what}");
        assert_eq!(dx.dtype(), dtype, "{what}");
        check(&dx, &want, &scale, dev, &format!("backward {what} {algo:?}"))?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------

/// Every blocksize class, nf4/fp4, with and without double quant, on shapes where blocks cross rows
/// (in % bs != 0), rows start on a low nibble (in odd) and the SIMD paths apply (in % 32 == 0);
/// decode (1, 3, 16 tokens) and batch (17, 70 tokens) regimes.
fn quantized_forward_backward(dev: Device) -> Result<()> {
    let shapes = [(37, 96), (21, 77), (9, 130), (33, 256), (5, 33), (48, 160)];
    let mut seed = 100;
    for (i, &bs) in [32usize, 64, 256, 4096].iter().enumerate() {
        for (j, &(out, inp)) in shapes.iter().enumerate() {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for double in [false, true] {
                    seed += 1;
                    // Rotate tokens, dtype and operands over the grid to keep the test fast.
                    let tokens = [1, 3, 16, 17, 70][(i + j + seed as usize) % 5];
                    let dtype = FLOATS[(i + 2 * j + double as usize) % 3];
                    let rank = [None, Some(1), Some(8)][(j + seed as usize) % 3];
                    let bias = (i + j) % 2 == 0;
                    let aux_f32 = seed % 2 == 0;
                    let spec = QSpec::new(qt, bs, double, out, inp, seed);
                    let w = BaseWeight::Quantized(build_q(spec, dev)?);
                    let what = format!("{spec:?} t={tokens} {dtype} r={rank:?} bias={bias}");
                    check_forward(dev, &w, dtype, tokens, rank, bias, aux_f32, seed, &what)?;
                    check_backward(dev, &w, dtype, tokens, rank, aux_f32, seed, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// Each token count of the decode kernels' instantiations (1, 2, 4, 8, 16 after padding) and the
/// first batch size, at an aligned shape, every dtype.
fn quantized_token_counts(dev: Device) -> Result<()> {
    // out % 8 == 0 and in % 32 == 0: the CUDA tensor-core backward applies too.
    let spec = QSpec::new(QuantType::Nf4, 64, true, 24, 192, 7);
    let w = BaseWeight::Quantized(build_q(spec, dev)?);
    for tokens in [1, 2, 3, 5, 8, 9, 16, 17, 40] {
        for dtype in FLOATS {
            let what = format!("tokens={tokens} {dtype}");
            check_forward(dev, &w, dtype, tokens, Some(4), true, false, tokens as u64, &what)?;
            check_backward(dev, &w, dtype, tokens, Some(4), true, tokens as u64, &what)?;
        }
    }
    Ok(())
}

fn dense_forward_backward(dev: Device) -> Result<()> {
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for &(out, inp) in &[(13usize, 40usize), (7, 33), (20, 64)] {
            let w = BaseWeight::Dense(Tensor::randn(&[out, inp], 0.5, i as u64, dtype, dev)?);
            for tokens in [1, 5, 16, 23] {
                let what = format!("dense {dtype} [{out},{inp}] t={tokens}");
                check_forward(dev, &w, dtype, tokens, Some(3), true, i == 0, 9, &what)?;
                check_backward(dev, &w, dtype, tokens, Some(3), i == 1, 9, &what)?;
            }
        }
    }
    Ok(())
}

/// Layers of over a million multiply-adds, which the CPU spreads over its thread pool (smaller ones run
/// on the calling thread, as every other test here does): decode and batch token counts, 4-bit and dense.
fn pooled_sizes(dev: Device) -> Result<()> {
    let spec = QSpec::new(QuantType::Nf4, 64, true, 520, 2080, 11);
    let q = BaseWeight::Quantized(build_q(spec, dev)?);
    let dense = BaseWeight::Dense(Tensor::randn(&[520, 2080], 0.5, 12, DType::BF16, dev)?);
    for (w, name) in [(&q, "nf4-dq"), (&dense, "dense bf16")] {
        for tokens in [1, 3, 17] {
            let what = format!("{name} [520,2080] t={tokens}");
            check_forward(dev, w, DType::BF16, tokens, Some(8), true, false, 13, &what)?;
            check_backward(dev, w, DType::BF16, tokens, Some(8), false, 13, &what)?;
        }
    }
    Ok(())
}

/// absmax of 1e-30 and 1e30 (finite results), and all-zero blocks.
fn extreme_scales_and_zero_blocks(dev: Device) -> Result<()> {
    for (lo, dtype) in [(1e-30f32, DType::F32), (1e30, DType::F32), (1e30, DType::BF16)] {
        for double in [false, true] {
            let mut spec = QSpec::new(QuantType::Nf4, 32, double, 11, 64, 3);
            spec.absmax_lo = lo;
            let w = BaseWeight::Quantized(build_q(spec, dev)?);
            let what = format!("absmax ~{lo:e} dq={double} {dtype}");
            for tokens in [1, 20] {
                check_forward(dev, &w, dtype, tokens, None, false, false, 4, &what)?;
                check_backward(dev, &w, dtype, tokens, None, false, 4, &what)?;
            }
        }
    }
    for double in [false, true] {
        let mut spec = QSpec::new(QuantType::Fp4, 64, double, 9, 96, 5);
        spec.zero_every = 2;
        let q = build_q(spec, dev)?;
        // Sanity: zero blocks really decode to zero in the oracle.
        let w = BaseWeight::Quantized(q);
        let wr = decode_ref(&w)?;
        assert!(wr[..64].iter().all(|&v| v == 0.0), "block 0 must be all zero");
        assert!(wr[64..128].iter().any(|&v| v != 0.0), "block 1 must be non-zero");
        for tokens in [1, 18] {
            let what = format!("zero blocks dq={double}");
            check_forward(dev, &w, DType::F32, tokens, Some(2), true, false, 6, &what)?;
            check_backward(dev, &w, DType::F32, tokens, Some(2), false, 6, &what)?;
        }
        // A weight whose blocks are all zero gives exactly bias + low-rank.
        spec.zero_every = 1;
        let w = BaseWeight::Quantized(build_q(spec, dev)?);
        let x = Tensor::randn(&[4, 96], 1.0, 1, DType::F32, dev)?;
        let bias = Tensor::randn(&[9], 1.0, 2, DType::F32, dev)?;
        for algo in ALGOS {
            let y = linear_forward(&x, &w, Some(&bias), None, algo)?;
            let bv = bias.to_vec::<f32>()?;
            for (i, v) in y.to_vec::<f32>()?.iter().enumerate() {
                assert_eq!(*v, bv[i % 9], "all-zero weight {algo:?}");
            }
        }
    }
    Ok(())
}

/// Fused and dequantize+GEMM agree with each other more tightly than with the reference bound.
fn algorithms_agree(dev: Device) -> Result<()> {
    let spec = QSpec::new(QuantType::Nf4, 64, false, 64, 128, 11);
    let w = BaseWeight::Quantized(build_q(spec, dev)?);
    for tokens in [2, 64] {
        let x = Tensor::randn(&[tokens, 128], 1.0, 12, DType::F32, dev)?;
        let a = linear_forward(&x, &w, None, None, Algo::Fused)?.to_vec::<f32>()?;
        let b = linear_forward(&x, &w, None, None, Algo::DequantGemm)?.to_vec::<f32>()?;
        common::assert_close_scaled(&a, &b, 1e-5, "fused vs dequant-gemm");
    }
    Ok(())
}

/// Leading dims flatten into tokens and come back in the output shape.
fn leading_dims(dev: Device) -> Result<()> {
    let spec = QSpec::new(QuantType::Nf4, 64, false, 10, 64, 13);
    let w = BaseWeight::Quantized(build_q(spec, dev)?);
    let x = Tensor::randn(&[2, 3, 64], 1.0, 1, DType::BF16, dev)?;
    let y = linear_forward(&x, &w, None, None, Algo::Auto)?;
    assert_eq!(y.shape(), &[2, 3, 10]);
    let y2 = linear_forward(&x.reshape(&[6, 64])?, &w, None, None, Algo::Auto)?;
    assert_eq!(y.to_vec_f32()?, y2.to_vec_f32()?);
    let dy = Tensor::randn(&[2, 3, 10], 1.0, 2, DType::BF16, dev)?;
    let dx = linear_backward_input(&dy, &w, None, Algo::Auto)?;
    assert_eq!(dx.shape(), &[2, 3, 64]);
    // A 1-D activation is one token.
    let x1 = Tensor::randn(&[64], 1.0, 3, DType::F32, dev)?;
    assert_eq!(linear_forward(&x1, &w, None, None, Algo::Auto)?.shape(), &[10]);
    Ok(())
}

/// `BaseWeight` helpers: names, sizes, dequantize against the oracle (rounded once to the dtype).
fn base_weight_helpers(dev: Device) -> Result<()> {
    let spec = QSpec::new(QuantType::Nf4, 64, true, 6, 70, 17);
    let q = BaseWeight::Quantized(build_q(spec, dev)?);
    assert_eq!((q.out_features(), q.in_features()), (6, 70));
    assert_eq!(q.format_name(), "nf4-dq");
    assert_eq!(q.device(), dev);
    // 210 bytes of codes + 7 absmax codes + 1 nested f32 + the 1 KiB nested code book.
    assert_eq!(q.size_in_bytes(), 210 + 7 + 4 + 1024);
    let fp = BaseWeight::Quantized(build_q(QSpec::new(QuantType::Fp4, 32, false, 3, 32, 1), dev)?);
    assert_eq!(fp.format_name(), "fp4");
    assert_eq!(fp.size_in_bytes(), 48 + 3 * 4);
    let want = decode_ref(&q)?;
    for dtype in FLOATS {
        let d = q.dequantize(dtype)?;
        assert_eq!(d.shape(), &[6, 70]);
        assert_eq!(d.dtype(), dtype);
        let got = d.to_vec_f32()?;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let w32 = w as f32;
            let exp = match dtype {
                DType::F16 => f16::from_f32(w32).to_f32(),
                DType::BF16 => bf16::from_f32(w32).to_f32(),
                _ => w32,
            };
            assert_eq!(g, exp, "dequantize {dtype} index {i}");
        }
    }
    let dense = BaseWeight::Dense(Tensor::randn(&[4, 8], 1.0, 1, DType::BF16, dev)?);
    assert_eq!(dense.format_name(), "bf16");
    assert_eq!(dense.size_in_bytes(), 64);
    assert_eq!(dense.dequantize(DType::F32)?.dtype(), DType::F32);
    let back = q.to_device(Device::Cpu)?;
    assert_eq!(back.device(), Device::Cpu);
    assert_eq!(
        decode_ref(&back)?,
        want,
        "to_device keeps every part of the weight"
    );
    Ok(())
}

/// Bad input is an error, never a panic.
fn errors(dev: Device) -> Result<()> {
    let spec = QSpec::new(QuantType::Nf4, 64, false, 8, 64, 1);
    let q = build_q(spec, dev)?;
    let w = BaseWeight::Quantized(q.clone());
    let x = Tensor::randn(&[3, 64], 1.0, 1, DType::BF16, dev)?;
    let shape_err = |r: Result<Tensor>| assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let dtype_err = |r: Result<Tensor>| assert!(matches!(r, Err(Error::DType { .. })), "{r:?}");
    // Wrong inner dimension.
    let bad_x = Tensor::randn(&[3, 63], 1.0, 1, DType::BF16, dev)?;
    shape_err(linear_forward(&bad_x, &w, None, None, Algo::Auto));
    shape_err(linear_backward_input(&x, &w, None, Algo::Auto)); // dy must be [.., 8]
    // Integer activations.
    let xi = Tensor::zeros(&[3, 64], DType::I32, dev)?;
    dtype_err(linear_forward(&xi, &w, None, None, Algo::Auto));
    // Dense W of another dtype.
    let dw = BaseWeight::Dense(Tensor::randn(&[8, 64], 1.0, 1, DType::F32, dev)?);
    dtype_err(linear_forward(&x, &dw, None, None, Algo::Auto));
    // Bias: wrong length, wrong dtype (f16 with bf16 activations).
    let b7 = Tensor::zeros(&[7], DType::F32, dev)?;
    shape_err(linear_forward(&x, &w, Some(&b7), None, Algo::Auto));
    let b16 = Tensor::zeros(&[8], DType::F16, dev)?;
    dtype_err(linear_forward(&x, &w, Some(&b16), None, Algo::Auto));
    // Low-rank shapes.
    let u = Tensor::zeros(&[3, 4], DType::F32, dev)?;
    let u2 = Tensor::zeros(&[2, 4], DType::F32, dev)?;
    let b_ok = Tensor::zeros(&[8, 4], DType::F32, dev)?;
    let b_bad = Tensor::zeros(&[8, 5], DType::F32, dev)?;
    shape_err(linear_forward(
        &x,
        &w,
        None,
        Some(LowRankFwd { u: &u, b: &b_bad }),
        Algo::Auto,
    ));
    shape_err(linear_forward(
        &x,
        &w,
        None,
        Some(LowRankFwd { u: &u2, b: &b_ok }),
        Algo::Auto,
    ));
    assert!(linear_forward(&x, &w, None, Some(LowRankFwd { u: &u, b: &b_ok }), Algo::Auto).is_ok());
    let dy = Tensor::zeros(&[3, 8], DType::BF16, dev)?;
    let a_bad = Tensor::zeros(&[4, 63], DType::F32, dev)?;
    shape_err(linear_backward_input(
        &dy,
        &w,
        Some(LowRankBwd { v: &u, a: &a_bad }),
        Algo::Auto,
    ));
    let a_f16 = Tensor::zeros(&[4, 64], DType::F16, dev)?;
    dtype_err(linear_backward_input(
        &dy,
        &w,
        Some(LowRankBwd { v: &u, a: &a_f16 }),
        Algo::Auto,
    ));
    // Malformed quantized weights.
    let mut q_short = q.clone();
    q_short.data = Tensor::zeros(&[31], DType::U8, dev)?;
    shape_err(linear_forward(
        &x,
        &BaseWeight::Quantized(q_short),
        None,
        None,
        Algo::Auto,
    ));
    let mut q_abs = q.clone();
    q_abs.state.absmax = Absmax::F32(Tensor::zeros(&[7], DType::F32, dev)?);
    shape_err(linear_forward(
        &x,
        &BaseWeight::Quantized(q_abs),
        None,
        None,
        Algo::Auto,
    ));
    let mut q_bs = q.clone();
    q_bs.state.blocksize = 48;
    assert!(matches!(
        linear_forward(&x, &BaseWeight::Quantized(q_bs), None, None, Algo::Auto),
        Err(Error::InvalidArgument(_))
    ));
    let mut q_3d = q.clone();
    q_3d.state.shape = vec![2, 4, 64];
    shape_err(linear_forward(
        &x,
        &BaseWeight::Quantized(q_3d),
        None,
        None,
        Algo::Auto,
    ));
    let mut q_dq = q.clone();
    q_dq.state.absmax = Absmax::Double {
        codes: Tensor::zeros(&[8], DType::U8, dev)?,
        nested_absmax: Tensor::zeros(&[1], DType::F32, dev)?,
        offset: 0.0,
        nested_code: vec![0.0; 255],
        nested_blocksize: 256,
    };
    shape_err(linear_forward(
        &x,
        &BaseWeight::Quantized(q_dq),
        None,
        None,
        Algo::Auto,
    ));
    let dense3 = BaseWeight::Dense(Tensor::zeros(&[2, 4, 64], DType::BF16, dev)?);
    shape_err(linear_forward(&x, &dense3, None, None, Algo::Auto));
    Ok(())
}

/// Operands on different devices are a device error (needs a GPU to construct).
fn device_mismatch(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    let w = BaseWeight::Quantized(build_q(QSpec::new(QuantType::Nf4, 64, false, 4, 64, 1), dev)?);
    let x = Tensor::zeros(&[1, 64], DType::F32, Device::Cpu)?;
    assert!(matches!(
        linear_forward(&x, &w, None, None, Algo::Auto),
        Err(Error::Device { .. })
    ));
    let xg = Tensor::zeros(&[1, 64], DType::F32, dev)?;
    let bias = Tensor::zeros(&[4], DType::F32, Device::Cpu)?;
    assert!(matches!(
        linear_forward(&xg, &w, Some(&bias), None, Algo::Auto),
        Err(Error::Device { .. })
    ));
    Ok(())
}

/// CUDA against the CPU backend on aligned, tensor-core-sized problems, forward and backward
/// (nothing to compare on the CPU instance: the other tests cover the CPU algorithms).
fn cuda_matches_cpu(dev: Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    // (512, 256): few output tiles, so the tiled kernels run split-K (f32 partials + reduce).
    for (tokens, dtype, out) in [
        (1, DType::BF16, 200),
        (16, DType::F16, 200),
        (130, DType::BF16, 200),
        (33, DType::F32, 200),
        (3, DType::BF16, 512),
        (140, DType::F16, 512),
    ] {
        for double in [false, true] {
            let spec = QSpec::new(QuantType::Nf4, 64, double, out, 256, 21);
            let wg = BaseWeight::Quantized(build_q(spec, dev)?);
            let wc = wg.to_device(Device::Cpu)?;
            let x = Tensor::randn(&[tokens, 256], 1.0, 3, dtype, Device::Cpu)?;
            let u = Tensor::randn(&[tokens, 16], 1.0, 4, DType::F32, Device::Cpu)?;
            let b = Tensor::randn(&[out, 16], 0.1, 5, DType::F32, Device::Cpu)?;
            let yc = linear_forward(&x, &wc, None, Some(LowRankFwd { u: &u, b: &b }), Algo::Auto)?;
            let (xg, ug, bg) = (x.to_device(dev)?, u.to_device(dev)?, b.to_device(dev)?);
            for algo in ALGOS {
                let yg = linear_forward(&xg, &wg, None, Some(LowRankFwd { u: &ug, b: &bg }), algo)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                common::assert_close_scaled(
                    &yg.to_vec_f32()?,
                    &yc.to_vec_f32()?,
                    tol,
                    &format!("cuda vs cpu t={tokens} {dtype} dq={double} {algo:?}"),
                );
            }
            // Backward: dy [tokens, out], v [tokens, 16], a [16, 256].
            let dy = Tensor::randn(&[tokens, out], 1.0, 6, dtype, Device::Cpu)?;
            let a = Tensor::randn(&[16, 256], 0.1, 7, DType::F32, Device::Cpu)?;
            let dxc = linear_backward_input(&dy, &wc, Some(LowRankBwd { v: &u, a: &a }), Algo::Auto)?;
            let (dyg, ag) = (dy.to_device(dev)?, a.to_device(dev)?);
            for algo in ALGOS {
                let dxg = linear_backward_input(&dyg, &wg, Some(LowRankBwd { v: &ug, a: &ag }), algo)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                common::assert_close_scaled(
                    &dxg.to_vec_f32()?,
                    &dxc.to_vec_f32()?,
                    tol,
                    &format!("cuda vs cpu backward t={tokens} {dtype} dq={double} {algo:?}"),
                );
            }
        }
    }
    Ok(())
}

device_test!(
    quantized_forward_backward,
    quantized_token_counts,
    dense_forward_backward,
    pooled_sizes,
    extreme_scales_and_zero_blocks,
    algorithms_agree,
    leading_dims,
    base_weight_helpers,
    errors,
    device_mismatch,
    cuda_matches_cpu,
);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random shapes, formats and token counts on the CPU (and CUDA when present).
    #[test]
    fn prop_random_shapes(
        out in 1usize..40,
        inp in 1usize..200,
        tokens in 1usize..24,
        bs_i in 0usize..8,
        nf4 in any::<bool>(),
        double in any::<bool>(),
        dtype_i in 0usize..3,
        rank in 0usize..6,
        seed in 0u64..1000,
    ) {
        let bs = [32, 64, 128, 256, 512, 1024, 2048, 4096][bs_i];
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let dtype = FLOATS[dtype_i];
        let rank = (rank > 0).then_some(rank);
        let mut devs = vec![Device::Cpu];
        if peft_kernels::cuda_device_count() > 0 {
            devs.push(Device::Cuda(0));
        }
        for dev in devs {
            let spec = QSpec::new(qt, bs, double, out, inp, seed);
            let w = BaseWeight::Quantized(build_q(spec, dev).unwrap());
            let what = format!("prop {spec:?} t={tokens} {dtype} r={rank:?}");
            check_forward(dev, &w, dtype, tokens, rank, seed % 2 == 0, seed % 3 == 0, seed, &what).unwrap();
            check_backward(dev, &w, dtype, tokens, rank, seed % 3 == 1, seed, &what).unwrap();
        }
    }
}
