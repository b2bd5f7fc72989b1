//! Fast double quantization of the absmax vector (8-bit dynamic map), byte-identical to
//! [`double_quant_reference`], and its decode.

use super::reference::absmax_mean;
#[cfg(doc)]
use super::reference::{double_quant_reference, quantize_8bit_ref};
use crate::quant::{NESTED_BLOCKSIZE, dynamic_map};
use rayon::prelude::*;

/// The decision thresholds equivalent to `dQuantize<0>` over the dynamic map: the code of `x` is the
/// number of entries strictly below `x`.
///
/// Why this is exact: the search always ends on an even pivot `p` whose in-order neighbours `p - 1`
/// and `p + 1` are the last pivots passed on each side, so `x` lies in `(code[p-1], code[p+1]]` and the
/// midpoint test sends a tie to `p`, the even code. Boundary `k | k+1` is therefore the f32 midpoint
/// `(code[k] + code[k+1]) * 0.5`, crossed by `x > m` for even `k` (ties stay down) and by `x >= m`
/// (that is, `x > prev_float(m)`) for odd `k` (ties go up). NaN compares false everywhere: code 0,
/// as in the search. `tests/nf4.rs` checks the equivalence at every boundary and on random inputs.
fn dynamic_thresholds() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let c = dynamic_map();
        let mut t = [f32::INFINITY; 256];
        for k in 0..255 {
            let m = (c[k] + c[k + 1]) * 0.5;
            t[k] = if k % 2 == 0 {
                m
            } else if m > 0.0 {
                f32::from_bits(m.to_bits() - 1)
            } else {
                f32::from_bits(m.to_bits() + 1)
            };
        }
        t
    })
}

/// `dQuantize<0>` over the dynamic map by a branch-free binary search on [`dynamic_thresholds`].
#[inline(always)]
fn quantize_8bit_fast(t: &[f32; 256], x: f32) -> u8 {
    let mut i = 0usize;
    for step in [128, 64, 32, 16, 8, 4, 2, 1] {
        i += step * (x > t[i + step - 1]) as usize;
    }
    i as u8
}

/// Double quantization (parallel over the 256-blocks; same bytes as [`double_quant_reference`]).
pub fn double_quant(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = absmax_mean(absmax);
    let t = dynamic_thresholds();
    let mut codes = vec![0u8; absmax.len()];
    let nested: Vec<f32> = codes
        .par_chunks_mut(NESTED_BLOCKSIZE * 16)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE * 16))
        .flat_map_iter(|(q, a)| {
            q.chunks_mut(NESTED_BLOCKSIZE)
                .zip(a.chunks(NESTED_BLOCKSIZE))
                .map(|(q, blk)| {
                    let amax2 = blk.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
                    let s = 1.0f32 / amax2;
                    for (q, &a) in q.iter_mut().zip(blk) {
                        *q = quantize_8bit_fast(t, (a - offset) * s);
                    }
                    amax2
                })
                .collect::<Vec<f32>>()
        })
        .collect();
    (codes, nested, offset)
}

/// [`quantize_8bit_ref`]'s fast equivalent, exposed for tests.
pub fn quantize_8bit(x: f32) -> u8 {
    quantize_8bit_fast(dynamic_thresholds(), x)
}

/// `(nested_code[codes[i]] * nested_absmax[i / nested_blocksize]) + offset`, two f32 roundings.
/// Sizes must be consistent (checked by [`crate::quant::double_quant_decode_blocks`]).
pub(crate) fn double_quant_decode(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    nested_code: &[f32],
    nested_blocksize: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; codes.len()];
    out.par_chunks_mut(nested_blocksize)
        .zip(codes.par_chunks(nested_blocksize))
        .zip(nested_absmax.par_iter())
        .for_each(|((o, q), &a2)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = nested_code[q as usize] * a2 + offset;
            }
        });
    out
}
