//! bitsandbytes' blockwise 8-bit Adam on one quantization block with AVX2 intrinsics, for CPUs without
//! AVX-512: the twin of `avx512.rs` on 8 lanes, the same IEEE f32 operations in the same order as the
//! portable `block8` in `mod.rs` (no FMA contraction; the block normalizations use the exact FMA
//! quotient of [`BlockDiv`]), so the results are bit-identical (tested in `mod.rs`).
//!
//! Per 8 elements: one 8-lane gather per map for the dequantization (`vgatherdps` from the 1 KB map,
//! L1-resident) and one per map for the nearest-code search (a [`Wide`] word indexed by the top 16 bits
//! of the normalized moment, 4 operations around it), 1 square root and 1 divide (the parameter), the
//! two block normalizations as reciprocal + FMA correction. Measured on Zen 3 (perf annotate), the four
//! gathers take about half the kernel's cycles; scalar loads instead of them (a software gather per
//! block) were slower. On 64 cache-resident blocks on one Zen 3 core the kernel takes 2.7 ns per
//! element; without the two nearest-code gathers 1.9 ns, and with their index confined to 1 KB of
//! the table still 2.7 ns: the gathers' throughput bounds it, not cache misses on the 256 KB tables.
//! AVX2 has no byte-masked loads and stores and AMD's `vmaskmovps` store is microcoded: whole groups
//! use plain 8-byte code loads/stores and a blend before a plain float store; only a block's last,
//! partial group goes through a byte buffer and masked moves, with a lane mask keeping its tail out of
//! the block maxima.

use super::Scratch;
use crate::optim::BnbScalars;
use crate::optim::eightbit::{BLOCK, Tables, WIDE_LEN, Wide};
use std::arch::x86_64::*;

// The bucket index is the top 16 bits of an f32.
const _: () = assert!(WIDE_LEN == 1 << 16);

/// [`Wide`]'s words of 8 lanes of moment bits `x` (one gather).
#[target_feature(enable = "avx2")]
#[inline]
fn gather_words(x: __m256i, wide: &Wide) -> __m256i {
    let idx = _mm256_srli_epi32::<16>(x);
    // SAFETY: every lane of `idx` is below 2^16 = WIDE_LEN, the number of words.
    unsafe { _mm256_i32gather_epi32::<4>(wide.words().as_ptr() as *const i32, idx) }
}

/// The nearest codes of 8 lanes of moment bits `x` from their [`Wide`] words `w` (4 operations): the
/// bucket's code, plus one where `x` lies above the bucket's threshold. Lanes in 0..=256: 256 only for
/// a NaN in the bucket of +inf, which is code 0 once reduced to a byte.
#[target_feature(enable = "avx2")]
#[inline]
fn encode(bits: __m256i, w: __m256i) -> __m256i {
    let low = _mm256_set1_epi32(0xffff);
    // The magnitude order within the bucket, reversed for a negative x (the words store the threshold
    // the same way); both below 2^16, so the signed compare orders them as unsigned.
    let lx = _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32::<31>(bits)), low);
    let above = _mm256_cmpgt_epi32(lx, _mm256_and_si256(w, low));
    // The mask is -1 where set: subtracting adds one.
    _mm256_sub_epi32(_mm256_srli_epi32::<16>(w), above)
}

/// The 8 codes at `c[i..]` (bytes past the end of the slice read as code 0), widened to dwords: one
/// 8-byte load for a whole group, a copy through a buffer only for the block's last, partial one.
/// `WHOLE` (a group of the block's whole-group loop, so always in bounds) compiles the buffered path
/// out: no `memcpy` call in the loop, whose clobbered vector registers would make the compiler keep
/// the loop's constants on the stack.
#[target_feature(enable = "avx2")]
#[inline]
fn load_codes<const WHOLE: bool>(c: &[u8], i: usize) -> __m256i {
    let b = match c.get(i..i + 8) {
        Some(b) => u64::from_le_bytes(b.try_into().unwrap_or_default()),
        None if WHOLE => 0, // not reached: whole groups lie inside the block
        None => {
            let mut b = [0u8; 8];
            let src = &c[i.min(c.len())..];
            b[..src.len()].copy_from_slice(src);
            u64::from_le_bytes(b)
        }
    };
    _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b as i64))
}

/// Stores the low bytes of the 8 dword lanes of `x` (wrapping, like the kernel's `unsigned char`) at
/// `c[i..]`, as many as fit: one 8-byte store for a whole group (`WHOLE` as in [`load_codes`]).
#[target_feature(enable = "avx2")]
#[inline]
fn store_codes<const WHOLE: bool>(c: &mut [u8], i: usize, x: __m256i) {
    // Byte 0 of each dword into dword 0 (lanes 0-3) and dword 4 (lanes 4-7), then those two dwords
    // side by side in the low 8 bytes.
    let pick = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1,
    );
    let y = _mm256_shuffle_epi8(x, pick);
    let y = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
        y,
        _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0),
    ));
    let b = (_mm_cvtsi128_si64(y) as u64).to_le_bytes();
    match c.get_mut(i..i + 8) {
        Some(dst) => dst.copy_from_slice(&b),
        None if WHOLE => {} // not reached, as in `load_codes`
        None => {
            let start = i.min(c.len());
            let dst = &mut c[start..];
            let len = dst.len();
            dst.copy_from_slice(&b[..len]);
        }
    }
}

/// `x / d` for the block-constant divisor `d` of a normalization, on 8 lanes: with
/// [`super::reciprocal_ok`] the reciprocal and Markstein's FMA correction (the same IEEE quotient,
/// see there), otherwise a division.
#[derive(Clone, Copy)]
struct BlockDiv {
    d: __m256,
    r: __m256,
    fast: bool,
}

impl BlockDiv {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn new(d: f32) -> Self {
        BlockDiv {
            d: _mm256_set1_ps(d),
            r: _mm256_set1_ps(1.0 / d),
            fast: super::reciprocal_ok(d),
        }
    }

    /// The reciprocal and Markstein's correction: the IEEE quotient when `fast` is set.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn div_fast(self, x: __m256) -> __m256 {
        let q = _mm256_mul_ps(x, self.r);
        let e = _mm256_fnmadd_ps(q, self.d, x); // x - q·d, exact
        _mm256_fmadd_ps(e, self.r, q)
    }

    /// The IEEE quotient by a division (any divisor).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn div_exact(self, x: __m256) -> __m256 {
        _mm256_div_ps(x, self.d)
    }
}

/// The step's scalars, broadcast.
struct Lanes {
    beta1: __m256,
    w1: __m256,
    beta2: __m256,
    w2: __m256,
    step_size: __m256,
    eps_c2: __m256,
    decay: __m256,
}

/// One quantization block of at most [`BLOCK`] elements: `avx512::block8` on 8 lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)] // the `BlockFn` signature: the portable kernel's plus the scratch
pub(super) unsafe fn block8(
    p: &mut [f32],
    g: &[f32],
    cm: &mut [u8],
    cv: &mut [u8],
    absmax: (&mut f32, &mut f32),
    s: &BnbScalars,
    t: &Tables,
    scratch: &mut Scratch,
) {
    let n = p.len().min(g.len()).min(cm.len()).min(cv.len()).min(BLOCK);
    let (p, g, cm, cv) = (&mut p[..n], &g[..n], &mut cm[..n], &mut cv[..n]);
    let l = Lanes {
        beta1: _mm256_set1_ps(s.beta1),
        w1: _mm256_set1_ps(s.w1),
        beta2: _mm256_set1_ps(s.beta2),
        w2: _mm256_set1_ps(s.w2),
        step_size: _mm256_set1_ps(s.step_size),
        eps_c2: _mm256_set1_ps(s.eps_c2),
        decay: _mm256_set1_ps(s.decay),
    };
    let (am, av) = (_mm256_set1_ps(*absmax.0), _mm256_set1_ps(*absmax.1));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let abs = |x: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // All ones in the lanes of the group at i that lie below n.
    let valid = |i: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i).min(8) as i32), lane);
    // The moments and finite-gradient masks of the block's groups of 8.
    let Scratch { m: mb, v: vb, fin } = scratch;
    let mut mx_m = _mm256_set1_ps(-f32::MAX);
    let mut mx_v = _mm256_set1_ps(-f32::MAX);
    // One group of 8 from lane i: whole (`true`: plain loads, every lane in the maxima) or the block's
    // last, partial one (masked).
    macro_rules! group {
        ($i:expr, $whole:expr) => {{
            let i = $i;
            let k = if $whole { _mm256_set1_epi32(-1) } else { valid(i) };
            // SAFETY: the load reads lanes i..i+8 of `g`, all below n <= g.len() for a whole group,
            // else only where `k` is set (below n); the gathers index the 256-entry maps with codes.
            let (gi, mq, vq) = unsafe {
                (
                    if $whole {
                        _mm256_loadu_ps(g.as_ptr().add(i))
                    } else {
                        _mm256_maskload_ps(g.as_ptr().add(i), k)
                    },
                    _mm256_i32gather_ps::<4>(t.code_m.as_ptr(), load_codes::<$whole>(cm, i)),
                    _mm256_i32gather_ps::<4>(t.code_v.as_ptr(), load_codes::<$whole>(cv, i)),
                )
            };
            // |g| < inf is false for inf and NaN (ordered compare); tail lanes are left out.
            let f = _mm256_cmp_ps::<_CMP_LT_OQ>(abs(gi), inf);
            let f = if $whole {
                f
            } else {
                _mm256_and_ps(_mm256_castsi256_ps(k), f)
            };
            let gz = _mm256_and_ps(f, gi);
            let vi = _mm256_mul_ps(vq, av);
            let vi = _mm256_add_ps(
                _mm256_mul_ps(vi, l.beta2),
                _mm256_mul_ps(_mm256_mul_ps(l.w2, gz), gz),
            );
            let mi = _mm256_mul_ps(mq, am);
            let mi = _mm256_add_ps(_mm256_mul_ps(mi, l.beta1), _mm256_mul_ps(l.w1, gz));
            let (mi, vi) = (_mm256_and_ps(f, mi), _mm256_and_ps(f, vi));
            // max(|x|, acc) returns acc when |x| is NaN, like f32::max; tail lanes keep acc.
            let (nm, nv) = (_mm256_max_ps(abs(mi), mx_m), _mm256_max_ps(abs(vi), mx_v));
            if $whole {
                (mx_m, mx_v) = (nm, nv);
            } else {
                let kf = _mm256_castsi256_ps(k);
                (mx_m, mx_v) = (_mm256_blendv_ps(mx_m, nm, kf), _mm256_blendv_ps(mx_v, nv, kf));
            }
            // SAFETY: i + 8 <= BLOCK (i is a multiple of 8 below n <= BLOCK): inside the buffers.
            unsafe {
                _mm256_storeu_ps(mb.as_mut_ptr().add(i), mi);
                _mm256_storeu_ps(vb.as_mut_ptr().add(i), vi);
            }
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(fin.as_mut_ptr().add(i) as *mut f32, f) };
        }};
    }
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        group!(i, true);
    }
    if whole < n {
        group!(whole, false);
    }
    // Exact in any order: no lane holds a NaN.
    let hmax = |x: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: `a` holds 8 floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), x) };
        a.iter().fold(-f32::MAX, |a, &b| a.max(b))
    };
    let (mx_m, mx_v) = (hmax(mx_m), hmax(mx_v));
    let (dm, dv) = (BlockDiv::new(mx_m), BlockDiv::new(mx_v));
    let zero = _mm256_setzero_si256();
    let neg_m = _mm256_set1_epi32(t.neg_m as i32);
    // One group of 8 from lane i of the second pass: the parameter and the two codes. `$whole` as in
    // the first pass; `$fast`: both normalizations by reciprocal (else both divide, the same quotients).
    macro_rules! group2 {
        ($i:expr, $whole:expr, $fast:expr) => {{
            let i = $i;
            // SAFETY: the buffers hold BLOCK >= i + 8 lanes; `p` is read and written in lanes i..i + 8
            // of a whole group (below n <= p.len()), else only in lanes of `f` (a subset of the lanes
            // below n).
            let (mi, vi) = unsafe {
                let f = _mm256_loadu_ps(fin.as_ptr().add(i) as *const f32);
                let (mi, vi) = (
                    _mm256_loadu_ps(mb.as_ptr().add(i)),
                    _mm256_loadu_ps(vb.as_ptr().add(i)),
                );
                let pv = if $whole {
                    _mm256_loadu_ps(p.as_ptr().add(i))
                } else {
                    _mm256_maskload_ps(p.as_ptr().add(i), _mm256_castps_si256(f))
                };
                let upd = _mm256_div_ps(mi, _mm256_add_ps(_mm256_sqrt_ps(vi), l.eps_c2));
                let mut pn = _mm256_add_ps(pv, _mm256_mul_ps(l.step_size, upd));
                if s.weight_decay {
                    pn = _mm256_mul_ps(pn, l.decay);
                }
                if $whole {
                    // The old value back where the gradient is not finite, one plain store (AMD's
                    // `vmaskmovps` store is microcoded and far slower). LLVM turns a store of a blend
                    // with the value just loaded from the same address into that masked store; the
                    // empty `asm!` hides where `pv` came from.
                    let mut keep = pv;
                    std::arch::asm!("/* {0} */", inout(ymm_reg) keep, options(pure, nomem, nostack));
                    _mm256_storeu_ps(p.as_mut_ptr().add(i), _mm256_blendv_ps(keep, pn, f));
                } else {
                    _mm256_maskstore_ps(p.as_mut_ptr().add(i), _mm256_castps_si256(f), pn);
                }
                (mi, vi)
            };
            let (xm, xv) = if $fast {
                (dm.div_fast(mi), dv.div_fast(vi))
            } else {
                (dm.div_exact(mi), dv.div_exact(vi))
            };
            let (xm, xv) = (_mm256_castps_si256(xm), _mm256_castps_si256(xv));
            // v's byte store wraps a NaN lane's 256 to code 0.
            store_codes::<$whole>(cv, i, encode(xv, gather_words(xv, &t.wide_v)));
            // In 0..=255: `xm` is the result of arithmetic, so a NaN lane is quiet (mantissa bit 22
            // set) and never lands in the bucket of +inf, the one that can read 256.
            let c_m = encode(xm, gather_words(xm, &t.wide_m));
            // m's sign repair: where the code's sign bit (c < neg_m) differs from m's, one code towards
            // m (+1 when m > 0, else -1; the byte store wraps).
            let code_neg = _mm256_cmpgt_epi32(neg_m, c_m);
            let m_neg = _mm256_cmpgt_epi32(zero, _mm256_castps_si256(mi));
            let flip = _mm256_xor_si256(code_neg, m_neg);
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(mi, _mm256_setzero_ps()));
            // Masks are -1 where set: subtract to add one, add to subtract one.
            let c_m = _mm256_sub_epi32(c_m, _mm256_and_si256(flip, up));
            let c_m = _mm256_add_epi32(c_m, _mm256_andnot_si256(up, flip));
            store_codes::<$whole>(cm, i, c_m);
        }};
    }
    // The reciprocal path only where both maxima allow it (the common case), chosen once outside the
    // loop; the division gives the same quotients, so the other blocks and the one partial group per
    // block simply divide.
    if dm.fast && dv.fast {
        for i in (0..whole).step_by(8) {
            group2!(i, true, true);
        }
    } else {
        for i in (0..whole).step_by(8) {
            group2!(i, true, false);
        }
    }
    if whole < n {
        group2!(whole, false, false);
    }
    *absmax.0 = mx_m;
    *absmax.1 = mx_v;
}
