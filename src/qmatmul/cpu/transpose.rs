//! Weight-panel transposes for the batch forward path: `dst [cols, rows] = src [rows, cols]ᵀ`.
//!
//! Why: `y = x·Wᵀ` with a row-major `W [out, in]` reaches the `gemm` crate as a product whose packed
//! operand is `W` read across rows, which the crate packs with one scalar load and store per element
//! (`pack_generic_inner_loop`). Measured with one thread on the 2-core AVX-512 dev VM (thread CPU
//! time, best of 20): `[256, 1024]·[1024, 2816]` runs at ~66 GFLOP/s with `W` read transposed and
//! ~100 GFLOP/s with a row-major `[in, out]` operand. Transposing each L2-sized panel first with 8×8
//! AVX tiles (~0.8 ns per weight) and handing `gemm` the `[in, rows]` panel brings it to ~85 GFLOP/s.

/// Elements per side of the cache block the 8×8 tiles walk (a 64×64 f32 block is 16 KiB).
const BLOCK: usize = 64;

/// `dst[c * rows + r] = src[r * ld + c]` for `r < rows`, `c < cols` (`dst` is `[cols, rows]`).
///
/// Panics (a caller bug, never input-dependent) if the slices are too short.
pub(super) fn transpose(src: &[f32], ld: usize, rows: usize, cols: usize, dst: &mut [f32]) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ld >= cols && src.len() >= (rows - 1) * ld + cols && dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    let avx = super::Isa::get() != super::Isa::Scalar;
    #[cfg(not(target_arch = "x86_64"))]
    let avx = false;
    let (rows8, cols8) = if avx { (rows / 8 * 8, cols / 8 * 8) } else { (0, 0) };
    for r0 in (0..rows8).step_by(BLOCK) {
        for c0 in (0..cols8).step_by(BLOCK) {
            for r in (r0..(r0 + BLOCK).min(rows8)).step_by(8) {
                for c in (c0..(c0 + BLOCK).min(cols8)).step_by(8) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX was detected (Isa is Avx2 or Avx512, both imply AVX). The tile reads
                    // src rows r..r+8, columns c..c+8 (r + 8 <= rows, c + 8 <= cols, checked by the
                    // assert above) and writes dst rows c..c+8, columns r..r+8, all in bounds.
                    unsafe {
                        tile8_avx(
                            src.as_ptr().add(r * ld + c),
                            ld,
                            dst.as_mut_ptr().add(c * rows + r),
                            rows,
                        )
                    };
                }
            }
        }
    }
    // The ragged right columns of the tiled rows, then the ragged bottom rows.
    for r in 0..rows8 {
        for c in cols8..cols {
            dst[c * rows + r] = src[r * ld + c];
        }
    }
    for r in rows8..rows {
        for (c, &v) in src[r * ld..r * ld + cols].iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

/// One 8×8 tile: rows `src + i·ld` (i < 8) become rows `dst + j·ldd` (j < 8).
///
/// # Safety
/// AVX must be available; the 8 rows of 8 f32 at `src` (stride `ld`) and at `dst` (stride `ldd`) must
/// be in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn tile8_avx(src: *const f32, ld: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the 8×8 source and destination tiles are in bounds.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ld)));
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        for (j, v) in out.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(j * ldd), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn matches_the_definition_on_ragged_shapes() {
        for (rows, cols, ld) in [
            (1, 1, 1),
            (8, 8, 8),
            (13, 29, 31),
            (64, 72, 72),
            (67, 130, 133),
            (200, 9, 9),
        ] {
            let src: Vec<f32> = (0..rows * ld).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, ld, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * ld + c],
                        "{rows}x{cols} ld {ld} at ({r}, {c})"
                    );
                }
            }
        }
    }
}
