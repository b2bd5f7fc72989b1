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
