//! Batch path (> [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) tokens): the weight dequantized in
//! L2-sized panels, each multiplied with the `gemm` crate.

use super::transpose::transpose;
use super::{SendPtr, WeightRef, decode_flat, gemm_f32};
use crate::tensor::cpu as tcpu;
use rayon::prelude::*;

/// y[t, o] = x·Wᵀ (+ u·bᵀ), in row panels of W: each panel is decoded (a copy for f32 W) and
/// transposed to `[inp, rows]` before its gemm, so that gemm packs it with contiguous copies instead of
/// its scalar strided pack of a transposed operand (see `transpose.rs`).
#[allow(clippy::too_many_arguments)]
pub(super) fn dense_gemm_fwd(
    x: &[f32],
    w: &WeightRef<'_>,
    t: usize,
    out: usize,
    inp: usize,
    y: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    // Panel of P rows: P × inp f32 ≤ ~2 MiB (one L2), at least 32 rows for an efficient gemm, and
    // at least one panel per thread, all of about the same size. A task keeps two scratch panels: the
    // decoded rows (unused for f32 W, whose rows are read in place) and their transpose.
    let p_max = ((1usize << 19) / inp.max(1)).clamp(32, 256).next_multiple_of(16);
    let p = balanced_panel(out, p_max, 16);
    let np = out.div_ceil(p);
    let yp = SendPtr(y.as_mut_ptr());
    (0..np).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(buf, wt): &mut (Vec<f32>, Vec<f32>), pi| {
            let o0 = pi * p;
            let rows = p.min(out - o0);
            let panel: &[f32] = if let WeightRef::F32(wf) = w {
                &wf[o0 * inp..(o0 + rows) * inp]
            } else {
                buf.resize(rows * inp, 0.0);
                decode_rows(w, o0, inp, buf);
                buf
            };
            wt.resize(rows * inp, 0.0);
            transpose(panel, inp, rows, inp, wt);
            // SAFETY: this task writes only the columns o0..o0+rows of y ([t, out], row stride out);
            // panels are disjoint. wt is [inp, rows] (row-major, the panel transposed); u [t, rank];
            // b rows o0.. of [out, rank].
            unsafe {
                let dst = yp.get().add(o0);
                gemm_f32(
                    t,
                    rows,
                    inp,
                    dst,
                    out,
                    false,
                    x.as_ptr(),
                    inp,
                    1,
                    wt.as_ptr(),
                    rows,
                    1,
                    gemm::Parallelism::None,
                );
                if let Some((u, b)) = lr {
                    let bp = b.as_ptr().add(o0 * rank);
                    gemm_f32(
                        t,
                        rows,
                        rank,
                        dst,
                        out,
                        true,
                        u.as_ptr(),
                        rank,
                        1,
                        bp,
                        1,
                        rank,
                        gemm::Parallelism::None,
                    );
                }
            }
        },
    );
}

/// The panel size (a multiple of `align`, at most `max` unless `align` is larger) that splits `n` into
/// panels of nearly equal size, as many as the rayon threads or a multiple of them: a 384-row weight
/// with a 256-row limit on 2 threads gets 2 panels of 192, not 256 + 128 (a 1-panel backward ran
/// on one core).
fn balanced_panel(n: usize, max: usize, align: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let mut panels = n.div_ceil(max.max(1)).next_multiple_of(threads);
    // Each panel must keep at least `align` elements.
    while panels > 1 && n.div_ceil(panels) < align {
        panels -= 1;
    }
    n.div_ceil(panels.max(1)).next_multiple_of(align).max(align)
}

/// Rows `[o0, o0 + rows)` of W into `buf` ([rows, inp], f32).
pub(super) fn decode_rows(w: &WeightRef<'_>, o0: usize, inp: usize, buf: &mut [f32]) {
    match w {
        // Contiguous flat range: one call decodes the whole panel.
        WeightRef::Q4(q) => decode_flat(q, o0 * inp, buf),
        WeightRef::KBit(k) => k.decode_flat(o0 * inp, buf),
        _ => {
            for (i, r) in buf.chunks_mut(inp).enumerate() {
                w.decode_row_seg(o0 + i, inp, 0, r);
            }
        }
    }
}

/// dx[t, k] = dy·W (+ v·a). Column panels of W so that tasks own disjoint column slices of dx.
#[allow(clippy::too_many_arguments)]
pub(super) fn dense_gemm_bwd(
    dy: &[f32],
    w: &WeightRef<'_>,
    t: usize,
    out: usize,
    inp: usize,
    dx: &mut [f32],
    lr: Option<(&[f32], &[f32])>,
    rank: usize,
) {
    if let WeightRef::F32(wf) = w {
        let par = tcpu::gemm_parallelism(t, inp, out);
        // SAFETY: dy [t, out], wf [out, inp], dx [t, inp]; v [t, rank], a [rank, inp].
        unsafe {
            gemm_f32(
                t,
                inp,
                out,
                dx.as_mut_ptr(),
                inp,
                false,
                dy.as_ptr(),
                out,
                1,
                wf.as_ptr(),
                inp,
                1,
                par,
            );
            if let Some((v, a)) = lr {
                gemm_f32(
                    t,
                    inp,
                    rank,
                    dx.as_mut_ptr(),
                    inp,
                    true,
                    v.as_ptr(),
                    rank,
                    1,
                    a.as_ptr(),
                    inp,
                    1,
                    par,
                );
            }
        }
        return;
    }
    // Column panel: out × kc f32 ≤ ~2 MiB, at least one per thread, all of about the same width.
    let kc_max = ((1usize << 19) / out.max(1)).clamp(32, 512).next_multiple_of(32);
    let kc = balanced_panel(inp, kc_max, 32);
    let np = inp.div_ceil(kc);
    let dxp = SendPtr(dx.as_mut_ptr());
    (0..np)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, pi| {
            let k0 = pi * kc;
            let cols = kc.min(inp - k0);
            buf.resize(out * cols, 0.0);
            for (o, r) in buf.chunks_mut(cols).enumerate() {
                w.decode_row_seg(o, inp, k0, r);
            }
            // SAFETY: this task writes only the columns k0..k0+cols of dx ([t, inp]); panels are disjoint.
            // buf is [out, cols]; a is [rank, inp] (columns k0.. with row stride inp).
            unsafe {
                let dst = dxp.get().add(k0);
                gemm_f32(
                    t,
                    cols,
                    out,
                    dst,
                    inp,
                    false,
                    dy.as_ptr(),
                    out,
                    1,
                    buf.as_ptr(),
                    cols,
                    1,
                    gemm::Parallelism::None,
                );
                if let Some((v, a)) = lr {
                    gemm_f32(
                        t,
                        cols,
                        rank,
                        dst,
                        inp,
                        true,
                        v.as_ptr(),
                        rank,
                        1,
                        a.as_ptr().add(k0),
                        inp,
                        1,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
}
