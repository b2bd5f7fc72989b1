//! CPU 4-bit quantization: a scalar reference that mirrors bitsandbytes' CUDA code line by line (the
//! test oracle), and a fast path (rayon over 32 Ki-element tasks; AVX-512 intrinsics, or code that the
//! compiler vectorizes for AVX2 or plain x86-64), chosen at run time. Both produce identical bytes.
//!
//! Napkin math for 4096 x 4096 bf16 (n = 16.8 M):
//! * quantize reads 2n bytes and writes n/2 + 4n/64 bytes: 42 MB; per element one multiply and a
//!   4-step threshold search (4 permutes, 4 compares on 16 lanes), ~1.5 vector ops per element, so
//!   ~25 M vector ops: ~4 ms on one 3 GHz core, ~2-3 ms on two; DRAM at ~10 GB/s per core agrees.
//! * dequantize reads n/2 + n/16 bytes and writes 2n: 43 MB, ~1 vector op per output element; the
//!   floor is the write bandwidth (plus first-touch page faults of the fresh output), ~3-5 ms.
//! * double quantization touches n/64 absmax values: < 0.3 ms.
//!
//! Measured (2 shared vCPUs, AVX-512): quantize 7-9 ms, dequantize ~8 ms of CPU time, of which ~3.7 ms is
//! the kernel zeroing the fresh output pages; the AVX2 path is ~4x slower at quantize.
//! `docs/performance.md` has the comparison with bitsandbytes.
//!
//! Files: `reference.rs` (the scalar oracle), `double_quant.rs` (the absmax's 8-bit double
//! quantization), `portable.rs` (shared scalar pieces and the portable quantizer), `avx512.rs` and
//! `avx2.rs` (the intrinsics), and here the ISA choice, the rayon drivers and the tensor entry points.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod double_quant;
mod portable;
mod reference;

pub use double_quant::{double_quant, quantize_8bit};
pub(crate) use double_quant::{double_quant_decode, quantize_8bit_fast, thresholds_8bit};
use portable::{AbsBits, quant_task_portable};
pub use reference::{
    absmax_mean, code_ref, dequantize_reference, double_quant_reference, fp4_code_ref, nf4_code_ref,
    quantize_8bit_ref, quantize_reference,
};

use super::{Absmax, AbsmaxRef, QuantState, QuantType, QuantizeOptions, QuantizedTensor};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// `dequantize_into` outputs at least this large are written with non-temporal stores where supported:
/// they do not stay in cache, and skipping the read-for-ownership of each line cuts memory traffic by a
/// third. Measured on the 2-core dev VM: 11008 x 4096 bf16 (90 MB) 3.5-4.1 ms streamed against 4.4-9.0 ms
/// cached; 4096 x 4096 (32 MiB) is no faster streamed there (its large shared L3 still catches it), so
/// the bar sits above it.
const STREAM_MIN_BYTES: usize = 64 << 20;

/// Code `i` of a packed 4-bit tensor: element 2j sits in the high nibble of byte j.
#[inline(always)]
fn nibble(packed: &[u8], i: usize) -> usize {
    let b = packed[i / 2];
    (if i.is_multiple_of(2) { b >> 4 } else { b & 0xF }) as usize
}

/// Elements per rayon task: a multiple of every blocksize (<= 4096), 16 KiB of packed output.
const TASK: usize = 1 << 15;
/// Elements converted to f32 at a time on the portable path (a multiple of every blocksize).
const TILE: usize = 4096;
/// Absmax values per partial sum of the double-quantization mean (fixed, so the sum order, and the
/// offset's bits, are the same on every device and thread count).
pub const MEAN_CHUNK: usize = 256;

// ------------------------------------------------------------------------------------------------
// Instruction sets
// ------------------------------------------------------------------------------------------------

/// Which implementation of the fast CPU path to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (whatever the compiler's baseline target vectorizes).
    Portable,
    /// Hand-written AVX2 (+ FMA, F16C) intrinsics.
    Avx2,
    /// Hand-written AVX-512 (F, BW, VL) intrinsics.
    Avx512,
}

impl Isa {
    /// True if this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available implementation (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Every implementation this CPU can run (for tests and benches).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    fn check(self) -> Result<()> {
        if self.is_available() {
            Ok(())
        } else {
            Err(Error::device(
                "quant::cpu",
                format!("{self:?} is not available on this CPU"),
            ))
        }
    }
}

fn check_args<T: Element>(blocksize: usize) -> Result<()> {
    T::DTYPE.expect_float("quant::cpu")?;
    if !super::BLOCKSIZES.contains(&blocksize) {
        return Err(Error::invalid(format!(
            "blocksize {blocksize} is not one of {:?}",
            super::BLOCKSIZES
        )));
    }
    Ok(())
}

fn check_sizes(packed: usize, absmax: usize, blocksize: usize, n: usize) -> Result<()> {
    if packed != n.div_ceil(2) || absmax != n.div_ceil(blocksize) {
        return Err(Error::shape(
            "dequantize",
            format!(
                "{n} elements in blocks of {blocksize} need {} packed bytes and {} absmax values, got {packed} and {absmax}",
                n.div_ceil(2),
                n.div_ceil(blocksize)
            ),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Fast path: drivers
// ------------------------------------------------------------------------------------------------

/// Fast quantization of a slice (f32, f16 or bf16) with the given implementation. Non-finite values
/// are an [`Error::NonFinite`] naming `name` and the first bad flat index unless `allow_non_finite`.
pub fn quantize<T: Element>(
    x: &[T],
    qt: QuantType,
    blocksize: usize,
    isa: Isa,
    allow_non_finite: bool,
    name: &str,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_args::<T>(blocksize)?;
    isa.check()?;
    // Dispatch on the dtype to the concrete type (the casts are identities: same type, checked).
    macro_rules! go {
        ($t:ty) => {{
            let xs: &[$t] = bytemuck::try_cast_slice(x).map_err(|e| Error::invalid(e.to_string()))?;
            quantize_typed::<$t>(xs, qt, blocksize, isa, allow_non_finite, name)
        }};
    }
    match T::DTYPE {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("quantize", "f32, f16 or bf16", other)),
    }
}

#[cfg(target_arch = "x86_64")]
trait FastFloat: Element + AbsBits + avx512::Lanes + avx2::Lanes8 {}
#[cfg(target_arch = "x86_64")]
impl<T: Element + AbsBits + avx512::Lanes + avx2::Lanes8> FastFloat for T {}
#[cfg(not(target_arch = "x86_64"))]
trait FastFloat: Element + AbsBits {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Element + AbsBits> FastFloat for T {}

fn quantize_typed<T: FastFloat>(
    x: &[T],
    qt: QuantType,
    bs: usize,
    isa: Isa,
    allow: bool,
    name: &str,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let n = x.len();
    let mut packed: Vec<u8> = zeroed_vec(n.div_ceil(2));
    let mut absmax: Vec<f32> = zeroed_vec(n.div_ceil(bs));
    let bad = packed
        .par_chunks_mut(TASK / 2)
        .zip(absmax.par_chunks_mut(TASK / bs))
        .zip(x.par_chunks(TASK))
        .enumerate()
        .filter_map(|(c, ((p, a), xs))| {
            let r = match isa {
                Isa::Portable => quant_task_portable(xs, p, a, qt, bs, allow),
                // SAFETY: `isa.check()` confirmed the features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::quant_task(xs, p, a, qt, bs, allow) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::quant_task(xs, p, a, qt, bs, allow) },
                #[cfg(not(target_arch = "x86_64"))]
                _ => quant_task_portable(xs, p, a, qt, bs, allow),
            };
            r.map(|i| c * TASK + i)
        })
        .min();
    if let Some(index) = bad {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            index,
            value: x[index].to_f32(),
        });
    }
    Ok((packed, absmax))
}

/// Fast dequantization into a fresh `Vec<T>` (f32, f16 or bf16).
pub fn dequantize<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    blocksize: usize,
    n: usize,
    isa: Isa,
) -> Result<Vec<T>> {
    check_args::<T>(blocksize)?;
    check_sizes(packed.len(), absmax.len(), blocksize, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {{
            let v = dequantize_typed::<$t>(packed, Scales::F32(absmax), qt.code(), blocksize, n, isa);
            bytemuck::allocation::try_cast_vec::<$t, T>(v).map_err(|(e, _)| Error::invalid(e.to_string()))
        }};
    }
    match T::DTYPE {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize", "f32, f16 or bf16", other)),
    }
}

/// A zeroed `Vec<T>` straight from the allocator (calloc: no element-by-element fill, and fresh pages
/// are not touched), with its pages advised as transparent huge pages before the first write.
fn zeroed_vec<T: Element>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = match T::DTYPE.size_in_bytes() {
        1 => bytemuck::allocation::cast_vec(vec![0u8; n]),
        2 => bytemuck::allocation::cast_vec(vec![0u16; n]),
        4 => bytemuck::allocation::cast_vec(vec![0u32; n]),
        _ => vec![T::default(); n],
    };
    advise_huge_pages(&mut v);
    v
}

/// Large outputs are written once, right after allocation; with 4 KiB pages the first-touch page faults
/// cost as much as the kernel itself (8192 faults for a 32 MiB bf16 4096 x 4096 tensor). On Linux with
/// transparent huge pages in `madvise` mode, asking for 2 MiB pages cuts that 512-fold.
fn advise_huge_pages<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(v);
        if bytes < 2 * HUGE {
            return;
        }
        let start = v.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the allocation `v` owns; MADV_HUGEPAGE is only a hint about
            // how to back those pages and never changes their contents. The result is ignored: without
            // THP support the call fails harmlessly.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// First-level scales of a 4-bit tensor on the host: plain f32, or the double-quantized 8-bit codes,
/// decoded on the fly (by dequantization per task into a stack buffer, by the fused GEMV per block), so
/// no tensor-sized f32 absmax is ever built.
#[derive(Clone, Copy)]
pub(crate) enum Scales<'a> {
    F32(&'a [f32]),
    Double {
        codes: &'a [u8],
        nested: &'a [f32],
        offset: f32,
        code: &'a [f32],
        /// `log2(nested_blocksize)` (validation requires a power of two): a 64-bit division per
        /// block would cost more than the decode itself.
        nested_shift: u32,
    },
}

impl<'a> Scales<'a> {
    /// The scales of a validated quant state (see [`QuantState::validate`]), whose tensors are on the host.
    pub(crate) fn of(state: &'a QuantState, op: &'static str) -> Result<Scales<'a>> {
        Ok(match state.absmax.view() {
            AbsmaxRef::F32(t) => Scales::F32(t.cpu_data::<f32>(op)?),
            AbsmaxRef::Double(d) => Scales::Double {
                codes: d.codes.cpu_data::<u8>(op)?,
                nested: d.nested_absmax.cpu_data::<f32>(op)?,
                offset: d.offset,
                code: d.nested_code,
                nested_shift: d.nested_blocksize.trailing_zeros(),
            },
        })
    }

    /// Number of blocks.
    pub(crate) fn len(&self) -> usize {
        match self {
            Scales::F32(a) => a.len(),
            Scales::Double { codes, .. } => codes.len(),
        }
    }

    /// The f32 absmax of block `b`, exactly as bitsandbytes reconstructs it: for double quantization
    /// `code[c] * nested_absmax[b / 256]` rounded, then `+ offset` rounded (two roundings, no FMA).
    #[inline(always)]
    pub(crate) fn get(&self, b: usize) -> f32 {
        match *self {
            Scales::F32(a) => a[b],
            Scales::Double {
                codes,
                nested,
                offset,
                code,
                nested_shift,
            } => {
                let m = code[codes[b] as usize] * nested[b >> nested_shift];
                m + offset
            }
        }
    }

    /// The absmax of blocks `range`: borrowed, or decoded into `buf`.
    #[inline]
    fn slice<'b>(&self, range: std::ops::Range<usize>, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Scales::F32(a) => &a[range],
            Scales::Double { .. } => {
                let out = &mut buf[..range.len()];
                for (o, b) in out.iter_mut().zip(range) {
                    *o = self.get(b);
                }
                out
            }
        }
    }
}

fn dequantize_typed<T: FastFloat>(
    packed: &[u8],
    absmax: Scales<'_>,
    lut: &[f32; 16],
    bs: usize,
    n: usize,
    isa: Isa,
) -> Vec<T> {
    let mut out: Vec<T> = zeroed_vec(n);
    // Fresh pages were just zeroed by the kernel and sit in cache: regular stores beat streaming here.
    dequantize_typed_into(packed, absmax, lut, bs, isa, false, &mut out);
    out
}

/// The fast path into an existing buffer of exactly `n` elements: no allocation and no fresh pages to
/// fault in (what a training step that re-dequantizes a weight each step wants).
fn dequantize_typed_into<T: FastFloat>(
    packed: &[u8],
    absmax: Scales<'_>,
    lut: &[f32; 16],
    bs: usize,
    isa: Isa,
    allow_stream: bool,
    out: &mut [T],
) {
    let stream = allow_stream && std::mem::size_of_val(out) >= STREAM_MIN_BYTES;
    let per_task = TASK / bs;
    out.par_chunks_mut(TASK)
        .zip(packed.par_chunks(TASK / 2))
        .enumerate()
        .for_each(|(t, (o, p))| {
            let mut buf = [0f32; TASK / 32];
            let first = t * per_task;
            let a = absmax.slice(first..first + o.len().div_ceil(bs), &mut buf);
            dequant_task_dispatch(p, a, lut, bs, isa, stream, o)
        });
}

/// One task of [`dequantize_typed_into`] on the best path this CPU has.
#[inline]
fn dequant_task_dispatch<T: FastFloat>(
    p: &[u8],
    a: &[f32],
    lut: &[f32; 16],
    bs: usize,
    isa: Isa,
    stream: bool,
    o: &mut [T],
) {
    match isa {
        // SAFETY: `isa.check()` confirmed the features on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => match bytemuck::try_cast_slice_mut::<T, bf16>(o) {
            // SAFETY: as above, plus the bf16 feature checked by `has_bf16`; blocksizes are
            // multiples of 32.
            Ok(ob) if T::DTYPE == DType::BF16 && avx512::has_bf16() => unsafe {
                if !(stream && avx512::dequant_task_bf16_stream(p, a, lut, bs, ob)) {
                    avx512::dequant_task_bf16(p, a, lut, bs, ob)
                }
            },
            // SAFETY: as above.
            _ => unsafe { avx512::dequant_task(p, a, lut, bs, o) },
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dequant_task(p, a, lut, bs, o) },
        _ => dequant_task_portable(p, a, lut, bs, o),
    }
}

#[inline(always)]
fn dequant_task_portable<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    bs: usize,
    out: &mut [T],
) {
    let mut buf = vec![0f32; TILE.min(out.len())];
    for ((pt, ot), at) in packed
        .chunks(TILE / 2)
        .zip(out.chunks_mut(TILE))
        .zip(absmax.chunks(TILE / bs))
    {
        let f = &mut buf[..ot.len()];
        for ((pb, fb), &am) in pt.chunks(bs / 2).zip(f.chunks_mut(bs)).zip(at) {
            let pairs = fb.len() / 2;
            for (o, &b) in fb[..pairs * 2].chunks_exact_mut(2).zip(pb) {
                o[0] = lut[(b >> 4) as usize] * am;
                o[1] = lut[(b & 0xF) as usize] * am;
            }
            if fb.len() % 2 == 1 {
                fb[pairs * 2] = lut[(pb[pairs] >> 4) as usize] * am;
            }
        }
        from_f32_slice(f, ot);
    }
}

fn from_f32_slice<T: Element>(f: &[f32], out: &mut [T]) {
    use half::slice::HalfFloatSliceExt;
    if T::DTYPE == DType::F32 {
        if let Ok(o) = bytemuck::try_cast_slice_mut::<T, f32>(out) {
            o.copy_from_slice(f);
            return;
        }
    } else if T::DTYPE == DType::F16 {
        if let Ok(o) = bytemuck::try_cast_slice_mut::<T, f16>(out) {
            o.convert_from_f32_slice(f);
            return;
        }
    } else if T::DTYPE == DType::BF16
        && let Ok(o) = bytemuck::try_cast_slice_mut::<T, u16>(out)
    {
        // half::bf16::from_f32 written branch-free so that it vectorizes.
        for (o, &v) in o.iter_mut().zip(f) {
            let b = v.to_bits();
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            let quiet = ((b >> 16) | 0x40) as u16;
            *o = if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
                quiet
            } else {
                rounded
            };
        }
        return;
    }
    for (o, &v) in out.iter_mut().zip(f) {
        *o = T::from_f32(v);
    }
}

// ------------------------------------------------------------------------------------------------
// Tensor-level entry points
// ------------------------------------------------------------------------------------------------

pub(super) fn quantize_tensor(t: &Tensor, opts: &QuantizeOptions) -> Result<(Tensor, Absmax)> {
    let isa = Isa::best();
    macro_rules! go {
        ($t:ty) => {
            quantize(
                t.cpu_data::<$t>("quantize")?,
                opts.quant_type,
                opts.blocksize,
                isa,
                opts.allow_non_finite,
                &opts.name,
            )?
        };
    }
    let (packed, absmax) = match t.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => return Err(Error::dtype("quantize", "f32, f16 or bf16", other)),
    };
    let nbytes = packed.len();
    let data = Tensor::from_vec(packed, &[nbytes], Device::Cpu)?;
    let nb = absmax.len();
    let absmax = if opts.double_quant {
        let (codes, nested, offset) = double_quant(&absmax);
        Absmax::double_from_host(codes, nested, offset, Device::Cpu)?
    } else {
        Absmax::F32(Tensor::from_vec(absmax, &[nb], Device::Cpu)?)
    };
    Ok((data, absmax))
}

/// The f32 absmax of a CPU quant state (decoding double quantization).
pub(super) fn absmax_f32(state: &QuantState) -> Result<Vec<f32>> {
    match state.absmax.view() {
        AbsmaxRef::F32(t) => Ok(t.cpu_data::<f32>("absmax")?.to_vec()),
        AbsmaxRef::Double(d) => super::double_quant_decode_blocks(
            d.codes.cpu_data::<u8>("absmax codes")?,
            d.nested_absmax.cpu_data::<f32>("nested_absmax")?,
            d.offset,
            d.nested_code,
            d.nested_blocksize,
        ),
    }
}

/// [`QuantizedTensor::dequantize_into`] on the CPU: `out` holds exactly the tensor's elements.
pub(super) fn dequantize_tensor_into(q: &QuantizedTensor, out: &mut Tensor) -> Result<()> {
    let st = &q.state;
    let absmax = Scales::of(st, "dequantize")?;
    let packed = q.data.cpu_data::<u8>("packed 4-bit data")?;
    let (n, qt, bs, isa) = (st.numel(), st.quant_type, st.blocksize, Isa::best());
    check_args::<f32>(bs)?;
    check_sizes(packed.len(), absmax.len(), bs, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {{
            let o = out.cpu_data_mut::<$t>("dequantize_into")?;
            dequantize_typed_into::<$t>(packed, absmax, qt.code(), bs, isa, true, o);
            Ok(())
        }};
    }
    match out.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize_into", "f32, f16 or bf16", other)),
    }
}

pub(super) fn dequantize_tensor(q: &QuantizedTensor, dtype: DType) -> Result<Tensor> {
    let st = &q.state;
    let absmax = Scales::of(st, "dequantize")?;
    let packed = q.data.cpu_data::<u8>("packed 4-bit data")?;
    let (n, qt, bs, isa) = (st.numel(), st.quant_type, st.blocksize, Isa::best());
    check_args::<f32>(bs)?;
    check_sizes(packed.len(), absmax.len(), bs, n)?;
    isa.check()?;
    macro_rules! go {
        ($t:ty) => {
            Tensor::from_vec(
                dequantize_typed::<$t>(packed, absmax, qt.code(), bs, n, isa),
                &st.shape,
                Device::Cpu,
            )
        };
    }
    match dtype {
        DType::F32 => go!(f32),
        DType::F16 => go!(f16),
        DType::BF16 => go!(bf16),
        other => Err(Error::dtype("dequantize", "f32, f16 or bf16", other)),
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::avx512;
    use crate::quant::NF4_CODE;
    use crate::rng::Rng;
    use half::bf16;

    /// The streaming bf16 path writes exactly what the cached path writes, for every misalignment of
    /// the output (0..=31 values before a 64-byte boundary), every blocksize, lengths that are not a
    /// multiple of 32 (ragged head and tail, tasks shorter than one line), zero blocks, and it refuses
    /// (writing nothing) a task with a subnormal absmax.
    #[test]
    fn streaming_bf16_dequant_equals_the_cached_path() {
        if !(avx512::has_bf16() && super::Isa::Avx512.is_available()) {
            eprintln!("SKIPPED (no AVX-512 BF16 on this CPU)");
            return;
        }
        let mut rng = Rng::new(7);
        let poison = bf16::from_bits(0x7FC1);
        for bs in crate::quant::BLOCKSIZES {
            for n in [1, 31, 32, 33, 95, bs - 1, bs, 3 * bs + 17, 4 * bs] {
                let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.below(256) as u8).collect();
                let mut absmax: Vec<f32> = (0..n.div_ceil(bs))
                    .map(|_| rng.uniform_range(0.01, 40.0))
                    .collect();
                absmax[0] = 0.0;
                let mut want = vec![poison; n];
                // SAFETY: features checked above; one consistent task; bs is a multiple of 32.
                unsafe { avx512::dequant_task_bf16(&packed, &absmax, &NF4_CODE, bs, &mut want) };
                let mut buf = vec![poison; n + 64];
                for shift in 0..32 {
                    buf.fill(poison);
                    // Offset the slice so `shift` values precede its first 64-byte boundary.
                    let base = buf.as_ptr() as usize;
                    let at = (0..64).find(|&o| (base + 2 * o).is_multiple_of(64)).unwrap();
                    let start = (at + 32 - shift) % 32;
                    let out = &mut buf[start..start + n];
                    // SAFETY: as above.
                    assert!(unsafe {
                        avx512::dequant_task_bf16_stream(&packed, &absmax, &NF4_CODE, bs, out)
                    });
                    let got: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
                    let exp: Vec<u16> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, exp, "bs {bs}, n {n}, shift {shift}");
                    assert!(
                        buf[..start]
                            .iter()
                            .chain(&buf[start + n..])
                            .all(|v| v.to_bits() == 0x7FC1)
                    );
                }
                let mut sub = absmax.clone();
                *sub.last_mut().unwrap() = 1e-39;
                let mut out = vec![poison; n];
                // SAFETY: as above.
                assert!(!unsafe { avx512::dequant_task_bf16_stream(&packed, &sub, &NF4_CODE, bs, &mut out) });
                assert!(out.iter().all(|v| v.to_bits() == 0x7FC1), "a refused task wrote");
            }
        }
    }
}
