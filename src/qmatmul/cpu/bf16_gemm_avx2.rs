//! The bf16 GEMM on AVX2 CPUs without bf16 hardware (Zen 3, Haswell..Alder Lake): the portable
//! kernel's numbers, bit for bit, at close to the f32 multiply rate.
//!
//! A bf16 value widened to f32 is the pair word's half shifted into the top 16 bits (exact), and the
//! product of two bf16 is exact in f32, so `acc + a·b` as one `vmulps` and one `vaddps` rounds once,
//! like the portable `acc += hi(a)·hi(b)`; the kernel keeps that order (odd k, then even k, per pair).
//! An FMA would give the same sum except where a product underflows or overflows f32, so the kernel
//! uses separate multiplies and adds: on Zen 3 they issue on separate pipes (two of each per cycle),
//! which is the FMA's FLOP rate.
//!
//! Napkin math per k pair of a 4 × 16 sub-tile: 2 loads of B words, 4 integer operations to widen
//! them (and, shift), 8 broadcasts of A (pre-split by `pack_a`, straight from memory), 16 `vmulps`
//! and 16 `vaddps` = 256 FLOP in 8 cycles on two multiply pipes, the f32 peak.

use super::{MR, NR};
use std::arch::x86_64::*;

/// [`super::bf16_bits`] on 8 lanes: each dword's low 16 bits the bf16 of its f32 (high bits zero).
#[target_feature(enable = "avx2")]
#[inline]
fn bf16_lanes(x: __m256) -> __m256i {
    let x = _mm256_castps_si256(x);
    // Subnormals (exponent 0) flushed to their signed zero.
    let sub = _mm256_cmpeq_epi32(
        _mm256_and_si256(x, _mm256_set1_epi32(0x7F80_0000)),
        _mm256_setzero_si256(),
    );
    let x = _mm256_blendv_epi8(x, _mm256_and_si256(x, _mm256_set1_epi32(i32::MIN)), sub);
    // NaN: |x| above inf's bits (both below 2^31, so the signed compare orders them); half keeps the
    // high mantissa and sets the quiet bit.
    let mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
    let nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F80_0000));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
    // Round to nearest even: add 0x7fff plus the kept lowest bit; a carry runs into the exponent
    // (to inf past the largest bf16), as half's `(x >> 16) + 1`.
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bias));
    _mm256_blendv_epi8(r, quiet, nan)
}

/// 16 f32 → 8 pair words per step; returns the words written (8 per 16 inputs).
///
/// # Safety
/// AVX2 must be available; `dst.len() >= src.len() / 2`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn convert_pairs(src: &[f32], dst: &mut [u32]) -> usize {
    let q = src.len() / 16;
    assert!(dst.len() >= 8 * q);
    for i in 0..q {
        // SAFETY: elements 16i..16i+16 of src and 8i..8i+8 of dst are in bounds (i < q, the assert).
        unsafe {
            let a = bf16_lanes(_mm256_loadu_ps(src.as_ptr().add(16 * i)));
            let b = bf16_lanes(_mm256_loadu_ps(src.as_ptr().add(16 * i + 8)));
            // u16 lanes a0..a3 b0..b3 | a4..a7 b4..b7 (no saturation: every lane is below 2^16),
            // then the 64-bit quarters in source order: src[16i + j] is u16 j.
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
            _mm256_storeu_si256(dst.as_mut_ptr().add(8 * i).cast(), w);
        }
    }
    8 * q
}

/// Up to 8 f32 from `r` (zeros past its end).
#[target_feature(enable = "avx2")]
#[inline]
fn load8(r: &[f32]) -> __m256 {
    if r.len() >= 8 {
        // SAFETY: 8 elements are in bounds; the load is unaligned.
        unsafe { _mm256_loadu_ps(r.as_ptr()) }
    } else {
        let mut b = [0f32; 8];
        b[..r.len()].copy_from_slice(r);
        // SAFETY: `b` holds 8 floats.
        unsafe { _mm256_loadu_ps(b.as_ptr()) }
    }
}

/// `d[j] = pair(r0[j], r1[j])` for `j < r0.len()` (≤ 32), 0 above; `r1 = None` reads zeros.
///
/// # Safety
/// AVX2 must be available; `r0.len() <= 32`, `r1` (if any) as long as `r0`, `d.len() == 32`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn interleave_rows(r0: &[f32], r1: Option<&[f32]>, d: &mut [u32]) {
    assert!(r0.len() <= NR && r1.is_none_or(|r| r.len() == r0.len()) && d.len() == NR);
    for (h, dh) in d.chunks_exact_mut(8).enumerate() {
        let j0 = (8 * h).min(r0.len());
        let j1 = (j0 + 8).min(r0.len());
        let lo = bf16_lanes(load8(&r0[j0..j1]));
        let hi = bf16_lanes(match r1 {
            Some(r) => load8(&r[j0..j1]),
            None => _mm256_setzero_ps(),
        });
        let w = _mm256_or_si256(lo, _mm256_slli_epi32::<16>(hi));
        // SAFETY: `dh` holds 8 words; the store is unaligned.
        unsafe { _mm256_storeu_si256(dh.as_mut_ptr().cast(), w) };
    }
}

/// `C[rows, cols] += A·B` for one MR × NR tile: `a [kps][2][MR]` f32 bits (odd k, then even k),
/// `b [kps][NR]` pair words. A whole tile is updated in place; a partial one goes through a local
/// copy (the padding rows and columns of the packed operands are zero).
///
/// # Safety
/// AVX2 must be available; `c` valid for reads and writes of `rows ≤ MR` rows of `cols ≤ NR` f32 at
/// stride `ldc`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn kernel(
    kps: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    assert!(a.len() >= kps * 2 * MR && b.len() >= kps * NR && rows <= MR && cols <= NR);
    if rows == MR && cols == NR {
        // SAFETY: the whole MR × NR tile at stride ldc is valid per the contract.
        unsafe { tile(kps, a, b, c, ldc) };
        return;
    }
    let mut t = [[0f32; NR]; MR];
    for (i, ti) in t.iter_mut().enumerate().take(rows) {
        // SAFETY: row i < rows, `cols` elements at stride ldc: in bounds per the contract.
        ti[..cols].copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(i * ldc), cols) });
    }
    // SAFETY: `t` is a whole MR × NR tile at stride NR.
    unsafe { tile(kps, a, b, t.as_mut_ptr().cast(), NR) };
    for (i, ti) in t.iter().enumerate().take(rows) {
        // SAFETY: as for the copy in.
        unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) }.copy_from_slice(&ti[..cols]);
    }
}

/// [`kernel`] on a whole tile, as four 4 × 16 sub-tiles of 8 accumulators.
///
/// # Safety
/// AVX2; `a.len() >= kps·2·MR`, `b.len() >= kps·NR` (checked by the caller); `c` valid for reads and
/// writes of MR rows of NR f32 at stride `ldc`.
#[target_feature(enable = "avx2")]
unsafe fn tile(kps: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize) {
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let (ap, bp) = (a.as_ptr() as *const f32, b.as_ptr());
    for rg in (0..MR).step_by(4) {
        for ch in (0..NR).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for (r, ar) in acc.iter_mut().enumerate() {
                // SAFETY: row rg + r < MR, columns ch..ch + 16 <= NR: inside the tile.
                unsafe {
                    let row = c.add((rg + r) * ldc + ch);
                    ar[0] = _mm256_loadu_ps(row);
                    ar[1] = _mm256_loadu_ps(row.add(8));
                }
            }
            for p in 0..kps {
                // SAFETY: p < kps: words p·NR + ch..+16 of b and p·2·MR..+2·MR of a are in bounds.
                unsafe {
                    let w0 = _mm256_loadu_si256(bp.add(p * NR + ch).cast());
                    let w1 = _mm256_loadu_si256(bp.add(p * NR + ch + 8).cast());
                    let (b0, b1) = (
                        _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                        _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
                    );
                    let odd = ap.add(p * 2 * MR + rg);
                    for (r, ar) in acc.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*odd.add(r));
                        ar[0] = _mm256_add_ps(ar[0], _mm256_mul_ps(x, b0));
                        ar[1] = _mm256_add_ps(ar[1], _mm256_mul_ps(x, b1));
                    }
                    let (b0, b1) = (
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
                    );
                    let even = ap.add(p * 2 * MR + MR + rg);
                    for (r, ar) in acc.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*even.add(r));
                        ar[0] = _mm256_add_ps(ar[0], _mm256_mul_ps(x, b0));
                        ar[1] = _mm256_add_ps(ar[1], _mm256_mul_ps(x, b1));
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe {
                    let row = c.add((rg + r) * ldc + ch);
                    _mm256_storeu_ps(row, ar[0]);
                    _mm256_storeu_ps(row.add(8), ar[1]);
                }
            }
        }
    }
}
