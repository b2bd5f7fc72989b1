//! Inverted dropout on the CPU: element `i` is kept when [`dropout_hash`]`(seed, i)` (a SplitMix64
//! finalizer, the same function as `kernels/tensor.cu`) is at least the threshold `p·2^32`, and kept
//! elements are scaled by `1/(1-p)`. The portable loop is the oracle; the SIMD loops give the same
//! bits.
//!
//! Napkin math: the hash is three 64-bit multiplies and three xor-shifts per element, the data 8 bytes
//! (f32 in and out). A LoRA training step draws one mask per adapted linear in forward and again in
//! backward (it is regenerated, not stored): on a Llama-shaped step (hidden 1024, 8 layers, 256
//! tokens) about 37M hashes. x86-64 without AVX-512DQ has no 64-bit vector multiply (`vpmullq`), so the
//! compiler leaves the portable loop scalar: 1.80 ns per element on one Zen 3 core. The AVX2 loop below
//! forms each 64-bit product from three 32x32 `vpmuludq` and steps the `(i + 1)·golden` term by
//! addition, so one multiply of the three disappears: 0.77 ns per element (min of 300 runs of 64k f32,
//! pinned core; `docs/results/llama_step.md`).

use super::cpu::CHUNK;
use super::{Element, dropout_hash};
use rayon::prelude::*;

/// [`dropout`](super::Tensor::dropout) of a slice (the mask of element `i` is `dropout_hash(seed, i)`).
pub(crate) fn dropout_slice<T: Element>(v: &[T], threshold: u64, scale: f32, seed: u64) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    out.par_chunks_mut(CHUNK)
        .zip(v.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let base = (c * CHUNK) as u64;
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU has AVX-512F/DQ (checked just above).
                    unsafe { chunk_avx512(o, x, base, threshold, scale, seed) };
                    return;
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    unsafe { avx2::chunk(o, x, base, threshold, scale, seed) };
                    return;
                }
            }
            chunk(o, x, base, threshold, scale, seed);
        });
    out
}

/// One chunk of [`dropout_slice`]: element `j` uses hash index `base + j`.
#[inline(always)]
fn chunk<T: Element>(o: &mut [T], x: &[T], base: u64, threshold: u64, scale: f32, seed: u64) {
    for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
        let keep = dropout_hash(seed, base.wrapping_add(j as u64)) as u64 >= threshold;
        *o = T::from_f32(if keep { x.to_f32() * scale } else { 0.0 });
    }
}

/// [`chunk`] compiled for AVX-512 (the hash's 64-bit multiplies vectorize with `vpmullq`, which the
/// baseline x86-64 target lacks; same bits as the portable loop).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn chunk_avx512<T: Element>(o: &mut [T], x: &[T], base: u64, threshold: u64, scale: f32, seed: u64) {
    chunk(o, x, base, threshold, scale, seed)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Element;
    use crate::tensor::{DType, HASH_GOLDEN as GOLDEN, HASH_M1 as M1, HASH_M2 as M2};
    use std::arch::x86_64::*;

    /// `z · m` (wrapping) in each 64-bit lane from 32x32 products: `lo·lo + ((lo·hi + hi·lo) << 32)`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mul64(z: __m256i, m: u64) -> __m256i {
        let m_lo = _mm256_set1_epi64x(m as i64);
        let m_hi = _mm256_set1_epi64x((m >> 32) as i64);
        let ll = _mm256_mul_epu32(z, m_lo);
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(z, m_hi),
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(z), m_lo),
        );
        _mm256_add_epi64(ll, _mm256_slli_epi64::<32>(cross))
    }

    /// The finalizer of [`dropout_hash`](crate::tensor::dropout_hash) on 4 counters `z`, as a drop
    /// mask: all ones in the lanes whose top 32 bits fall below `thr` (both below 2^33, so the signed
    /// compare orders them).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn drop4(z: __m256i, thr: __m256i) -> __m256i {
        let z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64::<30>(z)), M1);
        let z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64::<27>(z)), M2);
        let h = _mm256_srli_epi64::<32>(_mm256_xor_si256(z, _mm256_srli_epi64::<31>(z)));
        _mm256_cmpgt_epi64(thr, h)
    }

    /// [`super::chunk`] on 8 elements per step; the last `len % 8` go through the portable loop.
    #[target_feature(enable = "avx2")]
    pub(super) fn chunk<T: Element>(o: &mut [T], x: &[T], base: u64, threshold: u64, scale: f32, seed: u64) {
        let n = o.len().min(x.len());
        let whole = n - n % 8;
        // Counters seed + (i + 1)·golden of lanes 0-3 and 4-7, stepped by 8·golden.
        let z0 = seed.wrapping_add(base.wrapping_add(1).wrapping_mul(GOLDEN));
        let lane = |k: u64| z0.wrapping_add(k.wrapping_mul(GOLDEN)) as i64;
        let mut za = _mm256_setr_epi64x(lane(0), lane(1), lane(2), lane(3));
        let mut zb = _mm256_setr_epi64x(lane(4), lane(5), lane(6), lane(7));
        let step = _mm256_set1_epi64x(GOLDEN.wrapping_mul(8) as i64);
        // A threshold of 2^32 (p = 1) drops everything; it still fits the signed compare.
        let thr = _mm256_set1_epi64x(threshold.min(1 << 32) as i64);
        let vscale = _mm256_set1_ps(scale);
        for (o, x) in o[..whole].chunks_exact_mut(8).zip(x[..whole].chunks_exact(8)) {
            let (da, db) = (drop4(za, thr), drop4(zb, thr));
            za = _mm256_add_epi64(za, step);
            zb = _mm256_add_epi64(zb, step);
            // The low dword of each 64-bit mask lane, in element order.
            let d = _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(
                _mm256_castsi256_ps(da),
                _mm256_castsi256_ps(db),
            ));
            let d = _mm256_permute4x64_epi64::<0b11_01_10_00>(d);
            if T::DTYPE == DType::F32 {
                let (o, x): (&mut [f32], &[f32]) = (bytemuck::cast_slice_mut(o), bytemuck::cast_slice(x));
                // SAFETY: `x` and `o` hold 8 f32 each (`chunks_exact(8)`); unaligned load and store.
                unsafe {
                    let y = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr()), vscale);
                    _mm256_storeu_ps(o.as_mut_ptr(), _mm256_andnot_ps(_mm256_castsi256_ps(d), y));
                }
            } else {
                let mut drop = [0i32; 8];
                // SAFETY: `drop` is 8 i32 = 32 bytes; unaligned store.
                unsafe { _mm256_storeu_si256(drop.as_mut_ptr() as *mut __m256i, d) };
                for ((o, &x), &d) in o.iter_mut().zip(x).zip(&drop) {
                    *o = T::from_f32(if d == 0 { x.to_f32() * scale } else { 0.0 });
                }
            }
        }
        super::chunk(
            &mut o[whole..n],
            &x[whole..n],
            base.wrapping_add(whole as u64),
            threshold,
            scale,
            seed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// splitmix-style test values: a spread of magnitudes, both signs, NaN, inf and zeros.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let h = dropout_hash(seed ^ 0x5555, i);
                match h % 17 {
                    0 => f32::NAN,
                    1 => f32::INFINITY * if h & 32 == 0 { 1.0 } else { -1.0 },
                    2 => -0.0,
                    3 => f32::MAX,
                    _ => f32::from_bits((h & 0x807f_ffff) | ((h % 60 + 100) << 23)),
                }
            })
            .collect()
    }

    fn same<T: Element>(a: &[T], b: &[T]) -> bool {
        bytemuck::cast_slice::<T, u8>(a) == bytemuck::cast_slice::<T, u8>(b)
    }

    fn check<T: Element>(n: usize, base: u64, threshold: u64, seed: u64) {
        let x: Vec<T> = values(n, seed).into_iter().map(T::from_f32).collect();
        let scale = 1.0 / (1.0 - (threshold.min(u32::MAX as u64) as f32) / 4_294_967_296.0);
        let mut want = vec![T::from_f32(7.0); n];
        chunk(&mut want, &x, base, threshold, scale, seed);
        let mut got = vec![T::from_f32(7.0); n];
        // SAFETY: only called after the feature check below.
        unsafe { avx2::chunk(&mut got, &x, base, threshold, scale, seed) };
        assert!(
            same(&got, &want),
            "{:?} n={n} base={base:#x} threshold={threshold} seed={seed:#x}",
            T::DTYPE
        );
    }

    /// The AVX2 loop against the portable one, bit for bit: every length up to 70 (whole groups and
    /// tails), counters that wrap around 2^64, thresholds at both ends (keep all, drop all) and in
    /// between, specials among the inputs, and all three float types.
    #[test]
    fn avx2_matches_portable() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIPPED (no AVX2)");
            return;
        }
        let thresholds = [0u64, 1, 214_748_365, 1 << 31, u32::MAX as u64, 1 << 32];
        let bases = [0u64, 8, 32_768, u64::MAX - 20, 0x1234_5678_9abc];
        let seeds = [0u64, 1, 1234, u64::MAX, 0xdead_beef_f00d];
        for n in 0..=70 {
            for (k, &threshold) in thresholds.iter().enumerate() {
                let base = bases[(n + k) % bases.len()];
                let seed = seeds[(n * 3 + k) % seeds.len()];
                check::<f32>(n, base, threshold, seed);
                check::<bf16>(n, base, threshold, seed);
                check::<f16>(n, base, threshold, seed);
            }
        }
        // A long run: the counter steps over many groups.
        check::<f32>(CHUNK + 13, 5 * CHUNK as u64, 1 << 30, 99);
    }

    /// The dispatching slice function against the per-element hash (chunk bases included).
    #[test]
    fn slice_matches_hash() {
        let n = 2 * CHUNK + 37;
        let x = values(n, 3);
        let threshold = 429_496_730; // p = 0.1
        let y = dropout_slice(&x, threshold, 1.25, 77);
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
            let want = if dropout_hash(77, i as u64) as u64 >= threshold {
                a * 1.25
            } else {
                0.0
            };
            assert_eq!(b.to_bits(), want.to_bits(), "index {i}");
        }
    }
}
