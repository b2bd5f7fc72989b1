//! Arbitrary bytes as a model directory (`config.json` + `model.safetensors`, see
//! `peft_kernels::models::fuzz_load`): parsed, validated against the config and loaded. Must never panic.
//!
//!     cargo +nightly fuzz run load_model fuzz/corpus/load_model
//!
//! The same entry point runs over the seed corpus and random mutations in `tests/models.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peft_kernels::models::fuzz_load(data);
});
