//! bf16 compute for the products with a frozen weight (opt-in, [`Algo::Bf16`](crate::qmatmul::Algo)):
//! `y = x·Wᵀ` and `dx = dy·W` with both operands rounded to bf16 and f32 accumulation.
//!
//! Why: Zen 4 / Sapphire Rapids have AVX512_BF16, whose `VDPBF16PS` does 32 bf16 multiply-adds into 16
//! f32 lanes per instruction, twice the f32 FMA rate; the products with frozen weights are ~92% of the
//! FLOPs of a LoRA training step (see `docs/results/llama_step.md`). It is the numerics of the usual
//! mixed-precision recipe (`torch.autocast(dtype=torch.bfloat16)`, bitsandbytes'
//! `bnb_4bit_compute_dtype=torch.bfloat16`): round both operands to bf16, accumulate in f32.
//!
//! # Numerics contract (both kernels)
//! - Each input is rounded to bf16 round-to-nearest-even (as `half::bf16::from_f32`), with f32
//!   subnormal inputs flushed to ±0 first: `VCVTNE2PS2BF16` and `VDPBF16PS` treat denormals as zero
//!   (Intel SDM), and the portable kernel does the same so both read identical operands.
//! - Products of two bf16 are exact in f32; they are added to an f32 accumulator (one rounding each),
//!   k = 2p+1 then 2p within a pair as the SDM's pseudo-code of `VDPBF16PS` writes it. Hardware also
//!   flushes subnormal results to zero; the portable kernel does not (a difference below 2^-126).
//!
//! # Layout
//! `B [k, n]` (the weight side) is packed per task into strips of [`NR`] = 32 columns:
//! `[strip][k/2][32]` u32 words, each the bf16 pair `(B[2p, j], B[2p+1, j])` (low half = even k), so one
//! zmm load is 16 columns × 2 k. `A [m, k]` (the activations) is packed once per call into
//! `[m/MR][k/2][MR]` words, so the kernel broadcasts one word per row. The microkernel keeps an
//! `MR × 32` = 8 × 32 f32 tile of C in 16 zmm accumulators. Tasks (rayon) own groups of strips, i.e.
//! disjoint column ranges of C, and walk K in blocks of [`KC_PAIRS`] pairs so a strip block (16 KiB)
//! stays in L1 while every row block of A passes it.

use super::panels::decode_rows;
use super::{SendPtr, WeightRef};
use rayon::prelude::*;

/// Columns of a B strip (two zmm of f32 accumulators per row).
pub(crate) const NR: usize = 32;
/// Rows of the microkernel's C tile.
const MR: usize = 8;
/// k pairs per cache block: a strip block is `KC_PAIRS · NR · 4` = 16 KiB.
const KC_PAIRS: usize = 128;

/// Which microkernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kern {
    /// `VDPBF16PS` (AVX512F + BW + VL + BF16, detected at run time).
    Avx512Bf16,
    /// AVX2 without bf16 hardware: the operands widened to f32 (exact) and multiplied and added
    /// as separate IEEE operations in the portable kernel's order, so the results are bit-identical to
    /// [`Kern::Portable`] at close to the f32 multiply rate (Zen 3 issues two multiplies and two adds
    /// per cycle on separate pipes).
    Avx2,
    /// Plain Rust with the same numerics contract.
    Portable,
}

impl Kern {
    /// The fastest kernel this CPU runs (detected once).
    pub(crate) fn best() -> Kern {
        static K: std::sync::OnceLock<Kern> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
            {
                return Kern::Avx512Bf16;
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                return Kern::Avx2;
            }
            Kern::Portable
        })
    }
}

/// `x` as bf16 bits: subnormals flushed to ±0, then round-to-nearest-even (NaN stays NaN).
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let x = if x.is_subnormal() { 0f32.copysign(x) } else { x };
    half::bf16::from_f32(x).to_bits()
}

/// The bf16 value of [`bf16_bits`] as f32 (exact).
#[cfg(test)]
#[inline]
pub(crate) fn bf16_round(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// `dst[p] = pair(src[2p], src[2p+1])` (a missing last odd element is 0); `dst.len() = ⌈src.len()/2⌉`.
fn convert_pairs(kern: Kern, src: &[f32], dst: &mut [u32]) {
    debug_assert_eq!(dst.len(), src.len().div_ceil(2));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if kern == Kern::Avx512Bf16 {
        // SAFETY: Avx512Bf16 is only chosen after runtime detection of its features; the helper
        // reads src[..32q] and writes dst[..16q] for q = src.len() / 32, in bounds.
        done = unsafe { avx512::convert_pairs(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if kern == Kern::Avx2 {
        // SAFETY: Avx2 is only chosen after runtime detection; the helper reads src[..16q] and writes
        // dst[..8q] for q = src.len() / 16, in bounds.
        done = unsafe { avx2::convert_pairs(src, dst) };
    }
    let _ = kern;
    for (p, d) in dst.iter_mut().enumerate().skip(done) {
        let lo = src[2 * p];
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// `A [m, k]` (row-major, row stride `k`) packed as `[⌈m/MR⌉][⌈k/2⌉][MR]` words (padding rows are 0);
/// for [`Kern::Avx2`] each pair's `MR` words are then split into `MR` f32 of the odd k (the word's
/// high half) followed by `MR` of the even k: `[⌈m/MR⌉][⌈k/2⌉][2][MR]` f32 bits, so the kernel
/// broadcasts straight from memory.
fn pack_a(kern: Kern, a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let words = pack_a_words(kern, a, m, k);
    if kern != Kern::Avx2 {
        return words;
    }
    let mut out = vec![0u32; 2 * words.len()];
    out.par_chunks_mut(2 * MR)
        .zip(words.par_chunks(MR))
        .for_each(|(o, w)| {
            for (i, &x) in w.iter().enumerate() {
                o[i] = x & 0xFFFF_0000;
                o[MR + i] = x << 16;
            }
        });
    out
}

/// [`pack_a`]'s word layout.
fn pack_a_words(kern: Kern, a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m.div_ceil(MR) * kp * MR];
    out.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each_init(Vec::new, |row: &mut Vec<u32>, (bi, blk)| {
            row.resize(kp, 0);
            for i in 0..MR.min(m - bi * MR) {
                let r = bi * MR + i;
                convert_pairs(kern, &a[r * k..(r + 1) * k], row);
                for (p, &w) in row.iter().enumerate() {
                    blk[p * MR + i] = w;
                }
            }
        });
    out
}

/// Strips `[j0, j0 + ns)` of `B = Wᵀ` (W `[n, k]` row-major, f32 rows at `w` with row stride `k`,
/// `rows` of them valid from strip j0 on) into `dst [ns][kp][NR]`.
fn pack_bt_strips(kern: Kern, w: &[f32], k: usize, rows: usize, dst: &mut [u32], tmp: &mut Vec<u32>) {
    let kp = k.div_ceil(2);
    let ns = dst.len() / (kp * NR);
    tmp.resize(NR * kp, 0);
    for s in 0..ns {
        // Rows of this strip as pair words, [NR][kp] (zero rows past the end), then transposed.
        for c in 0..NR {
            let r = s * NR + c;
            let t = &mut tmp[c * kp..(c + 1) * kp];
            if r < rows {
                convert_pairs(kern, &w[r * k..(r + 1) * k], t);
            } else {
                t.fill(0);
            }
        }
        let strip = &mut dst[s * kp * NR..(s + 1) * kp * NR];
        super::transpose::transpose(
            bytemuck::cast_slice(&tmp[..]),
            kp,
            NR,
            kp,
            bytemuck::cast_slice_mut(strip),
        );
    }
}

/// Strips of `B = W` for `dx = dy·W` (W `[k, n]`, k = out): columns `[0, cols)` of the f32 block at
/// `w` (row stride `ld`, `k` rows) into `dst [⌈cols/NR⌉][kp][NR]` (missing columns and the odd last
/// row are 0).
fn pack_b_strips(kern: Kern, w: &[f32], ld: usize, k: usize, cols: usize, dst: &mut [u32]) {
    let kp = k.div_ceil(2);
    for (s, strip) in dst.chunks_mut(kp * NR).enumerate() {
        let c0 = s * NR;
        let nc = NR.min(cols - c0);
        for (p, d) in strip.chunks_mut(NR).enumerate() {
            let r0 = &w[2 * p * ld + c0..2 * p * ld + c0 + nc];
            let r1 = (2 * p + 1 < k).then(|| &w[(2 * p + 1) * ld + c0..(2 * p + 1) * ld + c0 + nc]);
            #[cfg(target_arch = "x86_64")]
            if kern == Kern::Avx512Bf16 {
                // SAFETY: runtime-detected features; r0 (and r1) hold nc <= NR elements, d holds NR.
                unsafe { avx512::interleave_rows(r0, r1, d) };
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if kern == Kern::Avx2 {
                // SAFETY: runtime-detected AVX2; r0 (and r1) hold nc <= NR elements, d holds NR.
                unsafe { avx2::interleave_rows(r0, r1, d) };
                continue;
            }
            let _ = kern;
            for (j, dj) in d.iter_mut().enumerate() {
                *dj = if j < nc {
                    pair(r0[j], r1.map_or(0.0, |r| r[j]))
                } else {
                    0
                };
            }
        }
    }
}

/// Strips per task: as many as fit 4 strips, at least two tasks per thread where possible.
fn strips_per_task(strips: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    strips.div_ceil(2 * threads).clamp(1, 4)
}

/// `c[m, n] += A·B` over the task's packed strips `b [ns][kp][NR]` covering columns `[n0, n0 + ns·NR)`
/// (clipped at `n`); `a` packed by [`pack_a`].
///
/// # Safety
/// `c` must point to a row-major `[m, ldc]` f32 matrix whose columns `[n0, min(n0 + ns·NR, n))` only
/// this call touches (`n <= ldc`).
#[allow(clippy::too_many_arguments)]
unsafe fn run_strips(
    kern: Kern,
    a: &[u32],
    m: usize,
    kp: usize,
    b: &[u32],
    n0: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
) {
    let ns = b.len() / (kp * NR);
    // Words of packed A per k pair and row block (see `pack_a`).
    let aw = if kern == Kern::Avx2 { 2 * MR } else { MR };
    for p0 in (0..kp).step_by(KC_PAIRS) {
        let kps = KC_PAIRS.min(kp - p0);
        for s in 0..ns {
            let j0 = n0 + s * NR;
            if j0 >= n {
                break;
            }
            let cols = NR.min(n - j0);
            let bs = &b[(s * kp + p0) * NR..(s * kp + p0 + kps) * NR];
            for bi in 0..m.div_ceil(MR) {
                let rows = MR.min(m - bi * MR);
                let ab = &a[(bi * kp + p0) * aw..(bi * kp + p0 + kps) * aw];
                // SAFETY: the tile's rows bi·MR.. (< m) and columns j0..j0+cols (< n, owned by this
                // call per the contract) are inside c.
                let ct = unsafe { c.add(bi * MR * ldc + j0) };
                match kern {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: runtime-detected features; ab holds kps·MR words, bs kps·NR; the tile
                    // (rows × cols at stride ldc) is in bounds as above.
                    Kern::Avx512Bf16 => unsafe { avx512::kernel(kps, ab, bs, ct, ldc, rows, cols) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: runtime-detected AVX2; ab holds kps·2·MR words, bs kps·NR; the tile as
                    // above.
                    Kern::Avx2 => unsafe { avx2::kernel(kps, ab, bs, ct, ldc, rows, cols) },
                    // SAFETY: as above.
                    _ => unsafe { kernel_portable(kps, ab, bs, ct, ldc, rows, cols) },
                }
            }
        }
    }
}

/// The portable microkernel: `C[rows, cols] += A·B` for one tile, same numerics contract.
///
/// # Safety
/// `c` must be valid for reads and writes of `rows` rows of `cols` f32 at stride `ldc`.
unsafe fn kernel_portable(
    kps: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    let lo = |w: u32| f32::from_bits(w << 16);
    let hi = |w: u32| f32::from_bits(w & 0xFFFF_0000);
    for i in 0..rows {
        // SAFETY: row i < rows, cols elements at stride ldc: in bounds per the contract.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        for (j, cj) in row.iter_mut().enumerate() {
            let mut acc = *cj;
            for p in 0..kps {
                let (aw, bw) = (a[p * MR + i], b[p * NR + j]);
                acc += hi(aw) * hi(bw);
                acc += lo(aw) * lo(bw);
            }
            *cj = acc;
        }
    }
}

/// `c[m, n] += A·B` with `A [m, k]` f32 (rounded here) and B given as a packer of strips: `pack(j0, ns,
/// dst)` fills `dst [ns][kp][NR]` with the strips of columns `[j0, j0 + ns·NR)`.
fn gemm_with<F>(kern: Kern, a: &[f32], m: usize, k: usize, n: usize, c: &mut [f32], pack: F)
where
    F: Fn(usize, usize, &mut Vec<u32>) + Sync,
{
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.len() >= m * k && c.len() >= m * n);
    let kp = k.div_ceil(2);
    let ap = pack_a(kern, a, m, k);
    let strips = n.div_ceil(NR);
    let g = strips_per_task(strips);
    let cp = SendPtr(c.as_mut_ptr());
    (0..strips.div_ceil(g))
        .into_par_iter()
        .for_each_init(Vec::new, |bbuf: &mut Vec<u32>, t| {
            let s0 = t * g;
            let ns = g.min(strips - s0);
            bbuf.resize(ns * kp * NR, 0);
            pack(s0 * NR, ns, bbuf);
            // SAFETY: task t owns the columns [s0·NR, (s0 + ns)·NR) ∩ [0, n) of c ([m, n]); tasks
            // are disjoint.
            unsafe { run_strips(kern, &ap, m, kp, bbuf, s0 * NR, n, cp.get(), n) };
        });
}

/// `y[t, out] += x[t, inp] · Wᵀ` in bf16 compute (see the module documentation).
pub(crate) fn fwd(kern: Kern, x: &[f32], w: &WeightRef<'_>, t: usize, out: usize, inp: usize, y: &mut [f32]) {
    gemm_with(kern, x, t, inp, out, y, |j0, ns, dst| {
        let rows = (out - j0).min(ns * NR);
        let mut tmp = Vec::new();
        if let WeightRef::F32(wf) = w {
            pack_bt_strips(kern, &wf[j0 * inp..], inp, rows, dst, &mut tmp);
        } else {
            let mut buf = vec![0f32; rows * inp];
            decode_rows(w, j0, inp, &mut buf);
            pack_bt_strips(kern, &buf, inp, rows, dst, &mut tmp);
        }
    });
}

/// `dx[t, inp] += dy[t, out] · W` in bf16 compute.
pub(crate) fn bwd(
    kern: Kern,
    dy: &[f32],
    w: &WeightRef<'_>,
    t: usize,
    out: usize,
    inp: usize,
    dx: &mut [f32],
) {
    gemm_with(kern, dy, t, out, inp, dx, |j0, ns, dst| {
        let cols = (inp - j0).min(ns * NR);
        if let WeightRef::F32(wf) = w {
            pack_b_strips(kern, &wf[j0..], inp, out, cols, dst);
        } else {
            let mut buf = vec![0f32; out * cols];
            for (o, r) in buf.chunks_mut(cols).enumerate() {
                w.decode_row_seg(o, inp, j0, r);
            }
            pack_b_strips(kern, &buf, cols, out, cols, dst);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// 32 f32 → 16 pair words with `VCVTNE2PS2BF16`; returns the words written (16 per 32 inputs).
    ///
    /// # Safety
    /// AVX512F/BW/VL/BF16 must be available; `dst.len() >= src.len() / 2`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn convert_pairs(src: &[f32], dst: &mut [u32]) -> usize {
        let q = src.len() / 32;
        for i in 0..q {
            // SAFETY: elements 32i..32i+32 of src and 16i..16i+16 of dst are in bounds (i < q).
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
                // bf16 j of the result is src[32i + j]: the second operand fills the low half.
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), v);
            }
        }
        16 * q
    }

    /// `d[j] = pair(r0[j], r1[j])` for `j < r0.len()` (≤ 32), 0 above; `r1 = None` reads zeros.
    ///
    /// # Safety
    /// AVX512F/BW/VL/BF16 must be available; `r0.len() <= 32`, `r1` (if any) as long as `r0`,
    /// `d.len() == 32`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn interleave_rows(r0: &[f32], r1: Option<&[f32]>, d: &mut [u32]) {
        let nc = r0.len();
        // Word j of each 16-column half: (r0[j], r1[j]) as bf16 pair, from cvtne2ps(r1, r0) = r0's
        // 16 bf16 then r1's 16, interleaved by a 16-bit permute.
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        for h in 0..2 {
            let j0 = 16 * h;
            let cnt = nc.saturating_sub(j0).min(16);
            let m: __mmask16 = ((1u32 << cnt) - 1) as __mmask16;
            // SAFETY: masked loads read only lanes j0..j0+cnt of r0/r1 (in bounds); masked-off lanes
            // are not accessed (AVX-512 fault suppression), and the pointers are formed with
            // wrapping_add so no out-of-bounds pointer is created by `add`. The store writes 16 words
            // at d[j0..j0+16] (d.len() == 32).
            unsafe {
                let a = _mm512_maskz_loadu_ps(m, r0.as_ptr().wrapping_add(j0));
                let b = match r1 {
                    Some(r1) => _mm512_maskz_loadu_ps(m, r1.as_ptr().wrapping_add(j0)),
                    None => _mm512_setzero_ps(),
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                let v = _mm512_permutexvar_epi16(idx, v);
                _mm512_storeu_si512(d.as_mut_ptr().add(j0).cast(), v);
            }
        }
    }

    /// `C[rows, cols] += A·B` for one MR × NR tile with `VDPBF16PS`: `a [kps][MR]`, `b [kps][NR]` words.
    ///
    /// # Safety
    /// AVX512F/BW/VL/BF16 must be available; `a.len() >= kps·MR`, `b.len() >= kps·NR`; `c` valid for
    /// reads and writes of `rows ≤ MR` rows of `cols ≤ NR` f32 at stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn kernel(
        kps: usize,
        a: &[u32],
        b: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        debug_assert!(a.len() >= kps * MR && b.len() >= kps * NR && rows <= MR && cols <= NR);
        let m0 = ((1u32 << cols.min(16)) - 1) as __mmask16;
        let m1 = ((1u32 << cols.saturating_sub(16)) - 1) as __mmask16;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for (i, ai) in acc.iter_mut().enumerate().take(rows) {
            // SAFETY: row i < rows is in bounds; masked lanes past `cols` are not accessed and the
            // pointers are formed with wrapping_add.
            unsafe {
                let r = c.wrapping_add(i * ldc);
                ai[0] = _mm512_maskz_loadu_ps(m0, r);
                ai[1] = _mm512_maskz_loadu_ps(m1, r.wrapping_add(16));
            }
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kps {
            // SAFETY: p < kps, so words p·NR..p·NR+32 of b and p·MR..p·MR+8 of a are in bounds; the
            // transmutes reinterpret 64 bytes of integer lanes as 32 bf16 lanes (same size, any bits).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16).cast()));
                for (i, ai) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(p * MR + i) as i32));
                    ai[0] = _mm512_dpbf16_ps(ai[0], av, b0);
                    ai[1] = _mm512_dpbf16_ps(ai[1], av, b1);
                }
            }
        }
        for (i, ai) in acc.iter().enumerate().take(rows) {
            // SAFETY: as for the loads.
            unsafe {
                let r = c.wrapping_add(i * ldc);
                _mm512_mask_storeu_ps(r, m0, ai[0]);
                _mm512_mask_storeu_ps(r.wrapping_add(16), m1, ai[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "bf16_gemm_avx2.rs"]
mod avx2;

#[cfg(test)]
#[path = "bf16_gemm_tests.rs"]
mod tests;
