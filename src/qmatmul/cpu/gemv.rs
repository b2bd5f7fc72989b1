//! Decode path (≤ [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) tokens): GEMVs that stream the
//! 4-bit (or dense) weight once, forward `y = x·Wᵀ` and backward `dx = dy·W`, split over rayon tasks;
//! the SIMD inner loops are in `avx512.rs` and `avx2.rs`.

use super::{Isa, SendPtr, WeightRef, padded_tokens, threads};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use rayon::prelude::*;

// ------------------------------------------------------------------------------------------------
// Decode path, forward: y[t, o] = Σ_k W[o, k] x[t, k] (+ u[t]·b[o])

/// Below about a million multiply-adds a GEMV runs on the calling thread: handing it to the rayon pool
/// wakes the workers and parks the caller, tens of µs on the 2-core dev VM (measured with `perf`: ~40%
/// of a 512 x 2048 one-token call), more than the second core saves.
fn inline_is_faster(macs: usize) -> bool {
    macs < 1 << 20 || threads() == 1
}

/// Rows per rayon task: ≥ 8 tasks per thread for balance, ≥ 16 rows to amortize setup.
fn rows_per_task(rows: usize) -> usize {
    (rows / (8 * threads())).clamp(16, 256).next_multiple_of(4)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_fwd(
    w: &WeightRef<'_>,
    x: &[f32],
    t: usize,
    out: usize,
    inp: usize,
    y: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    let n = padded_tokens(t);
    let isa = Isa::get();
    // The SIMD 4-bit kernel wants x permuted (even elements of each 32-chunk, then odd ones).
    let q4_simd = matches!(w, WeightRef::Q4(q) if q.aligned()) && isa != Isa::Scalar;
    let mut xs = vec![0f32; n * inp];
    for ti in 0..t {
        let src = &x[ti * inp..(ti + 1) * inp];
        let dst = &mut xs[ti * inp..(ti + 1) * inp];
        if q4_simd {
            permute_even_odd(src, dst);
        } else {
            dst.copy_from_slice(src);
        }
    }
    // yt[o * n + t]: rows are the parallel dimension, so tasks own contiguous output slices.
    let mut yt = vec![0f32; out * n];
    let rpt = rows_per_task(out);
    let task = |(ci, yc): (usize, &mut [f32])| {
        let r0 = ci * rpt;
        let nr = yc.len() / n;
        gemv_fwd_rows(w, isa, q4_simd, &xs, n, inp, r0, nr, yc);
        if let Some((u, b)) = lr {
            for (i, yrow) in yc.chunks_mut(n).enumerate() {
                let brow = &b[(r0 + i) * rank..(r0 + i + 1) * rank];
                for (ti, yv) in yrow.iter_mut().enumerate().take(t) {
                    let urow = &u[ti * rank..(ti + 1) * rank];
                    *yv += dot(urow, brow);
                }
            }
        }
    };
    if inline_is_faster(out * inp * n) {
        yt.chunks_mut(rpt * n).enumerate().for_each(task);
    } else {
        yt.par_chunks_mut(rpt * n).enumerate().for_each(task);
    }
    for ti in 0..t {
        for o in 0..out {
            y[ti * out + o] = yt[o * n + ti];
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorizes and keeps the error ~ sqrt(len) ulps.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Within each 32-element chunk: even elements first, then odd ones (the order in which the
/// SIMD kernels decode high and low nibbles). `len % 32 == 0`.
fn permute_even_odd(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        for j in 0..16 {
            d[j] = s[2 * j];
            d[16 + j] = s[2 * j + 1];
        }
    }
}

fn unpermute_even_odd(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        for j in 0..16 {
            d[2 * j] = s[j];
            d[2 * j + 1] = s[16 + j];
        }
    }
}

/// Rows `[r0, r0 + nr)` of the GEMV into `yt[(o - r0) * n + t]`.
#[allow(clippy::too_many_arguments)]
fn gemv_fwd_rows(
    w: &WeightRef<'_>,
    isa: Isa,
    q4_simd: bool,
    xs: &[f32],
    n: usize,
    inp: usize,
    r0: usize,
    nr: usize,
    yt: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // Every call below: the ISA was detected at runtime; xs holds n*inp, yt holds nr*n
        // values and rows r0..r0+nr exist in the weight (checked by the chunking in the caller).
        match (w, isa) {
            (WeightRef::Q4(q), Isa::Avx512) if q4_simd => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::q4_fwd_avx512_dispatch(q, xs, n, r0, nr, yt) };
            }
            (WeightRef::Q4(q), Isa::Avx2) if q4_simd => {
                // SAFETY: Isa::Avx2 (avx2 + fma) was detected at run time; sizes as stated above.
                return unsafe { avx2::q4_fwd_avx2_dispatch(q, xs, n, r0, nr, yt) };
            }
            (WeightRef::BF16(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            (WeightRef::F16(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            (WeightRef::F32(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_fwd_avx512_dispatch(d, inp, xs, n, r0, nr, yt) };
            }
            _ => {}
        }
    }
    let _ = (isa, q4_simd);
    // General path: decode one row into L1-resident scratch, then one dot product per token.
    let mut row = vec![0f32; inp];
    for i in 0..nr {
        w.decode_row_seg(r0 + i, inp, 0, &mut row);
        for ti in 0..n {
            yt[i * n + ti] = dot(&row, &xs[ti * inp..(ti + 1) * inp]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Decode path, backward: dx[t, k] = Σ_o dy[t, o] W[o, k] (+ v[t]·a[:, k])

#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_bwd(
    w: &WeightRef<'_>,
    dy: &[f32],
    t: usize,
    out: usize,
    inp: usize,
    dx: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    let n = padded_tokens(t);
    let isa = Isa::get();
    let q4_simd = matches!(w, WeightRef::Q4(q) if q.aligned()) && isa != Isa::Scalar;
    // dyT[o * n + t]: per row, the n token weights are adjacent (broadcast-friendly).
    let mut dyt = vec![0f32; out * n];
    for ti in 0..t {
        for o in 0..out {
            dyt[o * n + ti] = dy[ti * out + o];
        }
    }
    // Column segments of `seg` (a multiple of 32, ≤ 1024 so n×seg f32 fits L1/L2); row groups when
    // there are too few segments for the threads.
    let want_tasks = 4 * threads();
    let seg = (inp.div_ceil(want_tasks)).next_multiple_of(32).clamp(128, 1024);
    let nseg = inp.div_ceil(seg);
    let groups = want_tasks.div_ceil(nseg).clamp(1, out.div_ceil(64).max(1));
    let rows_per_group = out.div_ceil(groups);
    let inline = inline_is_faster(out * inp * n);
    let partial = |task: usize| {
        let (s, g) = (task % nseg, task / nseg);
        let k0 = s * seg;
        let len = seg.min(inp - k0);
        let o0 = (g * rows_per_group).min(out);
        let o1 = ((g + 1) * rows_per_group).min(out);
        let mut acc = vec![0f32; n * len];
        gemv_bwd_seg(w, isa, q4_simd, &dyt, n, inp, o0, o1, k0, len, &mut acc);
        acc
    };
    let partials: Vec<Vec<f32>> = if inline {
        (0..nseg * groups).map(partial).collect()
    } else {
        (0..nseg * groups).into_par_iter().map(partial).collect()
    };
    // Reduce the row groups, un-permute, add the low-rank term; disjoint column slices per task.
    let dxp = SendPtr(dx.as_mut_ptr());
    let reduce = |s: usize| {
        let k0 = s * seg;
        let len = seg.min(inp - k0);
        let mut sum = partials[s].clone();
        for g in 1..groups {
            for (a, b) in sum.iter_mut().zip(&partials[g * nseg + s]) {
                *a += *b;
            }
        }
        let mut tmp = vec![0f32; len];
        for ti in 0..t {
            let src = &sum[ti * len..(ti + 1) * len];
            if q4_simd {
                unpermute_even_odd(src, &mut tmp);
            } else {
                tmp.copy_from_slice(src);
            }
            if let Some((v, a)) = lr {
                for j in 0..rank {
                    let vj = v[ti * rank + j];
                    let arow = &a[j * inp + k0..j * inp + k0 + len];
                    for (d, &av) in tmp.iter_mut().zip(arow) {
                        *d += vj * av;
                    }
                }
            }
            // SAFETY: task s writes only dx[ti, k0..k0+len]; segments are disjoint and in bounds
            // (k0 + len <= inp, ti < t, dx holds t * inp).
            let dst = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(ti * inp + k0), len) };
            dst.copy_from_slice(&tmp);
        }
    };
    if inline {
        (0..nseg).for_each(reduce);
    } else {
        (0..nseg).into_par_iter().for_each(reduce);
    }
}

/// Rows `[o0, o1)`, columns `[k0, k0 + len)`: `acc[t * len + j] += Σ_o dy[t, o] W[o, k0 + j]`
/// (in the permuted order for the SIMD 4-bit kernels).
#[allow(clippy::too_many_arguments)]
fn gemv_bwd_seg(
    w: &WeightRef<'_>,
    isa: Isa,
    q4_simd: bool,
    dyt: &[f32],
    n: usize,
    inp: usize,
    o0: usize,
    o1: usize,
    k0: usize,
    len: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // Every call below: ISA detected at runtime; acc holds n*len, dyt holds out*n values,
        // rows o0..o1 and columns k0..k0+len exist; for 4-bit k0 and len are multiples of 32.
        match (w, isa) {
            (WeightRef::Q4(q), Isa::Avx512) if q4_simd => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::q4_bwd_avx512_dispatch(q, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::Q4(q), Isa::Avx2) if q4_simd => {
                // SAFETY: Isa::Avx2 (avx2 + fma) was detected at run time; sizes as stated above.
                return unsafe { avx2::q4_bwd_avx2_dispatch(q, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::BF16(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::F16(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            (WeightRef::F32(d), Isa::Avx512) => {
                // SAFETY: Isa::Avx512 (avx512f) was detected at run time; sizes as stated above.
                return unsafe { avx512::dense_bwd_avx512_dispatch(d, inp, dyt, n, o0, o1, k0, len, acc) };
            }
            _ => {}
        }
    }
    let _ = (isa, q4_simd);
    let mut row = vec![0f32; len];
    for o in o0..o1 {
        w.decode_row_seg(o, inp, k0, &mut row);
        for ti in 0..n {
            let d = dyt[o * n + ti];
            if d == 0.0 {
                continue;
            }
            for (a, &wv) in acc[ti * len..(ti + 1) * len].iter_mut().zip(&row) {
                *a += d * wv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Q4, decode_flat};
    use super::*;
    use crate::quant::cpu::Scales;

    fn rand_q4(rows: usize, cols: usize, bs: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut r = crate::rng::Rng::new(seed);
        let n = rows * cols;
        let data = (0..n.div_ceil(2)).map(|_| r.next_u64() as u8).collect();
        let absmax = (0..n.div_ceil(bs)).map(|_| r.uniform_range(0.1, 2.0)).collect();
        (data, absmax)
    }

    fn decode_ref(q: &Q4<'_>, f: usize) -> f32 {
        let byte = q.data[f / 2];
        let nib = if f & 1 == 0 { byte >> 4 } else { byte & 15 };
        q.lut[nib as usize] * q.scales.get(f / q.bs)
    }

    /// Every ISA's forward and backward 4-bit kernel agrees with the scalar general path.
    #[test]
    fn simd_kernels_match_general_path() {
        // 1088 columns: several column blocks of the forward kernels for 8 and 16 tokens.
        // Rows of 3, 34, 5 and 8 chunks: rows that start mid-line (the one-token kernel's head and
        // tail), blocks of 1, 2, 4 and 128 chunks (its 4, 2 and 1 tables per line, blocks spanning
        // rows), and a double-quantized absmax.
        simd_case(37, 96, 32, false);
        simd_case(9, 1088, 64, false);
        simd_case(13, 160, 128, true);
        simd_case(6, 256, 4096, true);
    }

    fn simd_case(rows: usize, cols: usize, bs: usize, dq: bool) {
        let (data, absmax) = rand_q4(rows, cols, bs, 3);
        let mut r = crate::rng::Rng::new(9);
        let codes: Vec<u8> = (0..absmax.len()).map(|_| r.next_u64() as u8).collect();
        let nested: Vec<f32> = (0..absmax.len().div_ceil(2))
            .map(|_| r.uniform_range(0.5, 2.0))
            .collect();
        let scales = if dq {
            Scales::Double {
                codes: &codes,
                nested: &nested,
                offset: 0.3,
                code: crate::quant::dynamic_map(),
                nested_shift: 1,
            }
        } else {
            Scales::F32(&absmax)
        };
        let q = Q4 {
            data: &data,
            lut: *crate::quant::QuantType::Nf4.code(),
            bs,
            scales,
            rows,
            cols,
        };
        let w = WeightRef::Q4(q);
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        let mut r = crate::rng::Rng::new(5);
        for &n in &[1usize, 2, 4, 8, 16] {
            let x: Vec<f32> = r.normal_vec(n * cols);
            let mut xs = vec![0f32; n * cols];
            for t in 0..n {
                permute_even_odd(&x[t * cols..(t + 1) * cols], &mut xs[t * cols..(t + 1) * cols]);
            }
            let mut want = vec![0f64; rows * n];
            for o in 0..rows {
                for t in 0..n {
                    want[o * n + t] = (0..cols)
                        .map(|k| decode_ref(&q, o * cols + k) as f64 * x[t * cols + k] as f64)
                        .sum();
                }
            }
            for &isa in &isas {
                let simd = isa != Isa::Scalar;
                let mut yt = vec![0f32; rows * n];
                let xin = if simd { &xs } else { &x };
                gemv_fwd_rows(&w, isa, simd, xin, n, cols, 0, rows, &mut yt);
                for (i, (&g, &e)) in yt.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{isa:?} n={n} i={i}: {g} vs {e}"
                    );
                }
                // Backward on a middle column segment.
                let dyt: Vec<f32> = r.normal_vec(rows * n);
                let (k0, len) = (32, 64);
                let mut acc = vec![0f32; n * len];
                gemv_bwd_seg(&w, isa, simd, &dyt, n, cols, 0, rows, k0, len, &mut acc);
                for t in 0..n {
                    let mut got = acc[t * len..(t + 1) * len].to_vec();
                    if simd {
                        unpermute_even_odd(&acc[t * len..(t + 1) * len], &mut got);
                    }
                    for (j, &g) in got.iter().enumerate() {
                        let e: f64 = (0..rows)
                            .map(|o| dyt[o * n + t] as f64 * decode_ref(&q, o * cols + k0 + j) as f64)
                            .sum();
                        assert!(
                            (g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "bwd {isa:?} n={n} j={j}"
                        );
                    }
                }
            }
        }
        // decode_flat at odd offsets and odd lengths equals the element-wise decode.
        for (f0, len) in [(0usize, 33usize), (1, 70), (31, 64), (63, 1), (100, 200)] {
            let mut out = vec![0f32; len];
            decode_flat(&q, f0, &mut out);
            for (i, &v) in out.iter().enumerate() {
                assert_eq!(v, decode_ref(&q, f0 + i), "decode_flat f0={f0} i={i}");
            }
        }
    }
}
