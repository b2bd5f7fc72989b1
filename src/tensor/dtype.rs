//! Element types and the [`Element`] trait that ties a Rust type to a [`DType`].

use crate::error::{Error, Result};
use half::{bf16, f16};

/// The element type of a [`crate::Tensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U8,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    /// True for F32, F16 and BF16.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The lowercase name used in files and on the command line (`f32`, `bf16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// The name torch uses (`float32`, `bfloat16`, ...), as in bitsandbytes quant-state JSON.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }

    /// Parses a torch dtype name (`float32`, `float16`, `bfloat16`, ...).
    pub fn from_torch_name(s: &str) -> Result<DType> {
        match s {
            "float32" | "float" => Ok(DType::F32),
            "float16" | "half" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            "uint8" => Ok(DType::U8),
            "int32" => Ok(DType::I32),
            "int64" => Ok(DType::I64),
            _ => Err(Error::invalid(format!("unknown torch dtype {s:?}"))),
        }
    }

    pub(crate) fn expect_float(self, op: &'static str) -> Result<()> {
        if self.is_float() {
            Ok(())
        } else {
            Err(Error::dtype(op, "a float dtype (f32, f16, bf16)", self))
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "u8" | "uint8" => Ok(DType::U8),
            "i32" | "int32" => Ok(DType::I32),
            "i64" | "int64" => Ok(DType::I64),
            _ => Err(Error::invalid(format!(
                "unknown dtype {s:?} (expected f32, f16, bf16, u8, i32 or i64)"
            ))),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust element type that a tensor can hold. Sealed: implemented for f32, f16, bf16, u8, i32, i64.
pub trait Element:
    bytemuck::Pod + Default + Send + Sync + std::fmt::Debug + PartialEq + 'static + sealed::Sealed
{
    const DTYPE: DType;
    /// Lossy conversion to f32 (exact for every float type; integers above 2^24 round).
    fn to_f32(self) -> f32;
    /// Conversion from f32 with round-to-nearest-even for f16/bf16 and saturation for integers.
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, |$x:ident| $to:expr, |$v:ident| $from:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                let $x = self;
                $to
            }
            #[inline(always)]
            fn from_f32($v: f32) -> Self {
                $from
            }
        }
    };
}

element!(f32, F32, |x| x, |v| v);
element!(f16, F16, |x| x.to_f32(), |v| f16::from_f32(v));
element!(bf16, BF16, |x| x.to_f32(), |v| bf16::from_f32(v));
element!(u8, U8, |x| x as f32, |v| v as u8);
element!(i32, I32, |x| x as f32, |v| v as i32);
element!(i64, I64, |x| x as f32, |v| v as i64);
