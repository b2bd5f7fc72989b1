//! The fused linear family: `y = x·Wᵀ + bias + u·bᵀ` and `dx = dy·W + v·a` with a frozen base weight
//! `W [out, in]` that is dense (f32/f16/bf16) or 4-bit (NF4/FP4, bitsandbytes layout, with or without
//! double quantization), and a low-rank term that the LoRA layer passes in already projected
//! (`u = s·drop(x)·Aᵀ`, `v = s·dy·B`).
//!
//! Why the low-rank term is an argument and not a second matmul: added in the same pass (CPU: in the
//! same row loop; CUDA: in the same launch, as extra K-tiles of `[x | u]·[W | b]ᵀ`), it costs a few
//! percent of the FLOPs and no extra traffic over `y`, instead of re-reading and re-writing `y`
//! (run unfused at 4096 tokens × 4096², re-reading x and re-writing y is ~101 MB of traffic, ≈13% of
//! the 174 µs bf16 GEMM floor on an H200).
//!
//! Algorithms ([`Algo`]):
//! - `Fused`: 4-bit decode inside the matmul. CPU: a LUT-decode GEMV for ≤ 16 tokens (no dense copy of
//!   W), cache-sized dequantized panels fed to the `gemm` crate above that. CUDA: a tensor-core GEMV
//!   for ≤ 16 tokens (bf16/f16), a SIMT GEMV for f32 and unaligned shapes, a tiled mma.sync GEMM with
//!   in-shared-memory dequantization for more tokens (bf16/f16, `in % 32 == 0`).
//! - `DequantGemm`: dequantize all of W into a scratch buffer, then one GEMM (cuBLAS / `gemm`) and
//!   a second accumulating GEMM for the low-rank term. The baseline the benchmarks compare against.
//! - `Auto`: `Fused` where a fused kernel exists for the shape and dtype, else `DequantGemm`.
//!
//! Dense weights always use the GEMV / GEMM of the device (the algorithm is ignored).
//!
//! Numerics: every path decodes a 4-bit weight exactly as bitsandbytes' `dequantize_4bit` does
//! (`code[nibble] * absmax` in f32, the double-quant absmax as `nested_code[c] * nested_absmax + offset`
//! with two roundings), then accumulates in f32. CPU paths multiply in f32 throughout; the CUDA
//! tensor-core paths round the decoded weight (and `u`, `b`, `v`, `a`) to the activation dtype first,
//! exactly like dequantize-to-bf16-then-GEMM.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;

use crate::device::{Device, on_device};
use crate::error::{Error, Result};
use crate::kbit::{self, KBitTensor};
use crate::quant::{AbsmaxRef, BLOCKSIZES, QuantizedTensor};
use crate::tensor::{DType, Tensor};

/// The frozen base weight of a linear layer, logical shape `[out, in]`.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, moved rarely; boxing would complicate matching
pub enum BaseWeight {
    /// A dense `[out, in]` weight; it must have the activation dtype.
    Dense(Tensor),
    /// A bitsandbytes 4-bit weight whose `state.shape` is `[out, in]`.
    Quantized(QuantizedTensor),
    /// A 2/3/8-bit or bf16 weight of the k-bit storage tiers ([`crate::kbit`]), shape `[out, in]`. CPU:
    /// decoded per panel into the dense gemm/GEMV paths; CUDA: dequantized by `kernels/kbit.cu` to the
    /// activation dtype, then the dense (cuBLAS) path.
    KBit(KBitTensor),
}

/// How to compute a 4-bit product. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algo {
    /// The fused kernel where one applies, else `DequantGemm`.
    #[default]
    Auto,
    /// Decode the 4-bit weight inside the matmul (falls back to `DequantGemm` only where no fused
    /// kernel exists: CUDA with f32 activations or `in % 32 != 0` at more than 16 tokens).
    Fused,
    /// Dequantize W to a dense scratch buffer, then GEMM (the baseline).
    DequantGemm,
    /// bf16 compute for the frozen product, CPU batch path (more than 16 tokens): W (decoded) and the
    /// activations rounded to bf16, f32 accumulation, with AVX512_BF16 where the CPU has it, else an
    /// AVX2 kernel with the portable kernel's exact numbers at about the f32 speed (the numerics of
    /// `bnb_4bit_compute_dtype=torch.bfloat16` / autocast). The low-rank term stays f32.
    /// Elsewhere (≤ 16 tokens, CUDA) the same as `Auto`.
    Bf16,
}

impl std::str::FromStr for Algo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Algo> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Algo::Auto),
            "fused" => Ok(Algo::Fused),
            "dequant-gemm" | "dequant_gemm" | "dequantgemm" | "baseline" => Ok(Algo::DequantGemm),
            "bf16" => Ok(Algo::Bf16),
            _ => Err(Error::invalid(format!(
                "unknown algo {s:?} (expected auto, fused, dequant-gemm or bf16)"
            ))),
        }
    }
}

/// Adds `u·bᵀ` to the forward output (K-concatenation `[x | u]·[W | b]ᵀ`). `u: [tokens, r]`, `b: [out, r]`.
#[derive(Clone, Copy, Debug)]
pub struct LowRankFwd<'a> {
    pub u: &'a Tensor,
    pub b: &'a Tensor,
}

/// Adds `v·a` to the backward input-gradient (K-concatenation `[dy | v]·[W ; a]`). `v: [tokens, r]`,
/// `a: [r, in]`.
#[derive(Clone, Copy, Debug)]
pub struct LowRankBwd<'a> {
    pub v: &'a Tensor,
    pub a: &'a Tensor,
}

impl BaseWeight {
    /// `out` of `[out, in]`.
    pub fn out_features(&self) -> usize {
        self.dims().0
    }

    /// `in` of `[out, in]`.
    pub fn in_features(&self) -> usize {
        self.dims().1
    }

    /// `(out, in)`; for a malformed (non 2-D) weight the leading dims are folded, and [`BaseWeight::validate`]
    /// reports the error.
    fn dims(&self) -> (usize, usize) {
        let shape: &[usize] = match self {
            BaseWeight::Dense(t) => t.shape(),
            BaseWeight::Quantized(q) => &q.state.shape,
            BaseWeight::KBit(k) => &k.shape,
        };
        match shape {
            [] => (0, 0),
            [n] => (1, *n),
            [lead @ .., n] => (lead.iter().product(), *n),
        }
    }

    /// Where the weight lives.
    pub fn device(&self) -> Device {
        match self {
            BaseWeight::Dense(t) => t.device(),
            BaseWeight::Quantized(q) => q.data.device(),
            BaseWeight::KBit(k) => k.device(),
        }
    }

    /// A copy on `device` (cheap when already there).
    pub fn to_device(&self, d: Device) -> Result<Self> {
        Ok(match self {
            BaseWeight::Dense(t) => BaseWeight::Dense(t.to_device(d)?),
            BaseWeight::Quantized(q) => BaseWeight::Quantized(q.to_device(d)?),
            BaseWeight::KBit(k) => BaseWeight::KBit(k.to_device(d)?),
        })
    }

    /// The dense `[out, in]` weight in `dtype` (a float dtype). For 4-bit weights each element is
    /// `code[nibble] * absmax` computed in f32, then rounded once to `dtype` (bitsandbytes semantics).
    /// On the CPU this is [`QuantizedTensor::dequantize`] (the SIMD dequantizer of `quant`).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        dtype.expect_float("dequantize")?;
        self.validate("dequantize")?;
        match self {
            BaseWeight::Dense(t) => t.to_dtype(dtype),
            BaseWeight::Quantized(q) => match self.device() {
                // The CPU path is quant's SIMD dequantizer (the same one `QuantizedTensor::dequantize` uses).
                Device::Cpu => q.dequantize(dtype),
                Device::Cuda(_) => cuda::dequantize(q, dtype),
            },
            BaseWeight::KBit(k) => k.dequantize(dtype),
        }
    }

    /// `"nf4"`, `"nf4-dq"`, `"fp4"`, `"fp4-dq"` for 4-bit weights; the dtype (`"bf16"`, ...) for dense ones.
    pub fn format_name(&self) -> String {
        match self {
            BaseWeight::Dense(t) => t.dtype().as_str().to_string(),
            BaseWeight::Quantized(q) => {
                let dq = if q.state.is_double() { "-dq" } else { "" };
                format!("{}{dq}", q.state.quant_type.as_str())
            }
            BaseWeight::KBit(k) => k.format_name(),
        }
    }

    /// Bytes a forward pass must read: the elements (dense) or packed codes plus all scale data
    /// (first-level absmax, or codes + nested absmax + the 256-entry nested code book).
    /// Equals [`crate::kbit::Tier::storage_bytes`] of the tier the loader stores a weight in.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.size_in_bytes(),
            BaseWeight::Quantized(q) => q.data.size_in_bytes() + kbit::scale_bytes(&q.state.absmax),
            BaseWeight::KBit(k) => k.size_in_bytes(),
        }
    }

    /// Checks the internal consistency of the weight (shapes, dtypes, devices of every part).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        match self {
            BaseWeight::Dense(t) => {
                if t.rank() != 2 {
                    return Err(Error::shape(
                        op,
                        format!("dense base weight must be 2-D [out, in], got {:?}", t.shape()),
                    ));
                }
                t.dtype().expect_float(op)
            }
            BaseWeight::Quantized(q) => validate_quantized(q, op),
            BaseWeight::KBit(k) => {
                if k.shape.len() != 2 {
                    return Err(Error::shape(
                        op,
                        format!("k-bit base weight must be 2-D [out, in], got {:?}", k.shape),
                    ));
                }
                k.validate(op)
            }
        }
    }
}

fn validate_quantized(q: &QuantizedTensor, op: &'static str) -> Result<()> {
    let st = &q.state;
    if st.shape.len() != 2 {
        return Err(Error::shape(
            op,
            format!(
                "4-bit base weight must have a 2-D shape [out, in], got {:?}",
                st.shape
            ),
        ));
    }
    if !BLOCKSIZES.contains(&st.blocksize) {
        return Err(Error::invalid(format!(
            "{op}: blocksize {} is not one of {BLOCKSIZES:?}",
            st.blocksize
        )));
    }
    let n = st.numel();
    if q.data.dtype() != DType::U8 {
        return Err(Error::dtype(op, "u8 packed 4-bit data", q.data.dtype()));
    }
    if q.data.numel() != n.div_ceil(2) {
        return Err(Error::shape(
            op,
            format!(
                "packed data has {} bytes, expected {} for shape {:?}",
                q.data.numel(),
                n.div_ceil(2),
                st.shape
            ),
        ));
    }
    if st.code.iter().any(|c| !c.is_finite()) {
        return Err(Error::invalid(format!(
            "{op}: non-finite entry in the 4-bit code book"
        )));
    }
    let nblocks = st.nblocks();
    let dev = q.data.device();
    let same_dev = |t: &Tensor, what: &str| -> Result<()> {
        if t.device() != dev {
            return Err(Error::device(
                op,
                format!("{what} is on {} but the packed data on {dev}", t.device()),
            ));
        }
        Ok(())
    };
    match st.absmax.view() {
        AbsmaxRef::F32(t) => {
            if t.dtype() != DType::F32 {
                return Err(Error::dtype(op, "f32 absmax", t.dtype()));
            }
            if t.numel() != nblocks {
                return Err(Error::shape(
                    op,
                    format!("absmax has {} entries, expected {nblocks}", t.numel()),
                ));
            }
            same_dev(t, "absmax")?;
        }
        AbsmaxRef::Double(d) => {
            let (codes, nested_absmax, nested_code) = (d.codes, d.nested_absmax, d.nested_code);
            let (offset, nested_blocksize) = (d.offset, d.nested_blocksize);
            if codes.dtype() != DType::U8 {
                return Err(Error::dtype(op, "u8 absmax codes", codes.dtype()));
            }
            if nested_absmax.dtype() != DType::F32 {
                return Err(Error::dtype(op, "f32 nested absmax", nested_absmax.dtype()));
            }
            if !nested_blocksize.is_power_of_two() {
                return Err(Error::invalid(format!(
                    "{op}: nested blocksize {nested_blocksize} is not a power of two"
                )));
            }
            if codes.numel() != nblocks {
                return Err(Error::shape(
                    op,
                    format!("absmax codes have {} entries, expected {nblocks}", codes.numel()),
                ));
            }
            let nn = nblocks.div_ceil(nested_blocksize);
            if nested_absmax.numel() != nn {
                return Err(Error::shape(
                    op,
                    format!(
                        "nested absmax has {} entries, expected {nn}",
                        nested_absmax.numel()
                    ),
                ));
            }
            if nested_code.len() != 256 {
                return Err(Error::shape(
                    op,
                    format!("nested code book has {} entries, expected 256", nested_code.len()),
                ));
            }
            if !offset.is_finite() || nested_code.iter().any(|c| !c.is_finite()) {
                return Err(Error::invalid(format!(
                    "{op}: non-finite double-quant offset or nested code book"
                )));
            }
            same_dev(codes, "absmax codes")?;
            same_dev(nested_absmax, "nested absmax")?;
        }
    }
    Ok(())
}

/// Validated operands of one call, shared by the CPU and CUDA implementations.
pub(crate) struct Problem<'a> {
    /// Activations `[tokens, k]` (x for forward, dy for backward), flattened.
    pub act: &'a Tensor,
    pub tokens: usize,
    /// `out` and `in` of the weight.
    pub out: usize,
    pub inp: usize,
    pub w: &'a BaseWeight,
    pub bias: Option<&'a Tensor>,
    /// Forward: `(u [tokens, r], b [out, r])`. Backward: `(v [tokens, r], a [r, in])`.
    pub low_rank: Option<(&'a Tensor, &'a Tensor)>,
    pub rank: usize,
    pub algo: Algo,
}

fn check_aux(t: &Tensor, what: &str, act: DType, dev: Device, op: &'static str) -> Result<()> {
    if t.device() != dev {
        return Err(Error::device(
            op,
            format!("{what} is on {} but the activations on {dev}", t.device()),
        ));
    }
    if t.dtype() != DType::F32 && t.dtype() != act {
        return Err(Error::dtype(op, format!("{what} in f32 or {act}"), t.dtype()));
    }
    Ok(())
}

fn check_common<'a>(
    act: &'a Tensor,
    w: &'a BaseWeight,
    op: &'static str,
    k_name: &str,
    k_expected: usize,
) -> Result<usize> {
    act.dtype().expect_float(op)?;
    w.validate(op)?;
    if act.device() != w.device() {
        return Err(Error::device(
            op,
            format!("activations on {} but the weight on {}", act.device(), w.device()),
        ));
    }
    if let BaseWeight::Dense(t) = w {
        t.check_same_dtype(act, op).map_err(|_| {
            Error::dtype(
                op,
                format!("a dense weight of the activation dtype {}", act.dtype()),
                t.dtype(),
            )
        })?;
    }
    let (tokens, k) = act.dims2(op)?;
    if k != k_expected {
        return Err(Error::shape(
            op,
            format!(
                "activations {:?} have last dim {k}, but the weight [{}, {}] needs {k_name} = {k_expected}",
                act.shape(),
                w.out_features(),
                w.in_features()
            ),
        ));
    }
    Ok(tokens)
}

fn low_rank_rank(
    lhs: &Tensor,
    rhs: &Tensor,
    tokens: usize,
    rhs_expected: (Option<usize>, Option<usize>),
    names: (&str, &str),
    op: &'static str,
) -> Result<usize> {
    let (tl, r) = lhs.dims2(op)?;
    if tl != tokens {
        return Err(Error::shape(
            op,
            format!(
                "low-rank {} {:?} must be [tokens = {tokens}, r]",
                names.0,
                lhs.shape()
            ),
        ));
    }
    let ok = match (rhs.shape(), rhs_expected) {
        ([a, b], (Some(ea), None)) => *a == ea && *b == r,
        ([a, b], (None, Some(eb))) => *a == r && *b == eb,
        _ => false,
    };
    if !ok {
        let want = match rhs_expected {
            (Some(ea), _) => format!("[{ea}, {r}]"),
            (_, Some(eb)) => format!("[{r}, {eb}]"),
            _ => "?".into(),
        };
        return Err(Error::shape(
            op,
            format!(
                "low-rank {} has shape {:?}, expected {want} (r = {r} from {} {:?})",
                names.1,
                rhs.shape(),
                names.0,
                lhs.shape()
            ),
        ));
    }
    Ok(r)
}

/// `y [.., out] = x [.., in] · Wᵀ + bias + u·bᵀ`. `y` has x's dtype; accumulation is in f32.
///
/// `x` is f32/f16/bf16 (leading dims flatten into tokens). A dense W must have x's dtype; `bias [out]`,
/// `u [tokens, r]` and `b [out, r]` may be f32 or x's dtype. All operands on one device.
pub fn linear_forward(
    x: &Tensor,
    w: &BaseWeight,
    bias: Option<&Tensor>,
    low_rank: Option<LowRankFwd<'_>>,
    algo: Algo,
) -> Result<Tensor> {
    let op = "linear_forward";
    let (out, inp) = (w.out_features(), w.in_features());
    let tokens = check_common(x, w, op, "in", inp)?;
    let dev = x.device();
    if let Some(b) = bias {
        check_aux(b, "bias", x.dtype(), dev, op)?;
        if b.rank() != 1 || b.numel() != out {
            return Err(Error::shape(
                op,
                format!("bias has shape {:?}, expected [{out}]", b.shape()),
            ));
        }
    }
    let mut rank = 0;
    if let Some(lr) = &low_rank {
        check_aux(lr.u, "low-rank u", x.dtype(), dev, op)?;
        check_aux(lr.b, "low-rank b", x.dtype(), dev, op)?;
        rank = low_rank_rank(lr.u, lr.b, tokens, (Some(out), None), ("u", "b"), op)?;
    }
    let mut out_shape = if x.rank() == 0 {
        vec![]
    } else {
        x.shape()[..x.rank() - 1].to_vec()
    };
    out_shape.push(out);
    let p = Problem {
        act: x,
        tokens,
        out,
        inp,
        w,
        bias,
        low_rank: low_rank.map(|l| (l.u, l.b)),
        rank,
        algo,
    };
    let y = on_device!(dev, forward(&p))?;
    y.reshape(&out_shape)
}

/// `dx [tokens, in] = dy [tokens, out] · W + v·a`. `dx` has dy's dtype; accumulation is in f32.
///
/// `dy` is f32/f16/bf16 `[.., out]` (leading dims flatten into tokens; the result keeps them). A dense
/// W must have dy's dtype; `v [tokens, r]` and `a [r, in]` may be f32 or dy's dtype.
pub fn linear_backward_input(
    dy: &Tensor,
    w: &BaseWeight,
    low_rank: Option<LowRankBwd<'_>>,
    algo: Algo,
) -> Result<Tensor> {
    let op = "linear_backward_input";
    let (out, inp) = (w.out_features(), w.in_features());
    let tokens = check_common(dy, w, op, "out", out)?;
    let dev = dy.device();
    let mut rank = 0;
    if let Some(lr) = &low_rank {
        check_aux(lr.v, "low-rank v", dy.dtype(), dev, op)?;
        check_aux(lr.a, "low-rank a", dy.dtype(), dev, op)?;
        rank = low_rank_rank(lr.v, lr.a, tokens, (None, Some(inp)), ("v", "a"), op)?;
    }
    let mut out_shape = dy.shape()[..dy.rank() - 1].to_vec();
    out_shape.push(inp);
    let p = Problem {
        act: dy,
        tokens,
        out,
        inp,
        w,
        bias: None,
        low_rank: low_rank.map(|l| (l.v, l.a)),
        rank,
        algo,
    };
    let dx = on_device!(dev, backward_input(&p))?;
    dx.reshape(&out_shape)
}
