//! Storage tiers of a frozen base linear beyond bitsandbytes' 4-bit: the bit-widths QR-Adaptor
//! (Zhou et al., arXiv 2505.03802) chooses from per layer.
//!
//! | tier | storage |
//! |---|---|
//! | [`Tier::Bits2`], [`Tier::Bits3`] | k-bit NormalFloat codes, blockwise absmax (optionally double-quantized) |
//! | [`Tier::Bits4`] | bitsandbytes NF4/FP4 ([`crate::quant::QuantizedTensor`]), byte-exact |
//! | [`Tier::Bits8`] | 8-bit blockwise |
//! | [`Tier::Bits16`] | unquantized 16-bit |
//!
//! # k-bit storage ([`KBitTensor`]: bits 2, 3, 8 and 16)
//!
//! * **Code books.** 2- and 3-bit codes are k-bit NormalFloat, built exactly as bitsandbytes builds NF4
//!   (`create_normal_map` in bitsandbytes `functional.py`, Dettmers et al., QLoRA, arXiv 2305.14314):
//!   `2^(k-1)` quantiles of N(0, 1) on the positive side, `2^(k-1) - 1` on the negative side, an exact
//!   zero, normalized by the largest so the table spans [-1, 1] ([`create_normal_map`]; the offset is
//!   QLoRA's `1 - (1/(2(2^k - 1)) + 1/(2·2^k)) / 2`, which is bitsandbytes' 0.9677083 at k = 4, and
//!   `tests/kbit.rs` checks that the builder reproduces [`crate::quant::NF4_CODE`] at k = 4).
//! * **8-bit is absmax int8** (`q = round(127·x/absmax)`, `q ∈ [-127, 127]`, stored as two's complement),
//!   not bitsandbytes' dynamic map: weights normalized by their block absmax are roughly Gaussian and
//!   mostly within ±0.5, where the uniform grid's step (1/127 ≈ 0.0079) is about half the dynamic map's
//!   (≈ 0.014 between 0.1 and 1), so the int8 grid has the lower error on weights (the dynamic map wins
//!   for heavy-tailed optimizer states, what bitsandbytes made it for). `tests/kbit.rs` measures both.
//! * **Scales.** Blockwise absmax over `blocksize` consecutive elements of the row-major tensor (the
//!   options' blocksize), f32, or double-quantized with the crate's 4-bit double quantization
//!   ([`crate::quant::cpu::double_quant`]: 8-bit dynamic-map codes in blocks of 256 plus the mean offset).
//!   A block of zeros has absmax 0 and stores the code of 0.
//! * **Decoding** is `code[c] * absmax` in f32 for every k-bit tier (the 8-bit code is `q / 127`), the
//!   same rule as bitsandbytes' 4-bit dequantization. Encoding scales `x * (1 / absmax)` in f32 and
//!   takes the nearest code (2/3-bit: the number of f32 midpoints strictly below; 8-bit: round half
//!   away from zero). NaN (with `allow_non_finite`) takes code 0 of the 2/3-bit books and q = 0 at 8 bits.
//! * **Packing** ([`pack_codes`]): 2-bit, four codes per byte, element `4j` in the top two bits of byte
//!   `j`; 3-bit, eight codes per three bytes, read as a big-endian 24-bit word with element `8g + i` at
//!   bits `21 - 3i ..`; 8-bit, one byte each. Blocksizes are multiples of 8, so a block never splits a
//!   byte group. The code bytes are `ceil(numel·k / 8)`.
//! * **16-bit** stores the weight as bf16 whatever the activation dtype, upcast per panel on use, so the
//!   tier costs 2 bytes per weight (the loader keeps a plain dense weight when activations are already
//!   16-bit).
//!
//! CPU: `cpu.rs` (rayon over blocks; the decode used by the qmatmul panels). CUDA: `kernels/kbit.cu`
//! (quantize and dequantize, the dequantized weight feeds the dense cuBLAS path of qmatmul).
//!
//! [`Tier::storage_bytes`] is the byte count the memory model of a search uses; it must equal
//! [`crate::qmatmul::BaseWeight::size_in_bytes`] of the weight the loader builds for that tier.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod cuda;

use crate::device::{Device, on_device};
use crate::error::{Error, Result};
use crate::quant::{Absmax, BLOCKSIZES, QuantizeOptions, QuantizedTensor};
use crate::tensor::{DType, Tensor};

/// The bit-width tier of one frozen base linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Tier {
    /// 2-bit NormalFloat.
    Bits2,
    /// 3-bit NormalFloat.
    Bits3,
    /// bitsandbytes 4-bit (the quant type of the load options: NF4 by default).
    Bits4,
    /// 8-bit blockwise.
    Bits8,
    /// Unquantized 16-bit.
    Bits16,
}

impl Tier {
    /// Every tier, narrowest first.
    pub const ALL: [Tier; 5] = [Tier::Bits2, Tier::Bits3, Tier::Bits4, Tier::Bits8, Tier::Bits16];

    /// The nominal bits per weight (2, 3, 4, 8 or 16).
    pub fn bits(self) -> u8 {
        match self {
            Tier::Bits2 => 2,
            Tier::Bits3 => 3,
            Tier::Bits4 => 4,
            Tier::Bits8 => 8,
            Tier::Bits16 => 16,
        }
    }

    /// The tier of `bits`.
    pub fn from_bits(bits: u8) -> Result<Tier> {
        Tier::ALL.into_iter().find(|t| t.bits() == bits).ok_or_else(|| {
            Error::invalid(format!(
                "no storage tier of {bits} bits (expected 2, 3, 4, 8 or 16)"
            ))
        })
    }

    /// Bytes of a `numel`-element weight stored in this tier with `opts`' blocksize and double
    /// quantization: packed codes, plus the scales as [`crate::qmatmul::BaseWeight::size_in_bytes`] counts
    /// them (first-level f32 absmax; or u8 codes + one f32 per 256 blocks + the 256-entry f32 nested code
    /// book). 16-bit: two bytes per element.
    pub fn storage_bytes(self, numel: usize, opts: &QuantizeOptions) -> usize {
        let bits = self.bits() as usize;
        if self == Tier::Bits16 {
            return 2 * numel;
        }
        let codes = (numel * bits).div_ceil(8);
        let nblocks = numel.div_ceil(opts.blocksize.max(1));
        let scales = if opts.double_quant {
            nblocks + 4 * nblocks.div_ceil(256) + 4 * 256
        } else {
            4 * nblocks
        };
        codes + scales
    }
}

impl From<Tier> for u8 {
    fn from(t: Tier) -> u8 {
        t.bits()
    }
}

impl TryFrom<u8> for Tier {
    type Error = Error;
    fn try_from(bits: u8) -> Result<Tier> {
        Tier::from_bits(bits)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bits())
    }
}

impl std::str::FromStr for Tier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Tier> {
        let bits: u8 = s
            .trim()
            .parse()
            .map_err(|_| Error::invalid(format!("bad bit-width {s:?} (expected 2, 3, 4, 8 or 16)")))?;
        Tier::from_bits(bits)
    }
}

/// The bit-widths a [`KBitTensor`] stores (4-bit is [`QuantizedTensor`]).
pub const KBIT_WIDTHS: [u8; 4] = [2, 3, 8, 16];

/// QLoRA's NormalFloat offset for `k` bits: the quantile of the extreme code,
/// `1 - (1/(2(2^k - 1)) + 1/(2·2^k)) / 2` (0.9677083 at k = 4, bitsandbytes' constant).
pub fn normal_float_offset(k: u8) -> f64 {
    let n = (1u64 << k) as f64;
    1.0 - 0.5 * (1.0 / (2.0 * (n - 1.0)) + 1.0 / (2.0 * n))
}

/// The standard normal quantile `Φ⁻¹(p)` for `p ∈ (0, 1)`: Newton's method on libm's `erfc`
/// (`Φ(x) = erfc(-x/√2)/2`), started at 0 on the side of the mean where Φ is concave or convex so the
/// iterates approach the root monotonically; accurate to a few f64 ulps.
fn normal_ppf(p: f64) -> f64 {
    if p < 0.5 {
        return -normal_ppf(1.0 - p);
    }
    let mut x = 0.0f64;
    for _ in 0..200 {
        let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let dx = (cdf - p) / pdf;
        x -= dx;
        if dx.abs() <= 1e-16 * x.abs().max(1.0) {
            break;
        }
    }
    x
}

/// `torch.linspace(start, end, steps)` in f32 (the scalar formula of torch's CPU kernel: from the start
/// for the first half, from the end for the second).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps as f32 - 1.0);
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// The `2^k`-entry NormalFloat code book, ascending, built as bitsandbytes' `create_normal_map(offset,
/// use_extra_value=True)` builds NF4 (k = 4): `Φ⁻¹` of `linspace(offset, 0.5, 2^(k-1) + 1)[:-1]` (the
/// positive half), minus `Φ⁻¹` of `linspace(offset, 0.5, 2^(k-1))[:-1]` (the negative half, one entry
/// shorter), an exact 0, sorted and divided by the largest entry. `k` in 2..=8, `offset` in (0.5, 1).
pub fn create_normal_map(k: u8, offset: f32) -> Result<Vec<f32>> {
    if !((2..=8).contains(&k) && offset > 0.5 && offset < 1.0) {
        return Err(Error::invalid(format!(
            "create_normal_map: need 2 <= k <= 8 and 0.5 < offset < 1, got k = {k}, offset = {offset}"
        )));
    }
    let half = 1usize << (k - 1);
    let pos = linspace_f32(offset, 0.5, half + 1);
    let neg = linspace_f32(offset, 0.5, half);
    let mut v: Vec<f32> = pos[..half].iter().map(|&p| normal_ppf(p as f64) as f32).collect();
    v.push(0.0);
    v.extend(neg[..half - 1].iter().map(|&p| -normal_ppf(p as f64) as f32));
    v.sort_by(f32::total_cmp);
    let max = v[v.len() - 1];
    Ok(v.into_iter().map(|c| c / max).collect())
}

/// The code book of a k-bit tier (`bits` 2, 3 or 8): NF2/NF3 ([`create_normal_map`] with
/// [`normal_float_offset`]), or the int8 table `code[c] = (c as i8) / 127` indexed by the stored byte.
pub fn code(bits: u8) -> Result<&'static [f32]> {
    static NF2: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    static NF3: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    static INT8: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let nf = |k: u8| create_normal_map(k, normal_float_offset(k) as f32).expect("k and offset are in range");
    Ok(match bits {
        2 => NF2.get_or_init(|| nf(2)),
        3 => NF3.get_or_init(|| nf(3)),
        8 => INT8.get_or_init(|| (0..=255u8).map(|c| c as i8 as f32 / 127.0).collect()),
        _ => {
            return Err(Error::invalid(format!(
                "no k-bit code book of {bits} bits (expected 2, 3 or 8)"
            )));
        }
    })
}

/// Decision thresholds of the 2/3-bit books: the f32 midpoints of neighbouring codes (the code of a
/// scaled value is the number of thresholds strictly below it).
pub(crate) fn thresholds(bits: u8) -> &'static [f32] {
    static T2: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    static T3: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let mid = |b: u8| {
        let c = code(b).expect("2 or 3 bits");
        c.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect::<Vec<f32>>()
    };
    match bits {
        2 => T2.get_or_init(|| mid(2)),
        _ => T3.get_or_init(|| mid(3)),
    }
}

/// The stored code of 0.0 for `bits` (2, 3 or 8).
pub fn zero_code(bits: u8) -> u8 {
    match bits {
        2 => 1,
        3 => 3,
        _ => 0,
    }
}

fn check_code_bits(bits: u8, op: &str) -> Result<()> {
    if matches!(bits, 2 | 3 | 8) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{op}: codes of {bits} bits cannot be packed (expected 2, 3 or 8)"
        )))
    }
}

/// Packs `codes` (each `< 2^bits`) into `ceil(len·bits/8)` bytes in the layout of the module docs.
pub fn pack_codes(bits: u8, codes: &[u8]) -> Result<Vec<u8>> {
    check_code_bits(bits, "pack_codes")?;
    if let Some(i) = codes.iter().position(|&c| bits < 8 && c >> bits != 0) {
        return Err(Error::invalid(format!(
            "pack_codes: code {} at {i} does not fit {bits} bits",
            codes[i]
        )));
    }
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    cpu::pack(bits, codes, &mut out);
    Ok(out)
}

/// The first `n` codes of `ceil(n·bits/8)` packed bytes (the inverse of [`pack_codes`]).
pub fn unpack_codes(bits: u8, data: &[u8], n: usize) -> Result<Vec<u8>> {
    check_code_bits(bits, "unpack_codes")?;
    if data.len() != (n * bits as usize).div_ceil(8) {
        return Err(Error::shape(
            "unpack_codes",
            format!(
                "{n} codes of {bits} bits need {} bytes, got {}",
                (n * bits as usize).div_ceil(8),
                data.len()
            ),
        ));
    }
    Ok((0..n).map(|i| cpu::code_at(bits, data, i)).collect())
}

/// Bytes of stored scales as the memory model counts them: the f32 absmax, or the u8 codes + the f32
/// nested absmax + the 256-entry f32 nested code book (the offset is not counted).
pub(crate) fn scale_bytes(a: &Absmax) -> usize {
    match a {
        Absmax::F32(t) => t.size_in_bytes(),
        Absmax::Double {
            codes,
            nested_absmax,
            nested_code,
            ..
        } => codes.size_in_bytes() + nested_absmax.size_in_bytes() + 4 * nested_code.len(),
    }
}

/// A tensor stored in a k-bit tier: 2/3-bit NormalFloat or 8-bit int8 codes with blockwise absmax, or
/// bf16 values (16 bits). See the module docs for the layout.
///
/// ```
/// use peft_kernels::{DType, Device, Tensor};
/// use peft_kernels::kbit::KBitTensor;
/// use peft_kernels::quant::QuantizeOptions;
/// let w = Tensor::randn(&[512, 512], 0.02, 0, DType::F32, Device::Cpu)?;
/// let q = KBitTensor::quantize(&w, 3, &QuantizeOptions::default())?;
/// // 3 bits of codes + one u8 absmax code per 64 weights + the nested scales and 1 KiB code book.
/// assert!(q.bits_per_weight() < 3.2);
/// assert_eq!(q.dequantize(DType::F32)?.shape(), &[512, 512]);
/// # Ok::<(), peft_kernels::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct KBitTensor {
    /// 2, 3, 8 or 16.
    pub bits: u8,
    /// Packed codes `u8 [ceil(numel·bits/8)]`, or `bf16 [numel]` at 16 bits.
    pub data: Tensor,
    /// Per-block scales (`None` exactly at 16 bits).
    pub absmax: Option<Absmax>,
    /// Elements per absmax block (one of [`BLOCKSIZES`]; kept but unused at 16 bits).
    pub blocksize: usize,
    /// The original shape.
    pub shape: Vec<usize>,
    /// The original dtype.
    pub dtype: DType,
}

impl KBitTensor {
    /// Stores `t` (f32/f16/bf16, at least one element) in `bits` (2, 3, 8 or 16) on its device, with
    /// `opts`' blocksize and double quantization (its quant type is ignored). Non-finite inputs are an
    /// [`Error::NonFinite`] unless `opts.allow_non_finite`.
    pub fn quantize(t: &Tensor, bits: u8, opts: &QuantizeOptions) -> Result<KBitTensor> {
        opts.validate()?;
        t.dtype().expect_float("KBitTensor::quantize")?;
        if !KBIT_WIDTHS.contains(&bits) {
            return Err(Error::invalid(format!(
                "KBitTensor: no storage of {bits} bits (expected 2, 3, 8 or 16)"
            )));
        }
        let n = t.numel();
        if n == 0 || n > (i64::MAX as usize) / 8 {
            return Err(Error::shape(
                "KBitTensor::quantize",
                format!(
                    "tensor '{}' of shape {:?} has no elements or too many",
                    opts.name,
                    t.shape()
                ),
            ));
        }
        let (data, absmax) = if bits == 16 {
            if !opts.allow_non_finite {
                cpu::check_finite(t, &opts.name)?;
            }
            (t.to_dtype(DType::BF16)?.reshape(&[n])?, None)
        } else {
            let (data, absmax) = on_device!(t.device(), quantize(t, bits, opts))?;
            let absmax = if opts.double_quant {
                double_quant(&absmax)?
            } else {
                Absmax::F32(absmax)
            };
            (data, Some(absmax))
        };
        Ok(KBitTensor {
            bits,
            data,
            absmax,
            blocksize: opts.blocksize,
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of absmax blocks.
    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize.max(1))
    }

    /// The original shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        self.data.device()
    }

    /// Dequantizes to `dtype` (f32, f16 or bf16) with the original shape, on this tensor's device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        dtype.expect_float("KBitTensor::dequantize")?;
        self.validate("KBitTensor::dequantize")?;
        if self.bits == 16 {
            return self.data.to_dtype(dtype)?.reshape(&self.shape);
        }
        on_device!(self.device(), dequantize(self, dtype))?.reshape(&self.shape)
    }

    /// The per-block absmax as f32 on the host (double quantization decoded).
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        match &self.absmax {
            None => Ok(Vec::new()),
            Some(a) => a.to_host_f32(),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Result<KBitTensor> {
        self.try_map_tensors(|t| t.to_device(device))
    }

    /// The same tensor with each stored tensor replaced by `f(tensor)` (device copies, deep copies).
    pub fn try_map_tensors(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<KBitTensor> {
        let absmax = self.absmax.as_ref().map(|a| a.try_map(&mut f)).transpose()?;
        Ok(KBitTensor {
            data: f(&self.data)?,
            absmax,
            ..self.clone()
        })
    }

    /// Bytes of codes plus scales, as [`Tier::storage_bytes`] counts them (16 bits: two per element).
    pub fn size_in_bytes(&self) -> usize {
        self.data.size_in_bytes() + self.absmax.as_ref().map_or(0, scale_bytes)
    }

    /// `size_in_bytes * 8 / numel`.
    pub fn bits_per_weight(&self) -> f64 {
        self.size_in_bytes() as f64 * 8.0 / self.numel().max(1) as f64
    }

    /// The storage tier.
    pub fn tier(&self) -> Tier {
        Tier::from_bits(self.bits).unwrap_or(Tier::Bits16)
    }

    /// `"nf2"`, `"nf3"`, `"int8"` (with `-dq` when double-quantized) or `"bf16"`.
    pub fn format_name(&self) -> String {
        let dq = if matches!(self.absmax, Some(Absmax::Double { .. })) {
            "-dq"
        } else {
            ""
        };
        match self.bits {
            2 => format!("nf2{dq}"),
            3 => format!("nf3{dq}"),
            8 => format!("int8{dq}"),
            _ => "bf16".to_string(),
        }
    }

    /// Checks the internal consistency: bits, blocksize, data dtype and length, scales, devices.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let n = self.numel();
        let dev = self.device();
        if !KBIT_WIDTHS.contains(&self.bits) {
            return Err(Error::invalid(format!(
                "{op}: k-bit tensor of {} bits",
                self.bits
            )));
        }
        if self.bits == 16 {
            if self.data.dtype() != DType::BF16 || self.data.numel() != n || self.absmax.is_some() {
                return Err(Error::shape(
                    op,
                    format!("16-bit storage must be bf16 [{n}] without scales"),
                ));
            }
            return Ok(());
        }
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(Error::invalid(format!(
                "{op}: blocksize {} is not one of {BLOCKSIZES:?}",
                self.blocksize
            )));
        }
        let want = (n * self.bits as usize).div_ceil(8);
        if self.data.dtype() != DType::U8 || self.data.numel() != want {
            return Err(Error::shape(
                op,
                format!(
                    "{}-bit codes of {n} elements need u8 [{want}], got {} {:?}",
                    self.bits,
                    self.data.dtype(),
                    self.data.shape()
                ),
            ));
        }
        let nb = self.nblocks();
        let ok = match &self.absmax {
            Some(Absmax::F32(t)) => t.dtype() == DType::F32 && t.numel() == nb && t.device() == dev,
            Some(Absmax::Double {
                codes,
                nested_absmax,
                offset,
                nested_code,
                nested_blocksize,
            }) => {
                codes.dtype() == DType::U8
                    && codes.numel() == nb
                    && nested_absmax.dtype() == DType::F32
                    && *nested_blocksize > 0
                    && nested_absmax.numel() == nb.div_ceil(*nested_blocksize)
                    && nested_code.len() == 256
                    && offset.is_finite()
                    && codes.device() == dev
                    && nested_absmax.device() == dev
            }
            None => false,
        };
        if !ok {
            return Err(Error::shape(
                op,
                format!("{}-bit scales do not match {nb} blocks on {dev}", self.bits),
            ));
        }
        Ok(())
    }
}

/// Double-quantizes an f32 absmax vector with the crate's 4-bit double quantization (the CPU
/// implementation on any device: the vector is `numel / blocksize` floats).
fn double_quant(absmax: &Tensor) -> Result<Absmax> {
    let (codes, nested, offset) = crate::quant::cpu::double_quant(&absmax.to_vec::<f32>()?);
    Absmax::double_from_host(codes, nested, offset, absmax.device())
}

/// `w` stored in `tier` with `opts` and read back as f32, and the stored bytes: what a tier costs and
/// what it changes. 4-bit uses [`QuantizedTensor`] (its quant type from `opts`).
pub fn round_trip(w: &Tensor, tier: Tier, opts: &QuantizeOptions) -> Result<(Tensor, usize)> {
    match tier {
        Tier::Bits4 => {
            let q = QuantizedTensor::quantize(w, opts)?;
            let bytes = q.data.size_in_bytes() + scale_bytes(&q.state.absmax);
            Ok((q.dequantize(DType::F32)?, bytes))
        }
        t => {
            let k = KBitTensor::quantize(w, t.bits(), opts)?;
            Ok((k.dequantize(DType::F32)?, k.size_in_bytes()))
        }
    }
}

/// The relative quantization error `‖W − Q(W)‖ / ‖W‖` (Frobenius, f64 sums) of `w` stored in `tier`,
/// and the stored bytes. 0 for an all-zero `w`.
pub fn relative_error(w: &Tensor, tier: Tier, opts: &QuantizeOptions) -> Result<(f64, usize)> {
    let (q, bytes) = round_trip(w, tier, opts)?;
    let (a, b) = (w.to_vec_f32()?, q.to_vec_f32()?);
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        num += (x as f64 - y as f64).powi(2);
        den += (x as f64).powi(2);
    }
    Ok((if den > 0.0 { (num / den).sqrt() } else { 0.0 }, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_and_print_their_bits() {
        for t in Tier::ALL {
            assert_eq!(t.to_string().parse::<Tier>().unwrap(), t);
            assert_eq!(Tier::try_from(u8::from(t)).unwrap(), t);
        }
        assert!("5".parse::<Tier>().is_err());
        assert!("x".parse::<Tier>().is_err());
    }

    #[test]
    fn four_bit_bytes_match_the_hand_count() {
        let plain = QuantizeOptions {
            double_quant: false,
            ..Default::default()
        };
        // 384x384 NF4, blocksize 64: 73,728 code bytes + 2,304 blocks x 4 bytes.
        assert_eq!(Tier::Bits4.storage_bytes(384 * 384, &plain), 73_728 + 9_216);
        // Double quant: 2,304 u8 codes + 9 nested f32 + the 1 KiB nested code book.
        assert_eq!(
            Tier::Bits4.storage_bytes(384 * 384, &QuantizeOptions::default()),
            73_728 + 2_304 + 36 + 1_024
        );
        assert_eq!(Tier::Bits16.storage_bytes(10, &plain), 20);
        assert_eq!(Tier::Bits3.storage_bytes(8, &plain), 3 + 4);
    }
}
