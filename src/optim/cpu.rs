//! CPU AdamW: the twin of `kernels/optim.cu` and a real backend. The update is the same sequence of
//! IEEE f32 operations as the CUDA kernel (no FMA contraction on either side), so f32 results are
//! bit-identical across devices.
//!
//! Napkin math: 28 B per f32 element per step (read p, g, m, v; write p, m, v), ~12 FLOPs including a
//! sqrt and a divide. With AVX-512 one core retires a 16-lane sqrt+div every ~10 cycles, ~5 GFLOP/s
//! of this mix per core, well above what one core's ~10 GB/s share of DRAM bandwidth feeds
//! (~0.36 G elements/s): memory bound, so the target is the memcpy rate of the same bytes
//! (see benches/optim.rs).

use super::AdamWScalars;
use crate::tensor::Element;
use crate::tensor::cpu::CHUNK;
use rayon::prelude::*;

/// One element of the update; `p` is already widened to f32.
#[inline(always)]
fn update(p: f32, g: f32, m: f32, v: f32, s: &AdamWScalars) -> (f32, f32, f32) {
    let p = p * s.decay;
    let m = m + s.w1 * (g - m);
    let v = v * s.beta2 + (s.w2 * g) * g;
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    (p + (s.neg_step * m) / denom, m, v)
}

/// A plain indexed loop over equal-length slices: the bounds checks disappear and LLVM vectorizes
/// the f32 case (vsqrtps / vdivps on AVX-512).
#[inline(always)]
fn kernel<T: Element>(p: &mut [T], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let (pn, mn, vn) = update(p[i].to_f32(), g[i], m[i], v[i], s);
        p[i] = T::from_f32(pn);
        m[i] = mn;
        v[i] = vn;
    }
}

/// In-place AdamW over one parameter tensor. Tensors above one chunk (32k elements, 896 KB of
/// traffic) are split across rayon threads; small adapter tensors run inline without fork/join.
pub(crate) fn adamw<T: Element>(p: &mut [T], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    if p.len() <= CHUNK {
        kernel(p, g, m, v, s);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| kernel(p, g, m, v, s));
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes' Adam (`AdamW8bit`): the math of csrc/kernels.cu `kOptimizer32bit2State` (f32 state,
// tensors below `min_8bit_size`) and `kOptimizerStatic8bit2StateBlockwise` (8-bit blockwise state),
// with IEEE operations in the kernels' order. Twin: `kernels/optim.cu` (`adam_bnb32_*`, `adam8bit_*`).

use super::BnbScalars;
use super::eightbit::{BLOCK, Tables};

/// `p + step_size·(m / (sqrt(v) + c2·eps))`, then the decoupled weight decay (after the update, as
/// bitsandbytes does).
#[inline(always)]
fn bnb_param(p: f32, m: f32, v: f32, s: &BnbScalars) -> f32 {
    let p = p + s.step_size * (m / (v.sqrt() + s.eps_c2));
    if s.weight_decay { p * s.decay } else { p }
}

#[inline(always)]
fn bnb32_kernel<T: Element>(p: &mut [T], g: &[f32], m: &mut [f32], v: &mut [f32], s: &BnbScalars) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i];
        let mi = m[i] * s.beta1 + s.w1 * gi;
        let vi = v[i] * s.beta2 + s.w2 * (gi * gi);
        p[i] = T::from_f32(bnb_param(p[i].to_f32(), mi, vi, s));
        m[i] = mi;
        v[i] = vi;
    }
}

/// bitsandbytes' 32-bit Adam (f32 moments): no special case for non-finite gradients.
pub(crate) fn adam_bnb32<T: Element>(p: &mut [T], g: &[f32], m: &mut [f32], v: &mut [f32], s: &BnbScalars) {
    if p.len() <= CHUNK {
        bnb32_kernel(p, g, m, v, s);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| bnb32_kernel(p, g, m, v, s));
}

/// `code[c]` of the moment `x` already divided by its block absmax, with `m`'s sign repair: when the
/// nearest code has the other sign bit, step one code towards `x` (wrapping like the kernel's `unsigned
/// char`).
#[inline(always)]
fn encode_signed(t: &Tables, x: f32, m: f32) -> u8 {
    let c = t.lut_m.encode(x);
    if t.code_m[c as usize].is_sign_negative() != m.is_sign_negative() {
        if m > 0.0 {
            c.wrapping_add(1)
        } else {
            c.wrapping_sub(1)
        }
    } else {
        c
    }
}

/// `max(-FLT_MAX, |x_0|, |x_1|, ...)` as the kernel's `fmaxf` chain computes it (a NaN operand is
/// ignored), in 16 independent lanes so that it vectorizes; max is exact, so the order does not matter.
#[inline(always)]
fn block_absmax(x: &[f32]) -> f32 {
    let mut lanes = [-f32::MAX; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lanes[j] = lanes[j].max(c[j].abs());
        }
    }
    for (j, &r) in chunks.remainder().iter().enumerate() {
        lanes[j] = lanes[j].max(r.abs());
    }
    lanes.iter().fold(-f32::MAX, |a, &b| a.max(b))
}

/// One quantization block (at most 256 elements): dequantize, update the moments (a non-finite gradient
/// zeroes both and skips the parameter), the new block absmax, the parameter, requantize.
#[inline(always)]
fn block8<T: Element>(
    p: &mut [T],
    g: &[f32],
    cm: &mut [u8],
    cv: &mut [u8],
    absmax: (&mut f32, &mut f32),
    s: &BnbScalars,
    t: &Tables,
) {
    let n = p.len().min(g.len()).min(cm.len()).min(cv.len()).min(BLOCK);
    let (p, g, cm, cv) = (&mut p[..n], &g[..n], &mut cm[..n], &mut cv[..n]);
    let (am, av) = (*absmax.0, *absmax.1);
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    let (m, v) = (&mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i];
        let fin = gi.is_finite();
        let gz = if fin { gi } else { 0.0 };
        let vi = t.code_v[cv[i] as usize] * av;
        let vi = vi * s.beta2 + (s.w2 * gz) * gz;
        let mi = t.code_m[cm[i] as usize] * am;
        let mi = mi * s.beta1 + s.w1 * gz;
        m[i] = if fin { mi } else { 0.0 };
        v[i] = if fin { vi } else { 0.0 };
    }
    let (mx_m, mx_v) = (block_absmax(m), block_absmax(v));
    for i in 0..n {
        if g[i].is_finite() {
            p[i] = T::from_f32(bnb_param(p[i].to_f32(), m[i], v[i], s));
        }
    }
    for i in 0..n {
        cm[i] = encode_signed(t, m[i] / mx_m, m[i]);
        cv[i] = t.lut_v.encode(v[i] / mx_v);
    }
    *absmax.0 = mx_m;
    *absmax.1 = mx_v;
}

/// The 8-bit state of a run of whole blocks: codes of m and v, one absmax each per block.
pub(crate) struct Q8<'a> {
    pub cm: &'a mut [u8],
    pub cv: &'a mut [u8],
    pub am: &'a mut [f32],
    pub av: &'a mut [f32],
}

#[inline(always)]
fn blocks8<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    for (((((p, g), cm), cv), am), av) in p
        .chunks_mut(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(q.cm.chunks_mut(BLOCK))
        .zip(q.cv.chunks_mut(BLOCK))
        .zip(q.am.iter_mut())
        .zip(q.av.iter_mut())
    {
        block8(p, g, cm, cv, (am, av), s, t);
    }
}

/// [`blocks8`] compiled for AVX-512 (gathers for the table lookups); the results are the same IEEE
/// operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn blocks8_avx512<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    blocks8(p, g, q, s, t)
}

fn blocks8_best<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu::Isa::Avx512.is_available() {
        // SAFETY: the CPU supports the enabled target features (checked just above).
        unsafe { blocks8_avx512(p, g, q, s, t) };
        return;
    }
    blocks8(p, g, q, s, t)
}

/// bitsandbytes' blockwise 8-bit Adam over one tensor: `q.cm`/`q.cv` the codes of m (signed dynamic
/// map) and v (unsigned), `q.am`/`q.av` one absmax per 256 elements. Rayon over groups of 64 blocks.
pub(crate) fn adam8bit<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    // 64 blocks = 16k elements per task (~0.25 MB of traffic).
    const GROUP_BLOCKS: usize = 64;
    const GROUP: usize = GROUP_BLOCKS * BLOCK;
    if p.len() <= GROUP {
        blocks8_best(p, g, q, s, t);
        return;
    }
    p.par_chunks_mut(GROUP)
        .zip(g.par_chunks(GROUP))
        .zip(q.cm.par_chunks_mut(GROUP).zip(q.cv.par_chunks_mut(GROUP)))
        .zip(
            q.am.par_chunks_mut(GROUP_BLOCKS)
                .zip(q.av.par_chunks_mut(GROUP_BLOCKS)),
        )
        .for_each(|(((p, g), (cm, cv)), (am, av))| blocks8_best(p, g, Q8 { cm, cv, am, av }, s, t));
}
