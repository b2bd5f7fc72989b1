//! CPU attention: one rayon task per (batch, head) in forward and per (batch, kv head) in backward, each
//! running its products through the `gemm` crate on strided views of the token-major q/k/v (no per-head
//! copies). Scores, softmax and accumulation are f32; f16/bf16 inputs are widened once up front.

use super::{AttentionConfig, Saved};
use crate::error::Result;
use crate::tensor::cpu::{SendPtr, from_f32_vec, gemm_f32, to_f32_vec};
use crate::tensor::exp::exp_sub2;
use crate::tensor::{CpuStorage, DType, Tensor, dropout_hash, dropout_threshold};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// A strided row-major matrix view: element (r, c) at `ptr + r*rs + c*cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// `dst[m, n] (=, or += with acc) A[m, k] · B[k, n]` on strided views, single-threaded (the callers
/// are already parallel over heads).
///
/// # Safety
/// Every element (r, c) of `dst` (r < m, c < n, row stride `dst_rs`), `a` (r < m, c < k) and `b`
/// (r < k, c < n) must be in bounds of its allocation, and no other thread may touch `dst`'s elements
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, acc: bool, a: View, b: View) {
    // SAFETY: the function's contract is gemm_f32's.
    unsafe {
        gemm_f32(
            m,
            n,
            k,
            dst,
            dst_rs,
            acc,
            a.ptr,
            a.rs,
            a.cs,
            b.ptr,
            b.rs,
            b.cs,
            gemm::Parallelism::None,
        )
    }
}

/// The elements of a float tensor as f32 (borrowed when already f32).
fn f32s(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    Ok(match t.dtype() {
        DType::F32 => Cow::Borrowed(t.cpu_data::<f32>("attention")?),
        DType::F16 => Cow::Owned(to_f32_vec(t.cpu_data::<f16>("attention")?)),
        DType::BF16 => Cow::Owned(to_f32_vec(t.cpu_data::<bf16>("attention")?)),
        other => return Err(crate::error::Error::dtype("attention", "a float dtype", other)),
    })
}

/// An f32 buffer as a tensor of `dtype` (rounded once).
fn finish(v: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let s = match dtype {
        DType::F16 => CpuStorage::F16(from_f32_vec(&v)),
        DType::BF16 => CpuStorage::BF16(from_f32_vec(&v)),
        _ => CpuStorage::F32(v),
    };
    Tensor::from_cpu_storage(s, shape)
}

/// Which keys row `i` of sequence `b` may see, and the dropout scale of kept probabilities.
struct Masking<'a> {
    cfg: &'a AttentionConfig,
    key_mask: Option<&'a [u8]>,
    /// (threshold, 1/(1-p), seed) when dropout is active.
    dropout: Option<(u64, f32, u64)>,
}

impl<'a> Masking<'a> {
    fn new(cfg: &'a AttentionConfig, key_mask: Option<&'a [u8]>) -> Self {
        let dropout = cfg
            .active_dropout()
            .map(|(p, seed)| (dropout_threshold(p), 1.0 / (1.0 - p), seed));
        Masking {
            cfg,
            key_mask,
            dropout,
        }
    }

    /// Row `i` may only see keys `0..limit(i)` under the causal mask (all keys without it).
    #[inline]
    fn limit(&self, i: usize) -> usize {
        let (sq, sk) = (self.cfg.seq_q, self.cfg.seq_k);
        if self.cfg.causal {
            (i + sk + 1).saturating_sub(sq).min(sk)
        } else {
            sk
        }
    }

    /// The key mask of sequence `b` (None: every key is real).
    #[inline]
    fn keys(&self, b: usize) -> Option<&'a [u8]> {
        let sk = self.cfg.seq_k;
        self.key_mask.map(|m| &m[b * sk..(b + 1) * sk])
    }

    /// The dropout multiplier (0 or 1/(1-p); 1 without dropout) of probability (b, h, i, j).
    #[inline]
    fn keep(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        match self.dropout {
            None => 1.0,
            Some((threshold, scale, seed)) => {
                let c = self.cfg;
                let idx = (((b * c.num_heads + h) * c.seq_q + i) * c.seq_k + j) as u64;
                if dropout_hash(seed, idx) as u64 >= threshold {
                    scale
                } else {
                    0.0
                }
            }
        }
    }
}

/// Views of head `h`'s (or kv head `g`'s) columns of sequence `b` in a token-major buffer.
fn head_view(data: &[f32], b: usize, seq: usize, heads: usize, h: usize, d: usize) -> View {
    let width = heads * d;
    View {
        // Pointer arithmetic only (`wrapping_add`); every dereference is in `mm`.
        ptr: data.as_ptr().wrapping_add(b * seq * width + h * d),
        rs: width,
        cs: 1,
    }
}

/// A task's own `[rows, cols]` scratch matrix as a view.
fn scratch(m: &[f32], cols: usize) -> View {
    View {
        ptr: m.as_ptr(),
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a view.
fn t(v: View) -> View {
    View {
        ptr: v.ptr,
        rs: v.cs,
        cs: v.rs,
    }
}

/// The query-row blocks of a head: `(r0, r1, keys)` with `keys` the number of leading keys any row of
/// `r0..r1` may see. Without a causal mask that is one block of every key. Under it, blocks of about
/// `seq_q / 8` rows (a multiple of 8) skip the keys above the block's last row: for seq 256 the products
/// cover 56% of the square instead of all of it (half is the limit), at 8 gemm calls per product.
fn row_blocks<'a>(m: &'a Masking<'a>) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let sq = m.cfg.seq_q;
    let rb = if m.cfg.causal {
        sq.div_ceil(8).next_multiple_of(8).max(8)
    } else {
        sq.max(1)
    };
    (0..sq).step_by(rb).map(move |r0| {
        let r1 = (r0 + rb).min(sq);
        (r0, r1, m.limit(r1 - 1))
    })
}

/// `S[r0..r1, ..keys] = Q_bh·K_bgᵀ` (unscaled) into rows `r0..r1` of `s [seq_q, seq_k]`.
#[allow(clippy::too_many_arguments)]
fn scores(
    qf: &[f32],
    kf: &[f32],
    cfg: &AttentionConfig,
    b: usize,
    h: usize,
    (r0, r1, keys): (usize, usize, usize),
    s: &mut [f32],
) {
    let (sq, sk, d) = (cfg.seq_q, cfg.seq_k, cfg.head_dim);
    let g = h / cfg.group();
    let qv = rows_from(head_view(qf, b, sq, cfg.num_heads, h, d), r0);
    let kv = head_view(kf, b, sk, cfg.num_kv_heads, g, d);
    debug_assert!(s.len() >= sq * sk && r1 <= sq && keys <= sk);
    // SAFETY: qv spans rows b*sq+r0..b*sq+r1 and columns h*d..(h+1)*d of q [batch*sq, H*d] (checked by
    // check_inputs), kv rows b*sk..b*sk+keys of k likewise; rows r0..r1 of `s` (stride sk, keys <= sk
    // columns) are this task's own scratch.
    unsafe {
        mm(
            r1 - r0,
            keys,
            d,
            s.as_mut_ptr().add(r0 * sk),
            sk,
            false,
            qv,
            t(kv),
        )
    };
}

/// A view starting `r` rows further down (pointer arithmetic only).
fn rows_from(v: View, r: usize) -> View {
    View {
        ptr: v.ptr.wrapping_add(r * v.rs),
        ..v
    }
}

/// Forward: `(output, lse)`.
pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let (qf, kf, vf) = (f32s(q)?, f32s(k)?, f32s(v)?);
    let (sq, sk, d, nh) = (cfg.seq_q, cfg.seq_k, cfg.head_dim, cfg.num_heads);
    let mut out = vec![0f32; cfg.batch * sq * nh * d];
    let mut lse = vec![0f32; cfg.lse_len()];
    let masking = Masking::new(cfg, key_mask);
    let optr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(sq.max(1))
        .take(cfg.batch * nh)
        .enumerate()
        .for_each(|(bh, lse_row)| {
            let (b, h) = (bh / nh, bh % nh);
            let mut s = vec![0f32; sq * sk];
            if sk == 0 {
                lse_row.fill(f32::INFINITY);
            }
            let g = h / cfg.group();
            let vv = head_view(&vf, b, sk, cfg.num_kv_heads, g, d);
            for blk @ (r0, r1, keys) in row_blocks(&masking) {
                scores(&qf, &kf, cfg, b, h, blk, &mut s);
                for i in r0..r1 {
                    lse_row[i] = softmax_row(&mut s[i * sk..i * sk + keys], &masking, b, h, i);
                }
                let pv = rows_from(scratch(&s, sk), r0);
                // SAFETY: this task alone owns rows b*sq..(b+1)*sq, columns h*d..(h+1)*d of out [batch*sq,
                // H*d]; vv's first `keys` rows are in bounds of v as in `scores`; pv is rows r0..r1 of the
                // task's own sq*sk scratch.
                unsafe {
                    let dst = optr.get().add((b * sq + r0) * nh * d + h * d);
                    mm(r1 - r0, d, keys, dst, nh * d, false, pv, vv)
                }
            }
        });
    let shape = q.shape().to_vec();
    Ok((
        finish(out, &shape, dtype)?,
        Tensor::from_cpu_storage(CpuStorage::F32(lse), &[cfg.lse_len()])?,
    ))
}

/// Softmax of one score row in place (masked entries become 0, then dropout is applied); returns the
/// row's log-sum-exp over the visible keys (`+inf` when none is visible: the row becomes all zeros).
fn softmax_row(row: &mut [f32], m: &Masking, b: usize, h: usize, i: usize) -> f32 {
    let scale = m.cfg.scale;
    let (head, tail) = row.split_at_mut(m.limit(i));
    tail.fill(0.0);
    let keys = m.keys(b);
    let ok = |j: usize| keys.is_none_or(|k| k[j] != 0);
    let mut mx = f32::NEG_INFINITY;
    for (j, x) in head.iter_mut().enumerate() {
        *x *= scale;
        if ok(j) {
            mx = mx.max(*x);
        }
    }
    if mx == f32::NEG_INFINITY {
        head.fill(0.0);
        return f32::INFINITY;
    }
    exp_sub2(head, 1.0, mx, 0.0);
    if let Some(keys) = keys {
        head.iter_mut()
            .zip(keys)
            .for_each(|(x, &k)| *x = if k != 0 { *x } else { 0.0 });
    }
    let sum: f32 = head.iter().sum();
    let inv = 1.0 / sum;
    if m.dropout.is_some() {
        for (j, x) in head.iter_mut().enumerate() {
            *x *= inv * m.keep(b, h, i, j);
        }
    } else {
        head.iter_mut().for_each(|x| *x *= inv);
    }
    mx + sum.ln()
}

/// Backward: `(dq, dk, dv)`.
pub(crate) fn backward(
    saved: Saved<'_>,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Saved { q, k, v, output, lse } = saved;
    let (qf, kf, vf, of, gf) = (f32s(q)?, f32s(k)?, f32s(v)?, f32s(output)?, f32s(grad_out)?);
    let lse = lse.cpu_data::<f32>("attention")?;
    let (sq, sk, d, nh, nkv) = (
        cfg.seq_q,
        cfg.seq_k,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    );
    let group = cfg.group();
    let mut dq = vec![0f32; q.numel()];
    let mut dk = vec![0f32; k.numel()];
    let mut dv = vec![0f32; v.numel()];
    let masking = Masking::new(cfg, key_mask);
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..cfg.batch * nkv).into_par_iter().for_each(|bg| {
        let (b, g) = (bg / nkv, bg % nkv);
        let mut p = vec![0f32; sq * sk];
        let mut dp = vec![0f32; sq * sk];
        let kv = head_view(&kf, b, sk, nkv, g, d);
        let vv = head_view(&vf, b, sk, nkv, g, d);
        for h in g * group..(g + 1) * group {
            let (qv, dov) = (head_view(&qf, b, sq, nh, h, d), head_view(&gf, b, sq, nh, h, d));
            let row0 = b * sq * nh * d + h * d;
            let kv_off = b * sk * nkv * d + g * d;
            for blk @ (r0, r1, keys) in row_blocks(&masking) {
                scores(&qf, &kf, cfg, b, h, blk, &mut p);
                // dP = dO·Vᵀ on the block's rows and visible keys.
                // SAFETY: dov/vv are in bounds of grad_out/v (same layout as q/v) for rows r0..r1 and
                // the first `keys` keys; rows r0..r1 of dp are task scratch (stride sk).
                unsafe {
                    let dst = dp.as_mut_ptr().add(r0 * sk);
                    mm(r1 - r0, keys, d, dst, sk, false, rows_from(dov, r0), t(vv))
                };
                for i in r0..r1 {
                    let l = lse[(b * nh + h) * sq + i];
                    let at = row0 + i * nh * d;
                    let di: f32 = gf[at..at + d]
                        .iter()
                        .zip(&of[at..at + d])
                        .map(|(x, y)| x * y)
                        .sum();
                    let row = i * sk..i * sk + keys;
                    let (prow, dprow) = (&mut p[row.clone()], &mut dp[row]);
                    let lim = masking.limit(i);
                    prow[lim..].fill(0.0);
                    dprow[lim..].fill(0.0);
                    let keys = masking.keys(b);
                    let drop = masking.dropout.is_some();
                    exp_sub2(&mut prow[..lim], cfg.scale, l, 0.0);
                    for j in 0..lim {
                        let pij = if keys.is_none_or(|k| k[j] != 0) {
                            prow[j]
                        } else {
                            0.0
                        };
                        let keep = if drop { masking.keep(b, h, i, j) } else { 1.0 };
                        // scale·dS into dp, the dropped-and-scaled probability (for dV) into p.
                        dprow[j] = cfg.scale * pij * (dprow[j] * keep - di);
                        prow[j] = pij * keep;
                    }
                }
                let (pv, dsv) = (rows_from(scratch(&p, sk), r0), rows_from(scratch(&dp, sk), r0));
                let (qb, dob) = (rows_from(qv, r0), rows_from(dov, r0));
                // SAFETY: this task alone owns rows b*sk..(b+1)*sk, columns g*d..(g+1)*d of dk and dv (it
                // is the only task of kv head g of sequence b; both start zeroed, so every product
                // accumulates) and rows b*sq..(b+1)*sq, columns h*d..(h+1)*d of dq (query head h belongs
                // to kv head g only); the read views are in bounds as in `scores`.
                unsafe {
                    mm(keys, d, r1 - r0, dvp.get().add(kv_off), nkv * d, true, t(pv), dob);
                    mm(keys, d, r1 - r0, dkp.get().add(kv_off), nkv * d, true, t(dsv), qb);
                    let dst = dqp.get().add(row0 + r0 * nh * d);
                    mm(r1 - r0, d, keys, dst, nh * d, false, dsv, kv);
                }
            }
        }
    });
    Ok((
        finish(dq, q.shape(), dtype)?,
        finish(dk, k.shape(), dtype)?,
        finish(dv, v.shape(), dtype)?,
    ))
}
