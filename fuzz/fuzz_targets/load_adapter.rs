//! Arbitrary bytes as a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`,
//! packed as `peft_kernels::peft_model::fuzz::adapter_input` describes): loaded with every check, inspected,
//! saved and reloaded. Must never panic.
//!
//!     cargo +nightly fuzz run load_adapter fuzz/corpus/load_adapter
//!
//! The same entry point runs over the seed corpus and random mutations in `tests/peft_io.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peft_kernels::peft_model::fuzz::fuzz_load_adapter(data);
});
