//! AVX-512 inner loops of the decode path: 4-bit decode, forward and backward 4-bit GEMVs, dense GEMVs.

// Register-blocked kernels index their accumulator arrays by (row, token): index loops are clearer.
#![allow(clippy::needless_range_loop)]

use super::{Q4, col_block};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// Number of bytes decoded (a multiple of 16); the caller finishes the tail.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn decode_bytes_avx512(ls: &[f32; 16], bytes: &[u8], dst: &mut [f32]) -> usize {
    // SAFETY: `ls` is 16 f32, exactly one unaligned 512-bit load; avx512f is enabled on this function.
    let lut = unsafe { _mm512_loadu_ps(ls.as_ptr()) };
    // Interleave (hi[j], lo[j]): permutex2var picks table b for index bit 4.
    let i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let nb = bytes.len() / 16 * 16;
    let mut j = 0;
    while j < nb {
        // SAFETY: j + 16 <= bytes.len() and 2 * (j + 16) <= dst.len().
        unsafe {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(j) as *const __m128i));
            let lo = _mm512_permutexvar_ps(v, lut);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut);
            _mm512_storeu_ps(dst.as_mut_ptr().add(2 * j), _mm512_permutex2var_ps(hi, i0, lo));
            _mm512_storeu_ps(
                dst.as_mut_ptr().add(2 * j + 16),
                _mm512_permutex2var_ps(hi, i1, lo),
            );
        }
        j += 16;
    }
    nb
}

/// The scaled LUT for block `b` as a vector.
#[inline(always)]
fn lut512(q: &Q4<'_>, b: usize) -> __m512 {
    // One vector multiply (the same f32 products as `scaled_lut`), not a table built in a stack
    // array and reloaded as a vector.
    // SAFETY: q.lut is 16 f32; avx512f is enabled in every caller (this is inlined into them).
    unsafe { _mm512_mul_ps(_mm512_loadu_ps(q.lut.as_ptr()), _mm512_set1_ps(q.scales.get(b))) }
}

/// Software prefetch distance in 16-byte chunks (512 B ahead, one prefetch per 64-byte line). The
/// kernels stream 2-4 rows at once whose 2 KiB rows cross 4 KiB pages every other row; measured on
/// the 2-core dev VM (4096² NF4, 1 token, 1 GiB rotation) it cut the median from ~2.9 ms to
/// ~1.6 ms; 1 KiB and 2 KiB ahead were worse.
const PF: usize = 32;
/// A second, farther prefetch into L2 only (4 KiB ahead) for the forward GEMV. The near one alone
/// is capped by the ~16 L1 fill buffers a core has, while the decode's ~12 cycles of work per
/// 64-byte line leave DRAM latency exposed; `prefetcht1` requests queue at L2 instead, and the L1
/// prefetch then hits L2. Same VM, same case, alternating runs: 0.84-1.18 ms against 1.38-1.77 ms
/// without it (2 KiB, 6 KiB and 8 KiB ahead were no better).
const PF_L2: usize = 256;
/// Bytes ahead for the dense kernels' prefetch.
const PF_BYTES: usize = 512;
/// Forward 4-bit GEMV over R rows at a time and N tokens. `xs` is permuted even/odd per chunk.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_fwd_avx512<const R: usize, const N: usize>(
    q: &Q4<'_>,
    xs: &[f32],
    r0: usize,
    nr: usize,
    c0: usize,
    c1: usize,
    yt: &mut [f32],
) {
    let inp = q.cols;
    let cpr = inp / 32; // 16-byte chunks per row
    let shift = (q.bs / 32).trailing_zeros(); // chunk -> block
    debug_assert!(nr.is_multiple_of(R) && xs.len() >= N * inp && yt.len() >= nr * N);
    let data = q.data.as_ptr();
    let xp = xs.as_ptr();
    let mut i = 0;
    while i < nr {
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut cur = [usize::MAX; R];
        let mut lut = [_mm512_setzero_ps(); R];
        let base: [usize; R] = std::array::from_fn(|r| (r0 + i + r) * cpr);
        for c in c0..c1 {
            for r in 0..R {
                let g = base[r] + c;
                let b = g >> shift;
                if b != cur[r] {
                    cur[r] = b;
                    lut[r] = lut512(q, b);
                }
                // SAFETY: chunk g < rows*cols/32, so bytes 16g..16g+16 are in the packed data;
                // x offsets t*inp + 32c + 32 <= N*inp. A prefetch never faults.
                unsafe {
                    if c % 4 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add((g + PF) * 16) as *const i8);
                        _mm_prefetch::<_MM_HINT_T1>(data.wrapping_add((g + PF_L2) * 16) as *const i8);
                    }
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add(g * 16) as *const __m128i));
                    let wl = _mm512_permutexvar_ps(v, lut[r]);
                    let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut[r]);
                    for t in 0..N {
                        let xe = _mm512_loadu_ps(xp.add(t * inp + 32 * c));
                        let xo = _mm512_loadu_ps(xp.add(t * inp + 32 * c + 16));
                        acc[r][t] = _mm512_fmadd_ps(wh, xe, acc[r][t]);
                        acc[r][t] = _mm512_fmadd_ps(wl, xo, acc[r][t]);
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..N {
                yt[(i + r) * N + t] += _mm512_reduce_add_ps(acc[r][t]);
            }
        }
        i += R;
    }
}

/// The one-token forward GEMV (decode), rows `r0..r0 + nr`, column chunks `c0..c1`: one row at a
/// time as a single sequential stream, 64-byte lines (128 weights) unrolled with their software
/// prefetches, `L` scaled tables per line (4 / chunks-per-block, at least 1) and 4 independent
/// accumulators. Per 32 weights: 1 load+`vpmovzxbd`, 2 `vpermps`, 1 shift, 2 FMAs; the three
/// port-5 µops bound it at ~3 cycles. Measured on the dev VM, one core, L2-resident: 3.1 cycles per
/// 32 weights (~27 G weights/s at 2.6 GHz) against 5.5-6.5 with a single FMA chain. In the 4096²
/// decode, weights from DRAM, latency dominates and the gain over the generic R x N kernel is
/// 10-15% (min 642-652 µs against 716-1034 µs, alternating runs).
#[target_feature(enable = "avx512f")]
unsafe fn q4_gemv1_avx512<const L: usize>(
    q: &Q4<'_>,
    xs: &[f32],
    r0: usize,
    nr: usize,
    c0: usize,
    c1: usize,
    yt: &mut [f32],
) {
    let cpr = q.cols / 32;
    let shift = (q.bs / 32).trailing_zeros(); // chunk -> block
    debug_assert!(xs.len() >= q.cols && yt.len() >= nr && c1 <= cpr);
    let data = q.data.as_ptr();
    let xp = xs.as_ptr();
    // SAFETY: (whole body) rows r0..r0+nr exist and c0 <= c < c1 <= cpr, so chunk g = row + c
    // has its 16 bytes inside the packed data and x offsets 32c + 32 <= cols; block g >> shift
    // exists. A prefetch never faults.
    unsafe {
        // The table of chunk g's block.
        macro_rules! lut {
            ($g:expr) => {
                lut512(q, ($g) >> shift)
            };
        }
        for (i, y) in yt.iter_mut().enumerate().take(nr) {
            let row = (r0 + i) * cpr;
            let mut a = [_mm512_setzero_ps(); 4];
            macro_rules! chunk {
                ($c:expr, $lut:expr, $p:literal) => {{
                    let c = $c;
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add((row + c) * 16) as *const __m128i));
                    let wl = _mm512_permutexvar_ps(v, $lut);
                    let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), $lut);
                    a[2 * $p] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xp.add(32 * c)), a[2 * $p]);
                    a[2 * $p + 1] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xp.add(32 * c + 16)), a[2 * $p + 1]);
                }};
            }
            let mut c = c0;
            // Up to the first 64-byte line, where lines and blocks align.
            while c < c1 && !(row + c).is_multiple_of(4) {
                chunk!(c, lut!(row + c), 0);
                c += 1;
            }
            while c + 4 <= c1 {
                let g = row + c;
                _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add((g + PF) * 16) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(data.wrapping_add((g + PF_L2) * 16) as *const i8);
                let l0 = lut!(g);
                let l1 = if L == 4 { lut!(g + 1) } else { l0 };
                let l2 = if L >= 2 { lut!(g + 2) } else { l0 };
                let l3 = if L == 4 { lut!(g + 3) } else { l2 };
                chunk!(c, l0, 0);
                chunk!(c + 1, l1, 1);
                chunk!(c + 2, l2, 0);
                chunk!(c + 3, l3, 1);
                c += 4;
            }
            while c < c1 {
                chunk!(c, lut!(row + c), 0);
                c += 1;
            }
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *y += _mm512_reduce_add_ps(s);
        }
    }
}

/// # Safety
/// avx512f available; `xs` holds `n * q.cols` permuted values; `yt` holds `nr * n`; rows exist.
pub(super) unsafe fn q4_fwd_avx512_dispatch(
    q: &Q4<'_>,
    xs: &[f32],
    n: usize,
    r0: usize,
    nr: usize,
    yt: &mut [f32],
) {
    let cpr = q.cols / 32;
    let cb = col_block(n) / 32;
    macro_rules! go {
        ($r:literal, $n:literal) => {{
            let bulk = nr / $r * $r;
            for c0 in (0..cpr).step_by(cb) {
                let c1 = (c0 + cb).min(cpr);
                // SAFETY: forwarded from the caller's contract; bulk and tail cover nr rows,
                // the column blocks cover every chunk of the row.
                unsafe {
                    q4_fwd_avx512::<$r, $n>(q, xs, r0, bulk, c0, c1, &mut yt[..bulk * $n]);
                    q4_fwd_avx512::<1, $n>(q, xs, r0 + bulk, nr - bulk, c0, c1, &mut yt[bulk * $n..]);
                }
            }
        }};
    }
    if n == 1 {
        for c0 in (0..cpr).step_by(cb) {
            let c1 = (c0 + cb).min(cpr);
            // SAFETY: forwarded from the caller's contract; the column blocks cover every chunk.
            unsafe {
                match q.bs / 32 {
                    1 => q4_gemv1_avx512::<4>(q, xs, r0, nr, c0, c1, yt),
                    2 => q4_gemv1_avx512::<2>(q, xs, r0, nr, c0, c1, yt),
                    _ => q4_gemv1_avx512::<1>(q, xs, r0, nr, c0, c1, yt),
                }
            }
        }
        return;
    }
    // Accumulators R x N stay <= 8 zmm (R > 1 also keeps shared x vectors in registers).
    match n {
        2 => go!(4, 2),
        4 => go!(2, 4),
        8 => go!(1, 8),
        _ => go!(1, 16),
    }
}

/// Backward 4-bit: `acc[t*len + j] += Σ_o dy[o, t] W[o, k0 + j]` in permuted order.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_bwd_avx512<const R: usize, const N: usize>(
    q: &Q4<'_>,
    dyt: &[f32],
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    let inp = q.cols;
    let cpr = inp / 32;
    let shift = (q.bs / 32).trailing_zeros();
    let nch = len / 32;
    let c0 = k0 / 32;
    let data = q.data.as_ptr();
    let ap = acc.as_mut_ptr();
    let mut o = o0;
    while o + R <= o1 {
        // dy is broadcast from memory inside the FMAs (embedded broadcast): R x N registers of
        // splatted dy would not fit next to the decoded weights for N = 16.
        // SAFETY: rows o..o+R < o1 <= rows, so (o + R) * N <= dyt.len().
        let dy_row = unsafe { dyt.as_ptr().add(o * N) };
        let mut cur = [usize::MAX; R];
        let mut lut = [_mm512_setzero_ps(); R];
        for c in 0..nch {
            let mut wh = [_mm512_setzero_ps(); R];
            let mut wl = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let g = (o + r) * cpr + c0 + c;
                let b = g >> shift;
                if b != cur[r] {
                    cur[r] = b;
                    lut[r] = lut512(q, b);
                }
                // SAFETY: chunk g is inside the packed data (row o + r < rows, column chunk < cpr).
                // A prefetch never faults.
                unsafe {
                    // A task reads only a short segment of each row: prefetch the same
                    // segment two row groups ahead instead of further along this row.
                    if c % 4 == 0 {
                        let ahead = g + 2 * R * cpr;
                        _mm_prefetch::<_MM_HINT_T0>(data.wrapping_add(ahead * 16) as *const i8);
                    }
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(data.add(g * 16) as *const __m128i));
                    wl[r] = _mm512_permutexvar_ps(v, lut[r]);
                    wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut[r]);
                }
            }
            for t in 0..N {
                // SAFETY: t * len + 32c + 32 <= N * len = acc.len().
                unsafe {
                    let pe = ap.add(t * len + 32 * c);
                    let po = pe.add(16);
                    let mut ae = _mm512_loadu_ps(pe);
                    let mut ao = _mm512_loadu_ps(po);
                    for r in 0..R {
                        let d = _mm512_set1_ps(*dy_row.add(r * N + t));
                        ae = _mm512_fmadd_ps(wh[r], d, ae);
                        ao = _mm512_fmadd_ps(wl[r], d, ao);
                    }
                    _mm512_storeu_ps(pe, ae);
                    _mm512_storeu_ps(po, ao);
                }
            }
        }
        o += R;
    }
    if o < o1 {
        // SAFETY: same contract, fewer rows.
        unsafe { q4_bwd_avx512::<1, N>(q, dyt, o, o1, k0, len, acc) };
    }
}

/// # Safety
/// avx512f available; `dyt` holds `rows * n`; `acc` holds `n * len`; `k0`, `len` multiples of 32
/// inside the row; rows `o0..o1` exist.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn q4_bwd_avx512_dispatch(
    q: &Q4<'_>,
    dyt: &[f32],
    n: usize,
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe {
        match n {
            // Four rows per accumulator pass: one load/store of dx per 8 FMAs.
            1 => q4_bwd_avx512::<4, 1>(q, dyt, o0, o1, k0, len, acc),
            2 => q4_bwd_avx512::<4, 2>(q, dyt, o0, o1, k0, len, acc),
            4 => q4_bwd_avx512::<4, 4>(q, dyt, o0, o1, k0, len, acc),
            8 => q4_bwd_avx512::<4, 8>(q, dyt, o0, o1, k0, len, acc),
            _ => q4_bwd_avx512::<4, 16>(q, dyt, o0, o1, k0, len, acc),
        }
    }
}

/// 16 dense weights as f32.
pub(super) trait Load16: Copy {
    /// # Safety
    /// avx512f available and 16 elements readable at `p`.
    unsafe fn load16(p: *const Self) -> __m512;
    fn to_f32(self) -> f32;
}
impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: caller contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Load16 for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // bf16 -> f32 is a 16-bit left shift of the bit pattern (exact).
        // SAFETY: caller contract (32 readable bytes).
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: caller contract (32 readable bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Dense GEMV rows: `yt[(o - r0) * N + t] = Σ_k W[o, k] x[t, k]`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_fwd_avx512<E: Load16, const R: usize, const N: usize>(
    w: &[E],
    inp: usize,
    xs: &[f32],
    r0: usize,
    nr: usize,
    k0: usize,
    k1: usize,
    yt: &mut [f32],
) {
    let nv = k0 + (k1 - k0) / 16 * 16;
    let wp = w.as_ptr();
    let xp = xs.as_ptr();
    let mut i = 0;
    while i < nr {
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut k = k0;
        while k < nv {
            for r in 0..R {
                // SAFETY: row r0+i+r exists; k + 16 <= inp; x offsets t*inp + k + 16 <= N*inp.
                // A prefetch never faults.
                unsafe {
                    let p = wp.add((r0 + i + r) * inp + k);
                    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PF_BYTES));
                    let wv = E::load16(p);
                    for t in 0..N {
                        acc[r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(t * inp + k)), acc[r][t]);
                    }
                }
            }
            k += 16;
        }
        for r in 0..R {
            let row = &w[(r0 + i + r) * inp..(r0 + i + r + 1) * inp];
            for t in 0..N {
                let mut s = _mm512_reduce_add_ps(acc[r][t]);
                for kk in nv..k1 {
                    s += row[kk].to_f32() * xs[t * inp + kk];
                }
                yt[(i + r) * N + t] += s;
            }
        }
        i += R;
    }
}

/// Dense backward rows `[o0, o1)`, columns `[k0, k0 + len)`: `acc[t*len + j] += Σ_o dy[o, t] W[o, k0 + j]`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_bwd_avx512<E: Load16, const R: usize, const N: usize>(
    w: &[E],
    inp: usize,
    dyt: &[f32],
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    let nv = len / 16 * 16;
    let wp = w.as_ptr();
    let ap = acc.as_mut_ptr();
    let mut o = o0;
    while o + R <= o1 {
        let d: [[__m512; N]; R] =
            std::array::from_fn(|r| std::array::from_fn(|t| _mm512_set1_ps(dyt[(o + r) * N + t])));
        let mut j = 0;
        while j < nv {
            // SAFETY: rows o..o+R exist, k0 + j + 16 <= inp; t * len + j + 16 <= acc.len().
            // A prefetch never faults.
            unsafe {
                let wv: [__m512; R] = std::array::from_fn(|r| {
                    let p = wp.add((o + r) * inp + k0 + j);
                    // Same segment two row groups ahead (see the 4-bit twin).
                    let ahead = (p as *const i8).wrapping_add(2 * R * inp * std::mem::size_of::<E>());
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    E::load16(p)
                });
                for t in 0..N {
                    let p = ap.add(t * len + j);
                    let mut a = _mm512_loadu_ps(p);
                    for r in 0..R {
                        a = _mm512_fmadd_ps(wv[r], d[r][t], a);
                    }
                    _mm512_storeu_ps(p, a);
                }
            }
            j += 16;
        }
        for j in nv..len {
            for t in 0..N {
                let mut s = acc[t * len + j];
                for r in 0..R {
                    s += dyt[(o + r) * N + t] * w[(o + r) * inp + k0 + j].to_f32();
                }
                acc[t * len + j] = s;
            }
        }
        o += R;
    }
    if o < o1 {
        // SAFETY: same contract, fewer rows.
        unsafe { dense_bwd_avx512::<E, 1, N>(w, inp, dyt, o, o1, k0, len, acc) };
    }
}

/// # Safety
/// avx512f available; `w` is `[rows, inp]`, `dyt` holds `rows * n`, `acc` holds `n * len`, columns
/// `k0..k0 + len` and rows `o0..o1` exist.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dense_bwd_avx512_dispatch<E: Load16>(
    w: &[E],
    inp: usize,
    dyt: &[f32],
    n: usize,
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe {
        match n {
            1 => dense_bwd_avx512::<E, 4, 1>(w, inp, dyt, o0, o1, k0, len, acc),
            2 => dense_bwd_avx512::<E, 4, 2>(w, inp, dyt, o0, o1, k0, len, acc),
            4 => dense_bwd_avx512::<E, 2, 4>(w, inp, dyt, o0, o1, k0, len, acc),
            8 => dense_bwd_avx512::<E, 2, 8>(w, inp, dyt, o0, o1, k0, len, acc),
            _ => dense_bwd_avx512::<E, 1, 16>(w, inp, dyt, o0, o1, k0, len, acc),
        }
    }
}

/// # Safety
/// avx512f available; `w` is `[rows, inp]`, `xs` holds `n * inp`, `yt` holds `nr * n`.
pub(super) unsafe fn dense_fwd_avx512_dispatch<E: Load16>(
    w: &[E],
    inp: usize,
    xs: &[f32],
    n: usize,
    r0: usize,
    nr: usize,
    yt: &mut [f32],
) {
    let cb = col_block(n);
    macro_rules! go {
        ($r:literal, $n:literal) => {{
            let bulk = nr / $r * $r;
            for k0 in (0..inp).step_by(cb) {
                let k1 = (k0 + cb).min(inp);
                // SAFETY: forwarded from the caller's contract; blocks cover 0..inp.
                unsafe {
                    dense_fwd_avx512::<E, $r, $n>(w, inp, xs, r0, bulk, k0, k1, &mut yt[..bulk * $n]);
                    dense_fwd_avx512::<E, 1, $n>(
                        w,
                        inp,
                        xs,
                        r0 + bulk,
                        nr - bulk,
                        k0,
                        k1,
                        &mut yt[bulk * $n..],
                    );
                }
            }
        }};
    }
    match n {
        1 => go!(4, 1),
        2 => go!(4, 2),
        4 => go!(2, 4),
        8 => go!(1, 8),
        _ => go!(1, 16),
    }
}
