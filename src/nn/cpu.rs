//! CPU twins of `kernels/nn.cu`: row gathers and their scatter-add transpose, LayerNorm forward and
//! backward, the broadcast row add and masked mean pooling. Arithmetic is f32 with one rounding per
//! output element (what the CUDA kernels do); half dtypes are widened per element.
//!
//! Napkin math (2-core AVX-512 CI machine, ~15 GB/s per core from L2/DRAM): everything here is memory
//! bound. LayerNorm over MiniLM's activations (1024 tokens x 384, f32) reads 1.5 MB and writes 1.5 MB
//! forward, reads 3 MB and writes 1.5 MB backward: ~0.1-0.2 ms per pass on two cores. Rows of 384
//! floats stay in L1 between the reduction and the write pass, so the "two passes" over a row cost one
//! trip to memory. Reductions use 8 f32 lanes so that they vectorize (a sequential f32 sum does not).

use crate::tensor::Element;
use crate::tensor::cpu::CHUNK;
use rayon::prelude::*;

/// Rows per rayon task for rows of `h` elements: about `CHUNK` elements per task.
fn rows_per_task(h: usize) -> usize {
    (CHUNK / h.max(1)).max(1)
}

/// `Σ f(x_i)` over a row, in 8 independent f32 lanes (vectorizes), lanes then tail summed at the end.
#[inline(always)]
pub(crate) fn lane_sum<T: Element>(row: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k].to_f32());
        }
    }
    let tail: f32 = tail.iter().map(|v| f(v.to_f32())).sum();
    acc.iter().sum::<f32>() + tail
}

/// `rows` rows of `h` zero-initialized elements, `row(r, out_row)` filling row `r` (in parallel, at least
/// `rows_per_task(h)` rows a task; nothing to do when `h == 0`).
fn fill_rows<T: Element>(rows: usize, h: usize, row: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
    let mut out = vec![T::default(); rows * h];
    if h == 0 {
        return out;
    }
    out.par_chunks_mut(h)
        .enumerate()
        .with_min_len(rows_per_task(h))
        .for_each(|(r, o)| row(r, o));
    out
}

/// `out[j, :] = src[idx[j], :]` for rows of `h` elements. Indices are validated by the caller.
pub(crate) fn gather_rows<T: Element>(src: &[T], idx: &[u32], h: usize) -> Vec<T> {
    fill_rows(idx.len(), h, |j, o| {
        let r = idx[j] as usize;
        o.copy_from_slice(&src[r * h..(r + 1) * h]);
    })
}

/// The transpose of [`gather_rows`]: `out[r, :] = Σ_{j: idx[j] = r} dy[j, :]` over `n` output rows,
/// given the inverse index (`offsets [n + 1]`, `order`: the `j` of each output row in increasing
/// order, see `super::InverseIndex`). f32 accumulation in a fixed order, one rounding; rows nobody
/// gathered are zero. Deterministic, like the CUDA kernel.
pub(crate) fn scatter_add_rows<T: Element>(
    dy: &[T],
    offsets: &[u32],
    order: &[u32],
    n: usize,
    h: usize,
) -> Vec<T> {
    fill_rows(n, h, |r, o| {
        let js = &order[offsets[r] as usize..offsets[r + 1] as usize];
        match js {
            [] => {}
            [j] => {
                let j = *j as usize;
                o.copy_from_slice(&dy[j * h..(j + 1) * h]);
            }
            _ => {
                let mut acc = vec![0f32; h];
                for &j in js {
                    let j = j as usize;
                    for (a, &g) in acc.iter_mut().zip(&dy[j * h..(j + 1) * h]) {
                        *a += g.to_f32();
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = T::from_f32(a);
                }
            }
        }
    })
}

/// `y[i, :] = x[i, :] + row` (f32 math, one rounding).
pub(crate) fn add_row<T: Element>(x: &[T], row: &[f32]) -> Vec<T> {
    let h = row.len();
    let mut y = vec![T::default(); x.len()];
    if h == 0 {
        return y;
    }
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(rows_per_task(h))
        .for_each(|(y, x)| {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(row) {
                *y = T::from_f32(x.to_f32() + b);
            }
        });
    y
}

/// The row-parallel frame the norms' forwards share: `y` shaped like `x` and `k` f32 statistics per
/// row of `h`, `row(y, x, stats)` filling one row (all zero when `h == 0`).
fn norm_rows<T: Element>(
    x: &[T],
    h: usize,
    k: usize,
    row: impl Fn(&mut [T], &[T], &mut [f32]) + Sync + Send,
) -> (Vec<T>, Vec<f32>) {
    let rows = x.len().checked_div(h).unwrap_or(0);
    let mut y = vec![T::default(); x.len()];
    let mut stats = vec![0f32; k * rows];
    if h == 0 {
        return (y, stats);
    }
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(stats.par_chunks_mut(k)))
        .with_min_len(rows_per_task(h))
        .for_each(|(y, (x, st))| row(y, x, st));
    (y, stats)
}

/// The frame of the norms' backwards: `dx` shaped like `x`, `row(dx, x, dy, stats)` filling one row
/// from its `k` saved statistics (all zero when `h == 0`).
fn norm_rows_backward<T: Element>(
    x: &[T],
    dy: &[T],
    h: usize,
    stats: &[f32],
    k: usize,
    row: impl Fn(&mut [T], &[T], &[T], &[f32]) + Sync + Send,
) -> Vec<T> {
    let mut dx = vec![T::default(); x.len()];
    if h == 0 {
        return dx;
    }
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(dy.par_chunks(h)).zip(stats.par_chunks(k)))
        .with_min_len(rows_per_task(h))
        .for_each(|(dx, ((x, dy), st))| row(dx, x, dy, st));
    dx
}

/// LayerNorm of each row of `x [rows, h]` (torch semantics: biased variance, `eps` inside the square
/// root): `y = (x - mean)·rstd·w + b`. Two-pass statistics in f32 (the mean of `x - x[0]`, then the
/// centred sum of squares, which avoids the cancellation of `E[x²] - mean²`). Returns `y` and per-row `[mean, rstd]`.
pub(crate) fn layer_norm<T: Element>(x: &[T], w: &[f32], b: &[f32], eps: f32) -> (Vec<T>, Vec<f32>) {
    let h = w.len();
    let inv_h = 1.0 / h as f32;
    norm_rows(x, h, 2, |y, x, st| {
        // Shifting by the first element keeps the sum accurate for rows with a large common
        // offset (|mean| >> std), where a plain f32 sum would lose the low bits of the mean.
        let shift = x[0].to_f32();
        let mean = shift + lane_sum(x, |v| v - shift) * inv_h;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) * inv_h;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = T::from_f32((x.to_f32() - mean) * rstd * w + b);
        }
        st[0] = mean;
        st[1] = rstd;
    })
}

/// LayerNorm input gradient from the saved `[mean, rstd]` per row: with `x̂ = (x - mean)·rstd` and
/// `g = dy·w`, `dx = rstd·(g - mean(g) - x̂·mean(g·x̂))`. One reduction pass and one write pass per row
/// (the row stays in L1 in between).
pub(crate) fn layer_norm_backward<T: Element>(x: &[T], dy: &[T], w: &[f32], stats: &[f32]) -> Vec<T> {
    let h = w.len();
    let inv_h = 1.0 / h as f32;
    norm_rows_backward(x, dy, h, stats, 2, |dx, x, dy, st| {
        let (mean, rstd) = (st[0], st[1]);
        let (sg, sgx) = {
            // Σ g and Σ g·x̂ over the row, with g = dy·w.
            let (mut s, mut t) = ([0f32; 8], [0f32; 8]);
            let (cx, cy, cw) = (x.chunks_exact(8), dy.chunks_exact(8), w.chunks_exact(8));
            let (tx, ty, tw) = (cx.remainder(), cy.remainder(), cw.remainder());
            for ((cx, cy), cw) in cx.zip(cy).zip(cw) {
                for k in 0..8 {
                    let g = cy[k].to_f32() * cw[k];
                    s[k] += g;
                    t[k] += g * ((cx[k].to_f32() - mean) * rstd);
                }
            }
            let (mut us, mut ut) = (0f32, 0f32);
            for ((&x, &dy), &w) in tx.iter().zip(ty).zip(tw) {
                let g = dy.to_f32() * w;
                us += g;
                ut += g * ((x.to_f32() - mean) * rstd);
            }
            (s.iter().sum::<f32>() + us, t.iter().sum::<f32>() + ut)
        };
        let (a, c) = (sg * inv_h, sgx * inv_h);
        for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            let xhat = (x.to_f32() - mean) * rstd;
            *dx = T::from_f32(rstd * (dy.to_f32() * w - a - xhat * c));
        }
    })
}

/// Masked mean over each sequence: `y[b, :] = (Σ_{t: mask} x[b·seq + t, :]) / count[b]`, zero where
/// `count[b] = 0` (callers pass counts as f32 and a mask of 0/1).
pub(crate) fn mean_pool<T: Element>(x: &[T], mask: &[u8], counts: &[f32], seq: usize, h: usize) -> Vec<T> {
    let batch = counts.len();
    let mut y = vec![T::default(); batch * h];
    if h == 0 || seq == 0 {
        return y;
    }
    y.par_chunks_mut(h).enumerate().for_each(|(b, y)| {
        let mut acc = vec![0f32; h];
        for t in 0..seq {
            let r = b * seq + t;
            if mask[r] != 0 {
                for (a, &v) in acc.iter_mut().zip(&x[r * h..(r + 1) * h]) {
                    *a += v.to_f32();
                }
            }
        }
        let c = counts[b];
        if c > 0.0 {
            for (y, a) in y.iter_mut().zip(acc) {
                *y = T::from_f32(a / c);
            }
        }
    });
    y
}

/// Gradient of [`mean_pool`]: `dx[b·seq + t, :] = mask · dy[b, :] / count[b]`.
pub(crate) fn mean_pool_backward<T: Element>(
    dy: &[T],
    mask: &[u8],
    counts: &[f32],
    seq: usize,
    h: usize,
) -> Vec<T> {
    fill_rows(counts.len() * seq, h, |r, dx| {
        let b = r / seq;
        if mask[r] != 0 {
            let c = counts[b];
            for (dx, &g) in dx.iter_mut().zip(&dy[b * h..(b + 1) * h]) {
                *dx = T::from_f32(g.to_f32() / c);
            }
        }
    })
}

/// RMSNorm of each row as transformers' `LlamaRMSNorm`: `r = 1/sqrt(mean(x²) + eps)` in f32, then
/// `y = w · round_T(x·r)` rounded to T (transformers casts the normalized value back to the input
/// dtype before the weight multiply; both roundings are exact no-ops for f32). Returns `y` and `r`.
pub(crate) fn rms_norm<T: Element>(x: &[T], w: &[f32], eps: f32) -> (Vec<T>, Vec<f32>) {
    let h = w.len();
    let inv_h = 1.0 / h as f32;
    norm_rows(x, h, 1, |y, x, rs| {
        let r = 1.0 / (lane_sum(x, |v| v * v) * inv_h + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            let t = T::from_f32(x.to_f32() * r).to_f32();
            *y = T::from_f32(w * t);
        }
        rs[0] = r;
    })
}

/// RMSNorm input gradient from the saved `r` per row: with `x̂ = x·r` and `g = dy·w`,
/// `dx = r·(g - x̂·mean(g·x̂))` (the intermediate rounding of the forward is not differentiated).
pub(crate) fn rms_norm_backward<T: Element>(x: &[T], dy: &[T], w: &[f32], rstd: &[f32]) -> Vec<T> {
    let h = w.len();
    let inv_h = 1.0 / h as f32;
    norm_rows_backward(x, dy, h, rstd, 1, |dx, x, dy, rs| {
        let r = rs[0];
        let mut acc = [0f32; 8];
        let (cx, cy, cw) = (x.chunks_exact(8), dy.chunks_exact(8), w.chunks_exact(8));
        let (tx, ty, tw) = (cx.remainder(), cy.remainder(), cw.remainder());
        for ((cx, cy), cw) in cx.zip(cy).zip(cw) {
            for k in 0..8 {
                acc[k] += cy[k].to_f32() * cw[k] * (cx[k].to_f32() * r);
            }
        }
        let tail: f32 = tx
            .iter()
            .zip(ty)
            .zip(tw)
            .map(|((&x, &dy), &w)| dy.to_f32() * w * (x.to_f32() * r))
            .sum();
        let c = (acc.iter().sum::<f32>() + tail) * inv_h;
        for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            let xhat = x.to_f32() * r;
            *dx = T::from_f32(r * (dy.to_f32() * w - xhat * c));
        }
    })
}

/// Rotary position embedding as transformers' Llama (`apply_rotary_pos_emb` with `rotate_half`) over
/// `x [tokens, heads·head_dim]`, token `t` at position `positions[t]`: for each head and `i <
/// head_dim/2`, with `f = pos·inv_freq[i]` (f32), `c = round_T(cos f)`, `s = round_T(±sin f)`,
/// `out[i] = x[i]·c - x[i + half]·s` and `out[i + half] = x[i + half]·c + x[i]·s`, every product and
/// the sum rounded to T as torch does in T. `negate_sin` gives the transpose (the backward).
pub(crate) fn rope<T: Element>(
    x: &[T],
    positions: &[u32],
    inv_freq: &[f32],
    width: usize,
    negate_sin: bool,
) -> Vec<T> {
    let half = inv_freq.len();
    let mut y = vec![T::default(); x.len()];
    if half == 0 || width == 0 {
        return y;
    }
    let r = |v: f32| T::from_f32(v).to_f32();
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(positions.par_iter()))
        .with_min_len(rows_per_task(width))
        .for_each(|(y, (x, &pos))| {
            let mut cs = vec![(0f32, 0f32); half];
            for (cs, &f) in cs.iter_mut().zip(inv_freq) {
                let f = (pos as f32 * f) as f64;
                let s = r(f.sin() as f32);
                *cs = (r(f.cos() as f32), if negate_sin { -s } else { s });
            }
            for (y, x) in y.chunks_exact_mut(2 * half).zip(x.chunks_exact(2 * half)) {
                let (y1, y2) = y.split_at_mut(half);
                let (x1, x2) = x.split_at(half);
                for i in 0..half {
                    let (c, s) = cs[i];
                    let (a, b) = (x1[i].to_f32(), x2[i].to_f32());
                    y1[i] = T::from_f32(r(a * c) + r(-b * s));
                    y2[i] = T::from_f32(r(b * c) + r(a * s));
                }
            }
        });
    y
}
