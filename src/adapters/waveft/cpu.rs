//! CPU kernels of WaveFT's sparse adapter path (also the oracles of `kernels/waveft.cu`).
//!
//! Layout trick: tokens are processed in blocks of `TB = 16` (one 64-byte vector of f32). For each block
//! the operand is transposed into a panel `[dim][16]` held in L2 (4096 x 64 B = 256 KB), so every
//! nonzero of ΔW costs one aligned 16-lane load and one 16-lane multiply-add, and the result panel is
//! transposed back into the row-major output. Every element of x, dy, y and dx is read or written once,
//! which is the floor for this op, as for a dense LoRA product.
//!
//! Napkin math (4096x4096 layer, T = 512 tokens, n = 5000 Haar coefficients, nnz ≈ 4n = 20k):
//! - forward: 2·T·nnz = 20 MFLOP (vs 2·T·in·r + 2·T·r·out = 134 MFLOP for LoRA r=16);
//!   bytes: x (8 MB) + y (8 MB) = 16 MB, same as LoRA; per block 20k gathers from a 256 KB L2 panel.
//! - backward: SDDMM G[p] = Σ_t dy[t,row_p]·x[t,col_p] (2·T·nnz) and dx = dy·ΔW (2·T·nnz);
//!   bytes: x + dy read, dx written = 24 MB. dspectrum = scaling·Sᵀ·G is O(entries).
//!
//! So both passes are memory bound at about one read of the activations, like LoRA's, and need no dense
//! out×in buffer (PEFT builds two: the padded coefficient grid and ΔW, 2 x 64 MB here, every step).
//!
//! Determinism: the spectrum gradient is reduced over a fixed partition of the token blocks (at most
//! `MAX_PARTS`, independent of the thread count), then summed in f64 in partition order.

use super::structure::HostStructure;
use crate::tensor::Element;
use rayon::prelude::*;

/// Tokens per block: one 512-bit vector of f32.
pub(crate) const TB: usize = 16;
type Lane = [f32; TB];

/// Upper bound on backward partitions (each holds an nnz-long partial gradient)...
const MAX_PARTS: usize = 64;
/// ...and on the memory of all partial gradients together (a layer with millions of coefficients gets
/// fewer partitions). Both bounds depend only on the shapes, so results do not depend on the machine.
const PARTS_BYTES: usize = 64 << 20;

/// value[p] = scaling · Σ w · spectrum[coef] for every position, in row order and in column order.
pub(crate) fn synthesize(h: &HostStructure, spectrum: &[f32], scaling: f32) -> (Vec<f32>, Vec<f32>) {
    let nnz = h.nnz();
    let mut v_row = vec![0f32; nnz];
    for (p, v) in v_row.iter_mut().enumerate() {
        let mut acc = 0f32;
        for e in h.syn_ptr[p] as usize..h.syn_ptr[p + 1] as usize {
            acc += h.syn_w[e] * spectrum[h.syn_coef[e] as usize];
        }
        *v = scaling * acc;
    }
    let v_col = h.col_perm.iter().map(|&p| v_row[p as usize]).collect();
    (v_row, v_col)
}

/// dspectrum[k] = scaling · Σ w · G[pos] (the adjoint of [`synthesize`]).
pub(crate) fn analyze(h: &HostStructure, g: &[f32], scaling: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| {
            let mut acc = 0f32;
            for e in h.ana_ptr[k] as usize..h.ana_ptr[k + 1] as usize {
                acc += h.ana_w[e] * g[h.ana_pos[e] as usize];
            }
            scaling * acc
        })
        .collect()
}

#[inline(always)]
fn hsum(v: &Lane) -> f32 {
    // Pairwise tree (vectorizes as halving adds).
    let mut a = [0f32; 8];
    for i in 0..8 {
        a[i] = v[i] + v[i + 8];
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// out[j][t] = tile[t][j] for a 16x16 tile.
#[inline(always)]
fn transpose16(isa: Isa, tile: &[Lane; TB], out: &mut [Lane; TB]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: AVX2 was detected at run time (`isa()`); both arrays are 16x16.
        unsafe { transpose16_avx2(tile, out) };
        return;
    }
    let _ = isa;
    for (j, o) in out.iter_mut().enumerate() {
        for t in 0..TB {
            o[t] = tile[t][j];
        }
    }
}

/// The four 8x8 quarters through the qmatmul panels' 8x8 AVX transpose.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose16_avx2(tile: &[Lane; TB], out: &mut [Lane; TB]) {
    let (src, dst) = (tile.as_ptr() as *const f32, out.as_mut_ptr() as *mut f32);
    for br in 0..2 {
        for bc in 0..2 {
            // SAFETY: both arrays are 16 contiguous rows of 16 f32 (stride TB); the quarter at rows
            // 8·br.., columns 8·bc.. of `tile` and rows 8·bc.., columns 8·br.. of `out` are in bounds,
            // and AVX is implied by AVX2, which the caller detected.
            unsafe {
                crate::qmatmul::cpu::tile8_avx(
                    src.add(8 * br * TB + 8 * bc),
                    TB,
                    dst.add(8 * bc * TB + 8 * br),
                    TB,
                )
            };
        }
    }
}

/// panel[c][t] = src[t·dim + c] for the `tb` rows of `src` (the other lanes are zero).
/// Full 16-column tiles use fixed-size copies (inlined vector moves, no memcpy calls).
#[inline(always)]
fn load_panel<T: Element>(isa: Isa, src: &[T], tb: usize, dim: usize, panel: &mut [Lane]) {
    let mut tile = [[0f32; TB]; TB];
    let full = dim / TB * TB;
    for c0 in (0..full).step_by(TB) {
        for (t, row) in tile.iter_mut().enumerate() {
            if t < tb {
                let s: &[T; TB] = src[t * dim + c0..t * dim + c0 + TB]
                    .try_into()
                    .expect("16 elements");
                *row = s.map(|v| v.to_f32());
            } else {
                *row = [0.0; TB];
            }
        }
        let out: &mut [Lane; TB] = (&mut panel[c0..c0 + TB]).try_into().expect("16 lanes");
        transpose16(isa, &tile, out);
    }
    if full < dim {
        let w = dim - full;
        for (t, row) in tile.iter_mut().enumerate() {
            *row = [0.0; TB];
            if t < tb {
                for (o, v) in row.iter_mut().zip(&src[t * dim + full..t * dim + dim]) {
                    *o = v.to_f32();
                }
            }
        }
        let mut tmp = [[0f32; TB]; TB];
        transpose16(isa, &tile, &mut tmp);
        for (p, t) in panel[full..full + w].iter_mut().zip(&tmp) {
            *p = *t;
        }
    }
}

/// dst[t·dim + c] (+)= panel[c][t] for the `tb` rows of `dst`.
#[inline(always)]
fn store_panel<T: Element>(isa: Isa, panel: &[Lane], tb: usize, dim: usize, dst: &mut [T], accumulate: bool) {
    let mut tile = [[0f32; TB]; TB];
    let mut src = [[0f32; TB]; TB];
    for c0 in (0..dim).step_by(TB) {
        let w = TB.min(dim - c0);
        let lanes: &[Lane; TB] = if w == TB {
            panel[c0..c0 + TB].try_into().expect("16 lanes")
        } else {
            for (s, p) in src.iter_mut().zip(&panel[c0..c0 + w]) {
                *s = *p;
            }
            &src
        };
        transpose16(isa, lanes, &mut tile);
        for (t, row) in tile.iter().enumerate().take(tb) {
            let d = &mut dst[t * dim + c0..t * dim + c0 + w];
            if accumulate {
                for (o, &v) in d.iter_mut().zip(row) {
                    *o = T::from_f32(o.to_f32() + v);
                }
            } else {
                for (o, &v) in d.iter_mut().zip(row) {
                    *o = T::from_f32(v);
                }
            }
        }
    }
}

/// out_panel[r] = Σ_{p in ptr[r]..ptr[r+1]} vals[p] · in_panel[idx[p]].
#[inline(always)]
fn spmm_panel(in_panel: &[Lane], ptr: &[i32], idx: &[i32], vals: &[f32], out_panel: &mut [Lane]) {
    for (r, o) in out_panel.iter_mut().enumerate() {
        let mut acc = [0f32; TB];
        for p in ptr[r] as usize..ptr[r + 1] as usize {
            let v = vals[p];
            let x = &in_panel[idx[p] as usize];
            for t in 0..TB {
                acc[t] += v * x[t];
            }
        }
        *o = acc;
    }
}

/// g[p] += Σ_t dy_panel[row_p][t] · x_panel[col_p][t].
#[inline(always)]
fn sddmm_panel(dy_panel: &[Lane], x_panel: &[Lane], row_ptr: &[i32], pos_col: &[i32], g: &mut [f32]) {
    for (r, d) in dy_panel.iter().enumerate() {
        for p in row_ptr[r] as usize..row_ptr[r + 1] as usize {
            let x = &x_panel[pos_col[p] as usize];
            let mut s = [0f32; TB];
            for t in 0..TB {
                s[t] = d[t] * x[t];
            }
            g[p] += hsum(&s);
        }
    }
}

/// Sparse product over one token block: y_blk (+)= x_blk · Mᵀ, M given as CSR over y's columns.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn spmm_block<T: Element>(
    isa: Isa,
    x_blk: &[T],
    k_dim: usize,
    ptr: &[i32],
    idx: &[i32],
    vals: &[f32],
    y_blk: &mut [T],
    n_dim: usize,
    accumulate: bool,
    xp: &mut [Lane],
    yp: &mut [Lane],
) {
    let tb = y_blk.len() / n_dim;
    load_panel(isa, x_blk, tb, k_dim, xp);
    spmm_panel(xp, ptr, idx, vals, yp);
    store_panel(isa, yp, tb, n_dim, y_blk, accumulate);
}

/// Backward over one token block: partial G for every position, and the dx block if asked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_block<T: Element>(
    isa: Isa,
    x_blk: &[T],
    dy_blk: &[T],
    inp: usize,
    out: usize,
    h: &HostStructure,
    v_col: &[f32],
    dx_blk: Option<(&mut [T], bool)>,
    xp: &mut [Lane],
    dyp: &mut [Lane],
    g: &mut [f32],
) {
    let tb = dy_blk.len() / out;
    load_panel(isa, x_blk, tb, inp, xp);
    load_panel(isa, dy_blk, tb, out, dyp);
    sddmm_panel(dyp, xp, &h.row_ptr, &h.pos_col, g);
    if let Some((dx_blk, accumulate)) = dx_blk {
        // x's panel is no longer needed: reuse it for dx.
        spmm_panel(dyp, &h.col_ptr, &h.col_row, v_col, xp);
        store_panel(isa, xp, tb, inp, dx_blk, accumulate);
    }
}

// ---------------------------------------------------------------- ISA dispatch
//
// The panel loops are written over [f32; 16] and rely on auto-vectorization; the crate is built for
// baseline x86-64 (SSE2), so the block functions are compiled three times and picked at run time.
// No FMA contraction is used, so every variant computes bit-identical results.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Base,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx2") {
                Isa::Avx2
            } else {
                Isa::Base
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Base
    }
}

// AVX2 (256-bit) rather than AVX-512: the kernels are bound by memory traffic, AVX2 machines are the
// common denominator, and AVX-512 intrinsics would need Rust 1.89 (the crate's MSRV is 1.85).
macro_rules! dispatch {
    ($name:ident, $generic:ident, ($($arg:ident : $ty:ty),* $(,)?)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Element>(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<T: Element>($($arg: $ty),*) { $generic::<T>(Isa::Avx2, $($arg),*) }
                if isa == Isa::Avx2 {
                    // SAFETY: AVX2 was detected at run time by `isa()` before this variant is selected.
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            $generic::<T>(isa, $($arg),*)
        }
    };
}

dispatch!(spmm_block_isa, spmm_block, (
    x_blk: &[T], k_dim: usize, ptr: &[i32], idx: &[i32], vals: &[f32], y_blk: &mut [T], n_dim: usize,
    accumulate: bool, xp: &mut [Lane], yp: &mut [Lane],
));

dispatch!(backward_block_isa, backward_block, (
    x_blk: &[T], dy_blk: &[T], inp: usize, out: usize, h: &HostStructure, v_col: &[f32],
    dx_blk: Option<(&mut [T], bool)>, xp: &mut [Lane], dyp: &mut [Lane], g: &mut [f32],
));

/// Per-thread panels, kept between calls: a fresh 256 KB zeroed allocation per block is an mmap plus
/// 64 page faults, which cost more than the kernel itself.
fn with_panels<R>(a: usize, b: usize, f: impl FnOnce(&mut [Lane], &mut [Lane]) -> R) -> R {
    thread_local! {
        static PANELS: std::cell::RefCell<(Vec<Lane>, Vec<Lane>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    PANELS.with(|p| {
        // A panel is fully rewritten before it is read, so stale contents do not matter. A reentrant
        // call (not possible here: kernels do not nest) would fall back to fresh buffers.
        match p.try_borrow_mut() {
            Ok(mut p) => {
                let (pa, pb) = &mut *p;
                if pa.len() < a {
                    pa.resize(a, [0.0; TB]);
                }
                if pb.len() < b {
                    pb.resize(b, [0.0; TB]);
                }
                f(&mut pa[..a], &mut pb[..b])
            }
            Err(_) => f(&mut vec![[0.0; TB]; a], &mut vec![[0.0; TB]; b]),
        }
    })
}

// ---------------------------------------------------------------- entry points

/// y[t, r] (+)= Σ_{p in ptr[r]..ptr[r+1]} vals[p] · x[t, idx[p]] for row-major x `[tokens, k_dim]` and
/// y `[tokens, n_dim]`: the forward `x·ΔWᵀ` (CSR by ΔW row) and dx = `dy·ΔW` (CSR by ΔW column).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spmm<T: Element>(
    x: &[T],
    k_dim: usize,
    ptr: &[i32],
    idx: &[i32],
    vals: &[f32],
    y: &mut [T],
    n_dim: usize,
    accumulate: bool,
) {
    if y.is_empty() || n_dim == 0 {
        return;
    }
    let isa = isa();
    y.par_chunks_mut(TB * n_dim)
        .zip(x.par_chunks(TB * k_dim.max(1)))
        .for_each(|(y_blk, x_blk)| {
            with_panels(k_dim, n_dim, |xp, yp| {
                spmm_block_isa::<T>(
                    isa, x_blk, k_dim, ptr, idx, vals, y_blk, n_dim, accumulate, xp, yp,
                )
            })
        });
}

/// The backward pass over all tokens: returns G (the gradient of ΔW at every position, f32) and
/// writes dx (`(dx, accumulate)`) when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    x: &[T],
    dy: &[T],
    tokens: usize,
    inp: usize,
    out: usize,
    h: &HostStructure,
    v_col: &[f32],
    dx: Option<(&mut [T], bool)>,
) -> Vec<f32> {
    let nnz = h.nnz();
    if tokens == 0 || out == 0 || inp == 0 {
        return vec![0.0; nnz];
    }
    let isa = isa();
    let nblocks = tokens.div_ceil(TB);
    let parts = MAX_PARTS
        .min(nblocks)
        .min((PARTS_BYTES / (4 * nnz.max(1))).max(1));
    let per_part = nblocks.div_ceil(parts);
    let part_tokens = per_part * TB;
    let x_parts: Vec<&[T]> = x.chunks(part_tokens * inp).collect();
    let dy_parts: Vec<&[T]> = dy.chunks(part_tokens * out).collect();
    let run = |(i, dx_part): (usize, Option<(&mut [T], bool)>)| -> Vec<f32> {
        let mut g = vec![0f32; nnz];
        let mut dx_chunks = dx_part.map(|(d, acc)| (d.chunks_mut(TB * inp), acc));
        with_panels(inp, out, |xp, dyp| {
            for (x_blk, dy_blk) in x_parts[i].chunks(TB * inp).zip(dy_parts[i].chunks(TB * out)) {
                let dx_blk = match &mut dx_chunks {
                    Some((it, acc)) => it.next().map(|d| (d, *acc)),
                    None => None,
                };
                backward_block_isa::<T>(isa, x_blk, dy_blk, inp, out, h, v_col, dx_blk, xp, dyp, &mut g);
            }
        });
        g
    };
    let partials: Vec<Vec<f32>> = match dx {
        Some((dx, acc)) => dx
            .par_chunks_mut(part_tokens * inp)
            .enumerate()
            .map(|(i, d)| run((i, Some((d, acc)))))
            .collect(),
        None => (0..x_parts.len())
            .into_par_iter()
            .map(|i| run((i, None)))
            .collect(),
    };
    let mut acc = vec![0f64; nnz];
    for g in &partials {
        for (a, &v) in acc.iter_mut().zip(g) {
            *a += v as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_agree() {
        let mut tile = [[0f32; TB]; TB];
        for (t, row) in tile.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (t * 100 + j) as f32;
            }
        }
        let mut a = [[0f32; TB]; TB];
        let mut b = [[0f32; TB]; TB];
        transpose16(Isa::Base, &tile, &mut a);
        transpose16(isa(), &tile, &mut b);
        for j in 0..TB {
            for t in 0..TB {
                assert_eq!(a[j][t], tile[t][j]);
            }
        }
        assert_eq!(a, b, "{:?}", isa());
    }
}
