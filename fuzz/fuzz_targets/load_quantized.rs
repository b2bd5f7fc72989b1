//! Arbitrary bytes as a safetensors file: every bitsandbytes 4-bit weight in it is loaded (all fields
//! validated) and dequantized. Must never panic.
//!
//!     cargo +nightly fuzz run load_quantized fuzz/corpus/load_quantized
//!
//! The same entry point runs over the seed corpus and random mutations in `tests/nf4.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peft_kernels::quant::io::fuzz_load(data);
});
