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

/// Runs a per-element moment update `f(p, g, m, v)` over one tensor: inline up to one chunk, split
/// across rayon threads above it (the same chunk boundaries in p, g, m and v).
fn chunked<T: Element>(
    p: &mut [T],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    f: impl Fn(&mut [T], &[f32], &mut [f32], &mut [f32]) + Sync,
) {
    if p.len() <= CHUNK {
        f(p, g, m, v);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| f(p, g, m, v));
}

/// In-place AdamW over one parameter tensor. Tensors above one chunk (32k elements, 896 KB of
/// traffic) are split across rayon threads; small adapter tensors run inline without fork/join.
pub(crate) fn adamw<T: Element>(p: &mut [T], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    chunked(p, g, m, v, |p, g, m, v| kernel(p, g, m, v, s));
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes' Adam (`AdamW8bit`): the math of csrc/kernels.cu `kOptimizer32bit2State` (f32 state,
// tensors below `min_8bit_size`) and `kOptimizerStatic8bit2StateBlockwise` (8-bit blockwise state),
// with IEEE operations in the kernels' order. Twin: `kernels/optim.cu` (`adam_bnb32_*`, `adam8bit_*`).

use super::BnbScalars;
use super::eightbit::{BLOCK, Tables};
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

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
    chunked(p, g, m, v, |p, g, m, v| bnb32_kernel(p, g, m, v, s));
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

/// Whether the SIMD kernels may normalize a block by its maximum `d` with a reciprocal and one FMA
/// correction instead of a division per element: `r = 1/d`, `q = x·r`, `e = fma(-q, d, x)`,
/// `q' = fma(e, r, q)` (Markstein, "Computation of elementary functions on the IBM RISC System/6000
/// processor", IBM J. Res. Dev. 34(1), 1990; Muller et al., Handbook of Floating-Point Arithmetic,
/// "Markstein's theorem"). With `r` the correctly rounded reciprocal, `q'` equals the IEEE quotient
/// `x/d` whenever `r`, `q` and the remainder `e` are normal and exact, which for `|x| <= d` (every
/// element of a block is at most its maximum) holds when:
/// - `d < 2^126`: `r > 2^-126` is normal (larger `d`, `inf`: a subnormal or zero reciprocal);
/// - `d >= 2^-60`: for every `|x/d| >= 2^-41` the remainder `x - q·d` is a multiple of
///   `ulp(q)·ulp(d) >= 2^-64 · 2^-83 = 2^-147`, above the smallest subnormal, so the FMA gives it
///   exactly, and `|x| >= 2^-101` is normal;
/// - quotients `|x/d| < 2^-41` (where that argument fails) come out of both computations below 2^-39,
///   and every magnitude below 2^-39, of either sign, has the same nearest code (the lowest row of the
///   bucket table, `eightbit::E_LO`, holds no threshold), so the codes agree even when the quotients do
///   not.
///
/// Other blocks (all-zero, subnormal, huge or infinite maxima) divide. The kernel tests compare codes
/// bit for bit against the dividing portable loop at these edges (`markstein_edges_match_portable`).
#[inline(always)]
fn reciprocal_ok(d: f32) -> bool {
    const LO: f32 = f32::from_bits((127 - 60) << 23); // 2^-60
    const HI: f32 = f32::from_bits((127 + 126) << 23); // 2^126
    (LO..HI).contains(&d)
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

/// Runs `f` on each quantization block of a run of blocks: its parameters, gradients, the codes of m and
/// v, and their two block maxima.
#[inline(always)]
fn each_block<T: Element>(
    p: &mut [T],
    g: &[f32],
    q: Q8<'_>,
    mut f: impl FnMut(&mut [T], &[f32], &mut [u8], &mut [u8], (&mut f32, &mut f32)),
) {
    for (((((p, g), cm), cv), am), av) in p
        .chunks_mut(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(q.cm.chunks_mut(BLOCK))
        .zip(q.cv.chunks_mut(BLOCK))
        .zip(q.am.iter_mut())
        .zip(q.av.iter_mut())
    {
        f(p, g, cm, cv, (am, av));
    }
}

#[inline(always)]
fn blocks8<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    each_block(p, g, q, |p, g, cm, cv, a| block8(p, g, cm, cv, a, s, t));
}

/// An explicit SIMD block kernel (`avx512::block8`, `avx512::block8_vbmi`, `avx2::block8`): one block
/// of f32 parameters, the same operations as the portable [`block8`], with buffers in [`Scratch`].
type BlockFn = unsafe fn(
    &mut [f32],
    &[f32],
    &mut [u8],
    &mut [u8],
    (&mut f32, &mut f32),
    &BnbScalars,
    &Tables,
    &mut Scratch,
);

/// One block's lanes of intermediate values for a SIMD block kernel (the updated moments and the
/// finite-gradient lane masks), set up (zeroed) once per run of blocks instead of once per block.
pub(crate) struct Scratch {
    pub m: [f32; BLOCK],
    pub v: [f32; BLOCK],
    pub fin: [u32; BLOCK],
}

impl Scratch {
    fn new() -> Box<Scratch> {
        Box::new(Scratch {
            m: [0.0; BLOCK],
            v: [0.0; BLOCK],
            fin: [0; BLOCK],
        })
    }
}

/// [`blocks8`] with an explicit SIMD block kernel: f32 parameters in place, f16/bf16 parameters through
/// an f32 copy of the block (rounded back, like the portable loop, only where the gradient is finite).
///
/// # Safety
/// The CPU has the target features of `block`.
unsafe fn blocks8_simd<T: Element>(
    p: &mut [T],
    g: &[f32],
    q: Q8<'_>,
    s: &BnbScalars,
    t: &Tables,
    block: BlockFn,
) {
    let mut buf = [0f32; BLOCK];
    let mut scratch = Scratch::new();
    each_block(p, g, q, |p, g, cm, cv, (am, av)| {
        match bytemuck::try_cast_slice_mut::<T, f32>(p)
            .ok()
            .filter(|_| T::DTYPE == crate::tensor::DType::F32)
        {
            // SAFETY: the caller guarantees the target features.
            Some(p32) => unsafe { block(p32, g, cm, cv, (am, av), s, t, &mut scratch) },
            None => {
                let b = &mut buf[..p.len()];
                b.iter_mut().zip(p.iter()).for_each(|(b, p)| *b = p.to_f32());
                // SAFETY: as above.
                unsafe { block(b, g, cm, cv, (am, av), s, t, &mut scratch) };
                for ((p, b), g) in p.iter_mut().zip(b.iter()).zip(g) {
                    if g.is_finite() {
                        *p = T::from_f32(*b);
                    }
                }
            }
        }
    });
}

/// The SIMD block kernels this CPU runs, best first: AVX-512 with VBMI, AVX-512, AVX2 with FMA (detected at run
/// time). Empty elsewhere: the portable loop.
fn simd_kernels() -> &'static [BlockFn] {
    static K: std::sync::OnceLock<Vec<BlockFn>> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        #[allow(unused_mut)]
        let mut k: Vec<BlockFn> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            if avx512 && is_x86_feature_detected!("avx512vbmi") {
                k.push(avx512::block8_vbmi);
            }
            if avx512 {
                k.push(avx512::block8);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                k.push(avx2::block8);
            }
        }
        k
    })
}

fn blocks8_best<T: Element>(p: &mut [T], g: &[f32], q: Q8<'_>, s: &BnbScalars, t: &Tables) {
    match simd_kernels().first() {
        // SAFETY: `simd_kernels` lists only kernels whose target features this CPU has.
        Some(&block) => unsafe { blocks8_simd(p, g, q, s, t, block) },
        None => blocks8(p, g, q, s, t),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use crate::optim::eightbit::tables;
    use crate::rng::Rng;
    use half::{bf16, f16};

    /// Equal bits, or both NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// A value of any magnitude, or a special one, with probability `special`.
    fn value(rng: &mut Rng, scale: f32, special: u64) -> f32 {
        const SPECIAL: [f32; 9] = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e30,
            -1e-40,
            f32::MAX,
            1e-44,
        ];
        if rng.below(100) < special {
            SPECIAL[rng.below(SPECIAL.len() as u64) as usize]
        } else {
            rng.normal() * scale * 2f32.powi(rng.below(20) as i32 - 10)
        }
    }

    /// The state of [`blocks8`]: parameters, codes of m and v, block maxima of m and v.
    type State8<T> = (Vec<T>, Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>);

    /// Runs `block` and the portable loop side by side from `state`, one step per gradient vector of
    /// `grads`, and compares everything bit for bit after each step.
    #[cfg(target_arch = "x86_64")]
    fn compare<T: Element>(
        state: State8<T>,
        grads: &[Vec<f32>],
        cfg: &AdamWConfig,
        block: BlockFn,
        what: &str,
    ) {
        let t = tables();
        let (n, nb) = (state.0.len(), state.3.len());
        let (mut a, mut b) = (state.clone(), state);
        for (step, g) in (1..).zip(grads) {
            let s = BnbScalars::new(cfg, step);
            {
                let (p, cm, cv, am, av) = &mut a;
                blocks8(p, g, Q8 { cm, cv, am, av }, &s, t);
            }
            {
                let (p, cm, cv, am, av) = &mut b;
                // SAFETY: `block` is one of `simd_kernels`, which this CPU runs.
                unsafe { blocks8_simd(p, g, Q8 { cm, cv, am, av }, &s, t, block) };
            }
            let what = format!("{what} {:?} step {step}", T::DTYPE);
            for (i, gi) in g.iter().enumerate().take(n) {
                assert!(
                    same(a.0[i].to_f32(), b.0[i].to_f32()),
                    "{what}: p[{i}] {:?} vs {:?}",
                    a.0[i],
                    b.0[i]
                );
                assert_eq!(a.1[i], b.1[i], "{what}: code m[{i}] (g {gi:e})");
                assert_eq!(a.2[i], b.2[i], "{what}: code v[{i}] (g {gi:e})");
            }
            for k in 0..nb {
                assert!(
                    same(a.3[k], b.3[k]),
                    "{what}: absmax m[{k}] {} vs {}",
                    a.3[k],
                    b.3[k]
                );
                assert!(
                    same(a.4[k], b.4[k]),
                    "{what}: absmax v[{k}] {} vs {}",
                    a.4[k],
                    b.4[k]
                );
            }
        }
    }

    /// Random state and 4 steps of gradients from [`value`] (a quarter of the blocks with zero maxima),
    /// everything scaled by `2^shift` (down to subnormal, up to huge block maxima), through [`compare`].
    #[cfg(target_arch = "x86_64")]
    fn check_simd<T: Element>(seed: u64, n: usize, wd: f32, special: u64, shift: i32, block: BlockFn) {
        let k = 2f64.powi(shift) as f32;
        let mut rng = Rng::new(seed);
        let nb = n.div_ceil(BLOCK);
        let p0: Vec<T> = (0..n)
            .map(|_| T::from_f32(value(&mut rng, 0.1, special)))
            .collect();
        let cm0: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
        let cv0: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
        // Block maxima as a step finds them: zero for a quarter of the blocks and, with special lanes,
        // sometimes non-finite (a loaded checkpoint may hold them): a positive NaN reaches the
        // nearest-code search as a positive NaN, an infinite one as 0·inf.
        let mut scale = |s: f32| match rng.below(if special > 0 { 20 } else { 4 }) {
            0 => 0.0,
            1 if special > 0 => f32::NAN,
            2 if special > 0 => f32::INFINITY,
            _ => rng.uniform() * s * k,
        };
        let am0: Vec<f32> = (0..nb).map(|_| scale(0.01)).collect();
        let av0: Vec<f32> = (0..nb).map(|_| scale(1e-4)).collect();
        let grads: Vec<Vec<f32>> = (1..=4)
            .map(|step| {
                let mut g: Vec<f32> = (0..n).map(|_| value(&mut rng, 1e-3, special) * k).collect();
                if step == 2 {
                    // A whole block of zero gradients (and a zero state after step 1 only if the
                    // random state decays to it; the zero gradient still exercises gz = 0).
                    g.iter_mut().take(BLOCK).for_each(|x| *x = 0.0);
                }
                g
            })
            .collect();
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: wd,
            ..Default::default()
        };
        let what = format!("seed {seed} n {n} wd {wd} shift {shift}");
        compare((p0, cm0, cv0, am0, av0), &grads, &cfg, block, &what);
    }

    /// One block of gradients for [`markstein_edges_match_portable`] with β1 = β2 = 0 (so m = g and
    /// v = g·g exactly): the largest |g| is `top`; the other lanes put m/max|m| (`square` false) or
    /// v/max v (`square` true) within 2 ulps of a decision threshold of the map, or at the 2^-41..2^-39
    /// quotients where the exactness argument of [`reciprocal_ok`] changes, or at 0, -0 and subnormals.
    #[cfg(target_arch = "x86_64")]
    fn edge_block(rng: &mut Rng, top: f32, square: bool) -> Vec<f32> {
        let t = tables();
        let thr = crate::quant::cpu::thresholds_8bit(if square { &t.code_v } else { &t.code_m });
        let d = if square {
            top as f64 * top as f64
        } else {
            top as f64
        };
        let lane = |q: f64, sign: f64| -> f32 {
            // The gradient whose m (or v) over the block maximum is q.
            let x = if square {
                (q.abs() * d).sqrt() * sign
            } else {
                q * d
            };
            (x as f32).clamp(-top, top)
        };
        let mut g = vec![top];
        while g.len() < BLOCK {
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            let x = match rng.below(8) {
                0 => lane(2f64.powi(-(39 + rng.below(3) as i32)), sign),
                1 => [0.0, -0.0, f32::from_bits(1), -f32::from_bits(7)][rng.below(4) as usize],
                _ => lane(thr[rng.below(255) as usize] as f64, sign),
            };
            let ulps = rng.below(5) as i32 - 2;
            let x = f32::from_bits(x.to_bits().wrapping_add_signed(ulps));
            g.push(if x.is_finite() && x.abs() <= top { x } else { 0.0 });
        }
        g
    }

    /// The normalizations by the block maxima at the edges of [`reciprocal_ok`] (maxima at, just
    /// below and just above 2^-60 and 2^126, subnormal, huge, infinite, zero), with lanes within 2 ulps
    /// of the maps' decision thresholds: the reciprocal path, where taken, gives the codes of the
    /// division bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn markstein_edges_match_portable() {
        let p2 = |e: i32| 2f64.powi(e) as f32;
        let step = |x: f32, d: i32| f32::from_bits(x.to_bits().wrapping_add_signed(d));
        let mut maxima = vec![0.0, f32::MIN_POSITIVE, 1e-40, f32::MAX, 1e-3, 0.37, 3e-20, 7e30];
        for e in [-60, 126, -59, 125] {
            maxima.extend((-2..=2).map(|d| step(p2(e), d)));
        }
        let cfg = AdamWConfig {
            lr: 1e-3,
            beta1: 0.0,
            beta2: 0.0,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut rng = Rng::new(17);
        let mut grads = vec![Vec::new(); 3];
        for &d in &maxima {
            // m's maximum d; then v's maximum near d (its root as the largest gradient).
            for top in [d, (d as f64).sqrt() as f32] {
                for (square, g) in [false, true].into_iter().zip(&mut grads) {
                    g.extend(edge_block(&mut rng, top, square));
                }
                let square = rng.below(2) == 0;
                grads[2].extend(edge_block(&mut rng, top, square));
            }
        }
        let n = grads[0].len();
        let state = (
            vec![0.5f32; n],
            vec![0; n],
            vec![0; n],
            vec![0.0; n / BLOCK],
            vec![0.0; n / BLOCK],
        );
        for &block in simd_kernels() {
            compare(state.clone(), &grads, &cfg, block, "edges");
        }
    }

    /// Every explicit SIMD block kernel this CPU runs (AVX-512 with and without VBMI, AVX2) against the
    /// portable loop, bit for bit, over several steps: odd
    /// lengths (tails of every size), f32 and half parameters, with and without weight decay, gradients
    /// with NaN/inf/zero/huge/subnormal lanes, all-zero blocks (block maximum 0: the codes of 0/0) and
    /// random codes and block maxima.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_block_kernels_match_portable() {
        if simd_kernels().is_empty() {
            eprintln!("SKIPPED (no AVX2)");
            return;
        }
        eprintln!("{} SIMD block kernels", simd_kernels().len());
        for (seed, &n) in [1, 15, 16, 17, 31, 255, 256, 257, 300, 1000, 4133]
            .iter()
            .enumerate()
        {
            for (wd, special) in [(0.0, 0), (0.01, 3), (0.1, 30)] {
                for &block in simd_kernels() {
                    check_simd::<f32>(seed as u64, n, wd, special, 0, block);
                    check_simd::<bf16>(seed as u64 + 100, n, wd, special, 0, block);
                    check_simd::<f16>(seed as u64 + 200, n, wd, special, 0, block);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    proptest::proptest! {
        /// The SIMD kernels against the portable loop on random lengths (every tail), seeds, weight
        /// decays, rates of special gradients (NaN, inf, zero, huge, subnormal) and scales of state and
        /// gradients (block maxima from subnormal to overflowing, the edges of [`reciprocal_ok`]).
        #[test]
        fn simd_block_kernels_match_portable_prop(
            seed in proptest::prelude::any::<u64>(),
            n in 1usize..700,
            wd in proptest::sample::select(vec![0.0f32, 0.01, 0.1]),
            special in 0u64..50,
            shift in proptest::prop_oneof![proptest::strategy::Just(0i32), -150i32..130],
        ) {
            for &block in simd_kernels() {
                check_simd::<f32>(seed, n, wd, special, shift, block);
                check_simd::<bf16>(seed ^ 1, n, wd, special, shift, block);
            }
        }
    }
}
