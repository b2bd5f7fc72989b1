//! The 8-bit blockwise state format of bitsandbytes' optimizers (`bitsandbytes/optim/optimizer.py`,
//! `Optimizer2State.init_state`): blocks of 256 elements, one f32 absmax per block, the first moment
//! coded on `create_dynamic_map(signed=True)` and the second on `create_dynamic_map(signed=False)`
//! (`bitsandbytes/functional.py`), tensors below `min_8bit_size` (4096) elements in f32.

use crate::quant::dynamic_map;

/// Elements per quantization block (bitsandbytes' blockwise optimizers always use 256).
pub const BLOCK: usize = 256;

/// bitsandbytes' `min_8bit_size` default: smaller tensors keep f32 state.
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed=False)` in f32, stored (like the signed map in `quant`)
/// because `torch.linspace` rounds some entries differently from a textbook linspace.
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
static DYNAMIC_MAP_UNSIGNED: [f32; 256] = [
    0.0, 3.2500003e-07, 7.75e-07, 2.1249998e-06, 4.3749997e-06, 6.625e-06, 8.874999e-06, 1.5624999e-05,
    2.6875001e-05, 3.8125e-05, 4.9374998e-05, 6.0625003e-05, 7.1875e-05, 8.312499e-05, 9.4375e-05, 0.000128125,
    0.000184375, 0.00024062501, 0.00029687502, 0.00035312498, 0.00040937503, 0.00046562502, 0.00052187504, 0.000578125,
    0.000634375, 0.00069062505, 0.000746875, 0.0008031251, 0.00085937505, 0.000915625, 0.00097187504, 0.001140625,
    0.001421875, 0.001703125, 0.001984375, 0.002265625, 0.0025468748, 0.002828125, 0.0031093748, 0.0033906251,
    0.003671875, 0.003953125, 0.0042343745, 0.004515625, 0.0047968747, 0.005078125, 0.005359375, 0.0056406246,
    0.005921875, 0.0062031248, 0.006484375, 0.0067656254, 0.0070468746, 0.007328125, 0.0076093744, 0.007890625,
    0.008171875, 0.008453124, 0.008734375, 0.009015624, 0.0092968745, 0.009578126, 0.009859375, 0.010703126,
    0.012109376, 0.013515624, 0.014921876, 0.016328124, 0.017734377, 0.019140625, 0.020546874, 0.021953126,
    0.023359375, 0.024765624, 0.026171876, 0.027578129, 0.028984373, 0.030390626, 0.031796873, 0.033203125,
    0.034609374, 0.036015626, 0.03742188, 0.038828123, 0.040234376, 0.041640624, 0.043046873, 0.044453125,
    0.045859374, 0.047265626, 0.04867187, 0.050078124, 0.051484372, 0.052890625, 0.054296877, 0.05570313,
    0.057109382, 0.058515627, 0.059921872, 0.061328124, 0.06273438, 0.06414063, 0.06554688, 0.06695312,
    0.068359375, 0.06976563, 0.07117188, 0.072578125, 0.07398438, 0.07539063, 0.07679688, 0.07820313,
    0.07960938, 0.081015624, 0.08242188, 0.08382813, 0.085234374, 0.086640626, 0.08804687, 0.08945312,
    0.090859376, 0.09226563, 0.09367188, 0.095078126, 0.09648438, 0.09789063, 0.099296875, 0.103515625,
    0.11054687, 0.11757813, 0.12460937, 0.13164061, 0.13867188, 0.14570314, 0.15273437, 0.15976563,
    0.16679686, 0.17382812, 0.18085939, 0.18789062, 0.19492188, 0.20195311, 0.20898438, 0.21601564,
    0.22304687, 0.23007813, 0.23710936, 0.24414062, 0.25117186, 0.25820312, 0.26523438, 0.2722656,
    0.27929688, 0.28632814, 0.29335937, 0.3003906, 0.30742186, 0.31445312, 0.3214844, 0.32851562,
    0.33554685, 0.3425781, 0.34960938, 0.35664064, 0.36367187, 0.3707031, 0.37773436, 0.38476562,
    0.3917969, 0.39882812, 0.40585935, 0.4128906, 0.41992188, 0.42695314, 0.43398437, 0.4410156,
    0.44804686, 0.45507812, 0.4621094, 0.46914062, 0.47617185, 0.4832031, 0.49023438, 0.4972656,
    0.5042969, 0.5113281, 0.51835936, 0.5253906, 0.5324218, 0.53945315, 0.54648435, 0.5535157,
    0.5605469, 0.56757814, 0.5746094, 0.5816406, 0.5886719, 0.5957031, 0.6027344, 0.60976565,
    0.61679685, 0.6238282, 0.6308594, 0.63789064, 0.6449219, 0.6519531, 0.6589844, 0.6660156,
    0.6730469, 0.68007815, 0.68710935, 0.6941407, 0.7011719, 0.70820314, 0.7152344, 0.7222656,
    0.7292969, 0.7363281, 0.7433594, 0.75039065, 0.75742185, 0.7644532, 0.7714844, 0.7785156,
    0.7855469, 0.7925781, 0.7996094, 0.8066406, 0.8136718, 0.82070315, 0.82773435, 0.8347657,
    0.8417969, 0.8488281, 0.8558594, 0.8628906, 0.8699219, 0.8769531, 0.8839843, 0.89101565,
    0.89804685, 0.9050782, 0.9121094, 0.9191406, 0.9261719, 0.9332031, 0.9402344, 0.9472656,
    0.9542968, 0.96132815, 0.96835935, 0.9753907, 0.9824219, 0.9894531, 0.9964844, 1.0,
];

/// The unsigned 8-bit dynamic map of the second moment (`create_dynamic_map(signed=False)`, f32).
pub fn dynamic_map_unsigned() -> &'static [f32; 256] {
    &DYNAMIC_MAP_UNSIGNED
}

/// Lowest and highest biased f32 exponents with their own rows in [`Lut`]: |x| in [2^-40, 2). Every
/// threshold of both maps has magnitude above 2^-40 (the smallest is ~1.6e-7), so all smaller
/// magnitudes share the code of the lowest row; one row above `E_HI` holds |x| >= 2, inf and NaN.
pub(crate) const E_LO: u32 = 87;
pub(crate) const E_HI: u32 = 127;
/// Mantissa bits of the bucket index: buckets of 2^-7 relative width, narrower than the closest two
/// thresholds of either map (relative spacing >= 0.7%), so each bucket holds at most one threshold
/// (checked when the table is built).
pub(crate) const MANT_BITS: u32 = 7;
const ROWS: usize = (E_HI + 2 - E_LO) as usize;
pub(crate) const PER_SIGN: usize = ROWS << MANT_BITS;
/// Table length: both signs, rounded up to a power of two so that a masked index needs no bounds check
/// (which would stop the loop from vectorizing).
pub(crate) const LEN: usize = (2 * PER_SIGN).next_power_of_two();

/// bitsandbytes' nearest-code search (`dQuantize<0>`, equivalently the count of decision thresholds
/// below `x`) as one bucket lookup and one comparison: the bucket of `x` (sign, exponent, top 7
/// mantissa bits) gives the code at its low end and the one threshold inside it, if any. Two table
/// loads instead of eight dependent ones, so the compiler can vectorize it with gathers. The codes are
/// stored as u32 so that the AVX-512 kernel (`cpu/avx512.rs`) fetches them with a dword gather.
pub(crate) struct Lut {
    base: Box<[u8; LEN]>,
    thr: Box<[f32; LEN]>,
    /// Both in one word for the SIMD kernel (one gather instead of two): bits 0..16 the low 16 bits of
    /// the threshold, 16..24 the code, bit 24 set when the bucket holds a threshold. A threshold shares
    /// its top 16 bits (sign, exponent, 7 mantissa bits) with its bucket, so within the bucket
    /// `x > thr` is a compare of the low 16 bits (reversed for negative values). Buckets of the clamped
    /// lowest and highest rows hold no threshold (checked when the table is built).
    packed: Box<[u32; LEN]>,
}

/// Flag of [`Lut`]'s packed words: the bucket holds a threshold.
pub(crate) const PACKED_HAS_THR: u32 = 1 << 24;

/// [`Lut`]'s packed words over all 2^16 buckets, indexed by the top 16 bits of `x` as they are (sign,
/// exponent, 7 mantissa bits): no clamping and no sign handling before the lookup, and one compare
/// after it, for the AVX2 kernel (`cpu/avx2.rs`, where the operations around each gather are the
/// bottleneck). Bits 16..24 hold the code at the bucket's low end (in value order), bits 0..16 the
/// bucket's threshold `t` in magnitude order within the bucket: `t`'s low 16 bits for a positive
/// bucket, their complement for a negative one, and 0xffff where the bucket holds no threshold, so
/// that `x > t` is `low16(x) ^ (sign(x) ? 0xffff : 0) > word & 0xffff`. The exponent-255 buckets:
/// NaN has code 0 and +inf 255 (the bucket of +inf holds the "threshold" 0, so every NaN in it comes
/// out as 256, which is 0 in a byte), -inf 0. 256 KB per map; a step touches the few rows its block
/// maxima select.
pub(crate) struct Wide(Box<[u32; WIDE_LEN]>);

/// The bucket count of [`Wide`].
pub(crate) const WIDE_LEN: usize = 1 << 16;

impl Wide {
    /// The table of a strictly increasing code from its thresholds; `None` if some bucket holds two
    /// thresholds.
    fn new(thr: &[f32; 256]) -> Option<Wide> {
        let count = |x: f32| crate::quant::cpu::quantize_8bit_fast(thr, x) as u32;
        let mut w = vec![0u32; WIDE_LEN];
        for (top, word) in (0u32..).zip(w.iter_mut()) {
            let negative = top >> 15 == 1;
            let lo = f32::from_bits(top << 16);
            let hi = f32::from_bits((top << 16) | 0xffff);
            *word = if (top >> 7) & 0xff == 0xff {
                // inf (low bits 0) or NaN in the first bucket of each sign, NaN in the others.
                if !negative && top & 127 == 0 {
                    255 << 16
                } else {
                    0xffff
                }
            } else {
                // In value order: a negative bucket runs from its largest magnitude up.
                let (min, max) = if negative { (hi, lo) } else { (lo, hi) };
                let (c_min, c_max) = (count(min), count(max));
                match c_max - c_min {
                    0 => (c_min << 16) | 0xffff,
                    1 => {
                        let t = thr[c_min as usize].to_bits();
                        if t >> 16 != top {
                            return None;
                        }
                        let low = if negative { !t & 0xffff } else { t & 0xffff };
                        (c_min << 16) | low
                    }
                    _ => return None,
                }
            };
        }
        Some(Wide(w.into_boxed_slice().try_into().ok()?))
    }

    /// The words, [`WIDE_LEN`] of them.
    pub(crate) fn words(&self) -> &[u32; WIDE_LEN] {
        &self.0
    }

    /// The code of `x` as the SIMD kernel reads it from the words (tested against the binary search).
    #[cfg(test)]
    fn encode(&self, x: f32) -> u8 {
        let b = x.to_bits();
        let w = self.0[(b >> 16) as usize];
        let lx = (b ^ if b >> 31 == 1 { 0xffff } else { 0 }) & 0xffff;
        ((w >> 16) + (lx > (w & 0xffff)) as u32) as u8
    }
}

#[inline(always)]
fn bucket(x: f32) -> usize {
    let b = x.to_bits();
    let e = ((b >> 23) & 0xff).clamp(E_LO, E_HI + 1);
    let i = (b >> 31) as usize * PER_SIGN
        + ((((e - E_LO) << MANT_BITS) | ((b >> (23 - MANT_BITS)) & 127)) as usize);
    i & (LEN - 1) // i < 2 * PER_SIGN <= LEN already: the mask only tells the compiler
}

impl Lut {
    /// The table of a strictly increasing code, from its thresholds; `None` if some bucket holds two
    /// thresholds (then the binary search must be used).
    fn new(thr: &[f32; 256]) -> Option<Lut> {
        let count = |x: f32| crate::quant::cpu::quantize_8bit_fast(thr, x) as usize;
        let mut lut = Lut {
            base: Box::new([0; LEN]),
            thr: Box::new([f32::INFINITY; LEN]),
            packed: Box::new([0; LEN]),
        };
        for sign in 0..2u32 {
            for row in 0..ROWS as u32 {
                for m in 0..128u32 {
                    let lo_bits = ((row + E_LO) << 23) | (m << (23 - MANT_BITS)); // the magnitude
                    let hi_bits = lo_bits | ((1 << (23 - MANT_BITS)) - 1);
                    let idx = sign as usize * PER_SIGN + ((row << MANT_BITS) | m) as usize;
                    let (mut lo, mut hi) = (f32::from_bits(lo_bits), f32::from_bits(hi_bits));
                    if row == 0 {
                        lo = 0.0; // the lowest row also holds every smaller magnitude, down to 0
                    }
                    if row as usize == ROWS - 1 {
                        hi = f32::INFINITY; // and the highest every larger one
                    }
                    let (min, max) = if sign == 0 { (lo, hi) } else { (-hi, -lo) };
                    let (c_min, c_max) = (count(min), count(max));
                    lut.base[idx] = c_min as u8;
                    lut.packed[idx] = (c_min as u32) << 16;
                    match c_max - c_min {
                        0 => {}
                        1 => {
                            let t = thr[c_min];
                            let top = (sign << 15) | ((row + E_LO) << MANT_BITS) | m;
                            if row == 0 || row as usize == ROWS - 1 || t.to_bits() >> 16 != top {
                                return None;
                            }
                            lut.thr[idx] = t;
                            lut.packed[idx] |= PACKED_HAS_THR | (t.to_bits() & 0xffff);
                        }
                        _ => return None,
                    }
                }
            }
        }
        Some(lut)
    }

    /// The nearest code of `x` (NaN: code 0, like the search).
    #[inline(always)]
    pub(crate) fn encode(&self, x: f32) -> u8 {
        let i = bucket(x);
        let c = self.base[i] + (x > self.thr[i]) as u8;
        if x.is_nan() { 0 } else { c }
    }

    /// [`Lut::encode`] through the packed words, as the SIMD kernel decodes them (tested against the
    /// binary search like `encode`).
    #[cfg(test)]
    fn encode_packed(&self, x: f32) -> u8 {
        let w = self.packed[bucket(x)];
        let (lx, lt) = (x.to_bits() & 0xffff, w & 0xffff);
        let above = if x.is_sign_negative() { lx < lt } else { lx > lt };
        let c = ((w >> 16) & 0xff) as u8 + (w & PACKED_HAS_THR != 0 && above) as u8;
        if x.is_nan() { 0 } else { c }
    }

    /// The packed words, [`LEN`] of them indexed by the bucket, for the SIMD kernel.
    pub(crate) fn packed(&self) -> &[u32; LEN] {
        &self.packed
    }
}

/// Both codes and their nearest-code lookup tables.
pub(crate) struct Tables {
    pub code_m: [f32; 256],
    pub code_v: [f32; 256],
    pub lut_m: Lut,
    pub lut_v: Lut,
    /// The same searches over all 2^16 buckets (for the AVX2 kernel).
    pub wide_m: Wide,
    pub wide_v: Wide,
    /// Number of codes of the signed map with the sign bit set: `code_m[c].is_sign_negative()` is
    /// `c < neg_m` (the map is sorted and holds +0.0, not -0.0; checked when the tables are built).
    pub neg_m: u32,
    /// The maps as byte planes: `planes_m[j][c]` is byte `j` (little-endian) of `code_m[c]`, for the
    /// byte-permute dequantization of the AVX-512 VBMI kernel.
    pub planes_m: [[u8; 256]; 4],
    pub planes_v: [[u8; 256]; 4],
}

/// The byte planes of a 256-entry map (see [`Tables::planes_m`]).
fn planes(code: &[f32; 256]) -> [[u8; 256]; 4] {
    let mut p = [[0u8; 256]; 4];
    for (c, x) in code.iter().enumerate() {
        for (j, b) in x.to_bits().to_le_bytes().into_iter().enumerate() {
            p[j][c] = b;
        }
    }
    p
}

/// The process-wide tables.
pub(crate) fn tables() -> &'static Tables {
    static T: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let lut = |c: &[f32; 256]| {
            Lut::new(&crate::quant::cpu::thresholds_8bit(c)).expect("at most one threshold per bucket")
        };
        let wide = |c: &[f32; 256]| {
            Wide::new(&crate::quant::cpu::thresholds_8bit(c)).expect("at most one threshold per bucket")
        };
        let code_m = *dynamic_map();
        let neg_m = code_m.iter().filter(|c| c.is_sign_negative()).count() as u32;
        assert!(
            (0..256).all(|c| code_m[c].is_sign_negative() == ((c as u32) < neg_m)),
            "the signed dynamic map is sorted"
        );
        Tables {
            code_m,
            code_v: DYNAMIC_MAP_UNSIGNED,
            lut_m: lut(dynamic_map()),
            lut_v: lut(&DYNAMIC_MAP_UNSIGNED),
            wide_m: wide(dynamic_map()),
            wide_v: wide(&DYNAMIC_MAP_UNSIGNED),
            neg_m,
            planes_m: planes(&code_m),
            planes_v: planes(&DYNAMIC_MAP_UNSIGNED),
        }
    })
}

/// Number of absmax blocks of an `n`-element tensor.
pub fn nblocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::cpu::quantize_8bit_ref;
    use crate::rng::Rng;

    /// The bucket lookup against bitsandbytes' binary search: at every bucket edge and its neighbours,
    /// at every midpoint of the map and its neighbours, on random values of every magnitude, and on
    /// the special values.
    #[test]
    fn lut_matches_binary_search() {
        let t = tables();
        for (code, lut, wide) in [(&t.code_m, &t.lut_m, &t.wide_m), (&t.code_v, &t.lut_v, &t.wide_v)] {
            let check = |x: f32| {
                let want = quantize_8bit_ref(code, x);
                assert_eq!(lut.encode(x), want, "x = {x:e} ({:#x})", x.to_bits());
                assert_eq!(wide.encode(x), want, "wide, x = {x:e} ({:#x})", x.to_bits());
                assert_eq!(
                    lut.encode_packed(x),
                    want,
                    "packed, x = {x:e} ({:#x})",
                    x.to_bits()
                )
            };
            let near = |x: f32| {
                for d in -2i32..=2 {
                    check(f32::from_bits(x.to_bits().wrapping_add_signed(d)));
                }
            };
            for sign in 0..2u32 {
                for e in 0..256u32 {
                    for m in 0..128u32 {
                        near(f32::from_bits((sign << 31) | (e << 23) | (m << 16)));
                    }
                }
            }
            for k in 0..255 {
                near((code[k] + code[k + 1]) * 0.5);
                near(code[k]);
            }
            let mut rng = Rng::new(5);
            for _ in 0..200_000 {
                let mag = 2f32.powi(-(rng.below(45) as i32));
                check(rng.uniform_range(-1.0, 1.0) * mag);
            }
            for x in [
                0.0,
                -0.0,
                1.0,
                -1.0,
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
                3.0,
                -3.0,
            ] {
                check(x);
            }
        }
    }
}
