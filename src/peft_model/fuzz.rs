//! Fuzzing entry point for the PEFT adapter loader, which takes two files (the single-file 4-bit loader
//! has its own, `quant::io::fuzz_load`).

use crate::device::Device;
use crate::io::peft::{CONFIG_NAME, PeftAdapter, WEIGHTS_NAME};
use crate::peft_model::inspect::inspect_adapter;

/// Packs an adapter directory into one fuzz input: the config's length (u32, little-endian), the
/// `adapter_config.json` bytes, then the `adapter_model.safetensors` bytes.
pub fn adapter_input(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + config.len() + weights.len());
    v.extend_from_slice(&(config.len() as u32).to_le_bytes());
    v.extend_from_slice(config);
    v.extend_from_slice(weights);
    v
}

/// The inverse of [`adapter_input`], total on any bytes (a too-large length takes what is there).
pub fn split_adapter_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return (data, &[]);
    };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    rest.split_at(n)
}

/// Writes the two files of `data` (see [`adapter_input`]) into a fresh temp directory and loads it as a
/// PEFT adapter, then exercises everything a loaded adapter offers to a user: its layout, module list,
/// parameter count, the `inspect` report, and a save + reload. Returns 1 if the adapter loaded, 2 if it
/// also saved and reloaded, 0 otherwise. Never panics, whatever the bytes.
pub fn fuzz_load_adapter(data: &[u8]) -> usize {
    let (config, weights) = split_adapter_input(data);
    let Ok(dir) = tempfile::tempdir() else {
        return 0;
    };
    if std::fs::write(dir.path().join(CONFIG_NAME), config).is_err()
        || std::fs::write(dir.path().join(WEIGHTS_NAME), weights).is_err()
    {
        return 0;
    }
    let Ok(adapter) = PeftAdapter::load(dir.path(), Device::Cpu) else {
        return 0;
    };
    let _ = adapter.layout();
    let _ = adapter.modules();
    let _ = adapter.num_trainable_params();
    let _ = inspect_adapter(dir.path());
    let again = dir.path().join("saved");
    if std::fs::create_dir(&again).is_ok()
        && adapter.save(&again).is_ok()
        && PeftAdapter::load(&again, Device::Cpu).is_ok()
    {
        return 2;
    }
    1
}
