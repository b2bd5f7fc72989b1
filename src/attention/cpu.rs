//! CPU attention: one rayon task per (batch, head) in forward and per (batch, kv head) in backward, each
//! running its products through the `gemm` crate on strided views of the token-major q/k/v (no per-head
//! copies). Scores, softmax and accumulation are f32; f16/bf16 inputs are widened once up front.

use super::AttentionConfig;
use crate::error::Result;
use crate::tensor::cpu::{SendPtr, from_f32_vec, gemm_f32, to_f32_vec};
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

    #[inline]
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        self.key_mask.is_none_or(|m| m[b * self.cfg.seq_k + j] != 0) && self.cfg.causal_ok(i, j)
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

/// `S = Q_bh·K_bgᵀ` (unscaled) into `s [seq_q, seq_k]`.
fn scores(qf: &[f32], kf: &[f32], cfg: &AttentionConfig, b: usize, h: usize, s: &mut [f32]) {
    let (sq, sk, d) = (cfg.seq_q, cfg.seq_k, cfg.head_dim);
    let g = h / cfg.group();
    let qv = head_view(qf, b, sq, cfg.num_heads, h, d);
    let kv = head_view(kf, b, sk, cfg.num_kv_heads, g, d);
    debug_assert!(s.len() >= sq * sk);
    // SAFETY: qv spans rows b*sq..(b+1)*sq and columns h*d..(h+1)*d of q [batch*sq, H*d] (checked by
    // check_inputs), kv likewise for k; `s` is this task's own scratch of sq*sk elements.
    unsafe { mm(sq, sk, d, s.as_mut_ptr(), sk, false, qv, t(kv)) };
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
            scores(&qf, &kf, cfg, b, h, &mut s);
            for (i, (row, l)) in s.chunks_mut(sk.max(1)).zip(lse_row.iter_mut()).enumerate() {
                *l = softmax_row(row, &masking, b, h, i);
            }
            let g = h / cfg.group();
            let vv = head_view(&vf, b, sk, cfg.num_kv_heads, g, d);
            let pv = scratch(&s, sk);
            // SAFETY: this task alone owns rows b*sq..(b+1)*sq, columns h*d..(h+1)*d of out [batch*sq,
            // H*d]; vv is in bounds of v as in `scores`; pv is the task's own sq*sk scratch.
            unsafe {
                let dst = optr.get().add(b * sq * nh * d + h * d);
                mm(sq, d, sk, dst, nh * d, false, pv, vv)
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
    let mut mx = f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        *x *= scale;
        if m.visible(b, i, j) {
            mx = mx.max(*x);
        }
    }
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::INFINITY;
    }
    let mut sum = 0f32;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if m.visible(b, i, j) { (*x - mx).exp() } else { 0.0 };
        sum += *x;
    }
    let inv = 1.0 / sum;
    for (j, x) in row.iter_mut().enumerate() {
        *x *= inv * m.keep(b, h, i, j);
    }
    mx + sum.ln()
}

/// Backward: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    output: &Tensor,
    lse: &Tensor,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
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
        for (n, h) in (g * group..(g + 1) * group).enumerate() {
            let qv = head_view(&qf, b, sq, nh, h, d);
            let dov = head_view(&gf, b, sq, nh, h, d);
            scores(&qf, &kf, cfg, b, h, &mut p);
            // dP = dO·Vᵀ
            // SAFETY: dov/vv are in bounds of grad_out/v (same layout as q/v); dp is task scratch.
            unsafe { mm(sq, sk, d, dp.as_mut_ptr(), sk, false, dov, t(vv)) };
            let row0 = b * sq * nh * d + h * d;
            for i in 0..sq {
                let l = lse[(b * nh + h) * sq + i];
                let at = row0 + i * nh * d;
                let di: f32 = gf[at..at + d]
                    .iter()
                    .zip(&of[at..at + d])
                    .map(|(x, y)| x * y)
                    .sum();
                let (prow, dprow) = (&mut p[i * sk..(i + 1) * sk], &mut dp[i * sk..(i + 1) * sk]);
                for j in 0..sk {
                    let pij = if masking.visible(b, i, j) {
                        (prow[j] * cfg.scale - l).exp()
                    } else {
                        0.0
                    };
                    let keep = masking.keep(b, h, i, j);
                    // scale·dS into dp, the dropped-and-scaled probability (for dV) into p.
                    dprow[j] = cfg.scale * pij * (dprow[j] * keep - di);
                    prow[j] = pij * keep;
                }
            }
            let acc = n > 0;
            let (pv, dsv) = (scratch(&p, sk), scratch(&dp, sk));
            let kv_off = b * sk * nkv * d + g * d;
            // SAFETY: this task alone owns rows b*sk..(b+1)*sk, columns g*d..(g+1)*d of dk and dv (it is
            // the only task of kv head g of sequence b) and rows b*sq..(b+1)*sq, columns h*d..(h+1)*d of
            // dq (query head h belongs to kv head g only); the read views are in bounds as in `scores`.
            unsafe {
                mm(sk, d, sq, dvp.get().add(kv_off), nkv * d, acc, t(pv), dov);
                mm(sk, d, sq, dkp.get().add(kv_off), nkv * d, acc, t(dsv), qv);
                mm(sq, d, sk, dqp.get().add(row0), nh * d, false, dsv, kv);
            }
        }
    });
    Ok((
        finish(dq, q.shape(), dtype)?,
        finish(dk, k.shape(), dtype)?,
        finish(dv, v.shape(), dtype)?,
    ))
}
