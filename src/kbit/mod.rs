//! Storage tiers of a frozen base linear beyond bitsandbytes' 4-bit: the bit-widths QR-Adaptor
//! (Zhou et al., arXiv 2505.03802) chooses from per layer.
//!
//! | tier | storage |
//! |---|---|
//! | [`Tier::Bits2`], [`Tier::Bits3`] | k-bit NormalFloat codes, blockwise absmax (optionally double-quantized) |
//! | [`Tier::Bits4`] | bitsandbytes NF4/FP4 ([`crate::quant::QuantizedTensor`]), byte-exact |
//! | [`Tier::Bits8`] | 8-bit blockwise |
//! | [`Tier::Bits16`] | unquantized 16-bit |
//!
//! [`Tier::storage_bytes`] is the byte count the memory model of a search uses; it must equal
//! [`crate::qmatmul::BaseWeight::size_in_bytes`] of the weight the loader builds for that tier.

use crate::error::{Error, Result};
use crate::quant::QuantizeOptions;

/// The bit-width tier of one frozen base linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Tier {
    /// 2-bit NormalFloat.
    Bits2,
    /// 3-bit NormalFloat.
    Bits3,
    /// bitsandbytes 4-bit (the quant type of the load options: NF4 by default).
    Bits4,
    /// 8-bit blockwise.
    Bits8,
    /// Unquantized 16-bit.
    Bits16,
}

impl Tier {
    /// Every tier, narrowest first.
    pub const ALL: [Tier; 5] = [Tier::Bits2, Tier::Bits3, Tier::Bits4, Tier::Bits8, Tier::Bits16];

    /// The nominal bits per weight (2, 3, 4, 8 or 16).
    pub fn bits(self) -> u8 {
        match self {
            Tier::Bits2 => 2,
            Tier::Bits3 => 3,
            Tier::Bits4 => 4,
            Tier::Bits8 => 8,
            Tier::Bits16 => 16,
        }
    }

    /// The tier of `bits`.
    pub fn from_bits(bits: u8) -> Result<Tier> {
        Tier::ALL.into_iter().find(|t| t.bits() == bits).ok_or_else(|| {
            Error::invalid(format!(
                "no storage tier of {bits} bits (expected 2, 3, 4, 8 or 16)"
            ))
        })
    }

    /// Bytes of a `numel`-element weight stored in this tier with `opts`' blocksize and double
    /// quantization: packed codes, plus the scales as [`crate::qmatmul::BaseWeight::size_in_bytes`] counts
    /// them (first-level f32 absmax; or u8 codes + one f32 per 256 blocks + the 256-entry f32 nested code
    /// book). 16-bit: two bytes per element.
    pub fn storage_bytes(self, numel: usize, opts: &QuantizeOptions) -> usize {
        let bits = self.bits() as usize;
        if self == Tier::Bits16 {
            return 2 * numel;
        }
        let codes = (numel * bits).div_ceil(8);
        let nblocks = numel.div_ceil(opts.blocksize.max(1));
        let scales = if opts.double_quant {
            nblocks + 4 * nblocks.div_ceil(256) + 4 * 256
        } else {
            4 * nblocks
        };
        codes + scales
    }
}

impl From<Tier> for u8 {
    fn from(t: Tier) -> u8 {
        t.bits()
    }
}

impl TryFrom<u8> for Tier {
    type Error = Error;
    fn try_from(bits: u8) -> Result<Tier> {
        Tier::from_bits(bits)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bits())
    }
}

impl std::str::FromStr for Tier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Tier> {
        let bits: u8 = s
            .trim()
            .parse()
            .map_err(|_| Error::invalid(format!("bad bit-width {s:?} (expected 2, 3, 4, 8 or 16)")))?;
        Tier::from_bits(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_and_print_their_bits() {
        for t in Tier::ALL {
            assert_eq!(t.to_string().parse::<Tier>().unwrap(), t);
            assert_eq!(Tier::try_from(u8::from(t)).unwrap(), t);
        }
        assert!("5".parse::<Tier>().is_err());
        assert!("x".parse::<Tier>().is_err());
    }

    #[test]
    fn four_bit_bytes_match_the_hand_count() {
        let plain = QuantizeOptions {
            double_quant: false,
            ..Default::default()
        };
        // 384x384 NF4, blocksize 64: 73,728 code bytes + 2,304 blocks x 4 bytes.
        assert_eq!(Tier::Bits4.storage_bytes(384 * 384, &plain), 73_728 + 9_216);
        // Double quant: 2,304 u8 codes + 9 nested f32 + the 1 KiB nested code book.
        assert_eq!(
            Tier::Bits4.storage_bytes(384 * 384, &QuantizeOptions::default()),
            73_728 + 2_304 + 36 + 1_024
        );
        assert_eq!(Tier::Bits16.storage_bytes(10, &plain), 20);
        assert_eq!(Tier::Bits3.storage_bytes(8, &plain), 3 + 4);
    }
}
