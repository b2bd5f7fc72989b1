//! CPU kernels of VB-LoRA's composition (also the oracles of `kernels/vblora.cu`).
//!
//! Per row of logits `[V]`: torch's top-k (exact tie order, [`super::topk`]), softmax over the k
//! selected logits, and the mix `Σ_j w_j · bank[idx_j]` (a [L] sub-vector). Backward:
//! `g_j = <grad_row, bank[idx_j]>`, `dlogit[idx_j] = w_j (g_j - Σ_i w_i g_i)` (softmax Jacobian, zero
//! for unselected logits) and `dbank[idx_j] += w_j · grad_row`.
//!
//! Napkin math: rows = r·(in + out)/L (128 for r=4, 4096x4096, L=256), so the whole composition is
//! rows·(V + 2kL) ≈ 100 k operations, microseconds, against the 2·T·in·out = 17 GFLOP of the layer's
//! base matmul at T=512. The bank gradient is reduced deterministically: selections are bucketed by
//! bank row (counting sort, rows ascending) and each bank row is summed in that fixed order.

use super::Layout;
use super::topk::torch_topk;
use rayon::prelude::*;

/// The top-k selection of every row: indices and softmax weights, `[rows, k]` each.
pub(crate) struct Selection {
    pub idx: Vec<u32>,
    pub w: Vec<f32>,
    /// True when some row holds a non-finite logit (e.g. the -inf of a `save_only_topk_weights` load).
    pub nonfinite: bool,
}

/// Softmax over the selected logits, in torch's order (max-subtracted, normalized by the sum).
fn softmax_into(sel: &[(f32, u32)], w: &mut [f32]) {
    let m = sel.iter().fold(
        f32::NEG_INFINITY,
        |m, e| if e.0 > m || e.0.is_nan() { e.0 } else { m },
    );
    let mut s = 0f32;
    for (o, e) in w.iter_mut().zip(sel) {
        *o = (e.0 - m).exp();
        s += *o;
    }
    // torch's lastdim softmax multiplies by the reciprocal of the sum.
    let inv = 1.0 / s;
    for o in w.iter_mut() {
        *o *= inv;
    }
}

pub(crate) fn select(logits: &[f32], v: usize, k: usize) -> Selection {
    let rows = logits.len() / v;
    let mut idx = vec![0u32; rows * k];
    let mut w = vec![0f32; rows * k];
    let nonfinite = idx
        .par_chunks_mut(k)
        .zip(w.par_chunks_mut(k))
        .zip(logits.par_chunks(v))
        .map_init(Vec::new, |q, ((ib, wb), row)| {
            let sel = torch_topk(row, k, q);
            for (o, e) in ib.iter_mut().zip(sel) {
                *o = e.1;
            }
            softmax_into(sel, wb);
            !row.iter().all(|x| x.is_finite())
        })
        .reduce(|| false, |a, b| a || b);
    let _ = rows;
    Selection { idx, w, nonfinite }
}

/// Output index of element `l` of row `row` for the given layout.
#[inline(always)]
pub(crate) fn out_index(layout: Layout, row: usize, l: usize, len: usize) -> usize {
    match layout {
        Layout::Plain => row * len + l,
        // B: rows are (ob, j) with j < r; element l goes to B[ob·L + l, j] of a row-major [out, r].
        Layout::BTransposed { r } => ((row / r) * len + l) * r + row % r,
    }
}

/// out[row, l] = Σ_j w[row, j] · bank[idx[row, j], l], written through `layout`.
pub(crate) fn compose(bank: &[f32], len: usize, sel: &Selection, k: usize, layout: Layout) -> Vec<f32> {
    let rows = sel.idx.len() / k;
    // Build rows in a plain buffer (parallel), then scatter to the layout.
    let mut plain = vec![0f32; rows * len];
    plain.par_chunks_mut(len.max(1)).enumerate().for_each(|(row, o)| {
        for j in 0..k {
            let (b, wj) = (sel.idx[row * k + j] as usize, sel.w[row * k + j]);
            for (o, &x) in o.iter_mut().zip(&bank[b * len..(b + 1) * len]) {
                *o += wj * x;
            }
        }
    });
    if layout == Layout::Plain {
        return plain;
    }
    let mut out = vec![0f32; rows * len];
    for row in 0..rows {
        for l in 0..len {
            out[out_index(layout, row, l, len)] = plain[row * len + l];
        }
    }
    out
}

/// (dlogits `[rows, V]`, dbank `[V, L]`) for the upstream gradient `grad` laid out as `layout`.
pub(crate) fn compose_backward(
    bank: &[f32],
    len: usize,
    v: usize,
    sel: &Selection,
    k: usize,
    grad: &[f32],
    layout: Layout,
) -> (Vec<f32>, Vec<f32>) {
    let rows = sel.idx.len() / k;
    // The gradient rows in plain order.
    let g_plain: Vec<f32> = if layout == Layout::Plain {
        grad.to_vec()
    } else {
        let mut g = vec![0f32; rows * len];
        for row in 0..rows {
            for l in 0..len {
                g[row * len + l] = grad[out_index(layout, row, l, len)];
            }
        }
        g
    };
    let mut dlogits = vec![0f32; rows * v];
    dlogits.par_chunks_mut(v).enumerate().for_each(|(row, d)| {
        let gr = &g_plain[row * len..(row + 1) * len];
        let (ib, wb) = (&sel.idx[row * k..(row + 1) * k], &sel.w[row * k..(row + 1) * k]);
        let dot = |b: u32| -> f32 {
            let b = b as usize;
            gr.iter()
                .zip(&bank[b * len..(b + 1) * len])
                .map(|(a, b)| a * b)
                .sum()
        };
        // Σ_i w_i g_i, then each selected logit's softmax-Jacobian row (g_j recomputed: k is tiny).
        let dot_w: f32 = ib.iter().zip(wb).map(|(&b, &w)| w * dot(b)).sum();
        for (&b, &w) in ib.iter().zip(wb) {
            d[b as usize] = w * (dot(b) - dot_w);
        }
    });
    // dbank: bucket (row, j) by bank row, rows ascending, then reduce each bucket in order.
    let mut start = vec![0usize; v + 1];
    for &b in &sel.idx {
        start[b as usize + 1] += 1;
    }
    for i in 0..v {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; sel.idx.len()];
    for (e, &b) in sel.idx.iter().enumerate() {
        order[fill[b as usize]] = e;
        fill[b as usize] += 1;
    }
    let mut dbank = vec![0f32; v * len];
    dbank.par_chunks_mut(len.max(1)).enumerate().for_each(|(b, d)| {
        for &e in &order[start[b]..start[b + 1]] {
            let (row, wj) = (e / k, sel.w[e]);
            for (o, &g) in d.iter_mut().zip(&g_plain[row * len..(row + 1) * len]) {
                *o += wj * g;
            }
        }
    });
    (dlogits, dbank)
}
