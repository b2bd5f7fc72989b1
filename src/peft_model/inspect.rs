//! A human-readable summary of a PEFT adapter directory (`peftk inspect-adapter`).

use crate::device::Device;
use crate::error::Result;
use crate::io::peft::{AdapterMethod, CONFIG_NAME, MethodConfig, PeftAdapter, WEIGHTS_NAME};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A human-readable summary of an adapter directory: method, per-module rank / alpha / scaling / shapes /
/// parameters, totals and file sizes.
pub fn inspect_adapter(dir: impl AsRef<Path>) -> Result<String> {
    let dir = dir.as_ref();
    let adapter = PeftAdapter::load(dir, Device::Cpu)?;
    let layout = adapter.layout()?;
    let cfg = &adapter.config;
    let file_size = |p: PathBuf| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored below.
    let _ = writeln!(s, "adapter: {}", dir.display());
    let mut methods: Vec<AdapterMethod> = layout.modules.iter().map(|m| m.method).collect();
    methods.sort();
    methods.dedup();
    let _ = writeln!(
        s,
        "peft_type: {} ({}), peft_version {}",
        cfg.peft_type(),
        methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "),
        cfg.peft_version.as_deref().unwrap_or("unknown")
    );
    if let Some(b) = &cfg.base_model_name_or_path {
        let _ = writeln!(s, "base model: {b}");
    }
    if let Some(t) = &cfg.task_type {
        let _ = writeln!(s, "task type: {t}");
    }
    match &cfg.method {
        MethodConfig::Lora(c) => {
            let _ = writeln!(
                s,
                "r = {}, lora_alpha = {}, {}{}{}, dropout {}, bias {:?}{}",
                c.r,
                c.lora_alpha,
                if c.use_rslora {
                    "rsLoRA (alpha/sqrt(r))"
                } else {
                    "alpha/r"
                },
                if c.rank_pattern.is_empty() {
                    ""
                } else {
                    ", rank_pattern"
                },
                if c.alpha_pattern.is_empty() {
                    ""
                } else {
                    ", alpha_pattern"
                },
                c.lora_dropout,
                cfg.bias,
                if cfg.fan_in_fan_out {
                    ", fan_in_fan_out"
                } else {
                    ""
                }
            );
        }
        MethodConfig::WaveFt(c) => {
            let _ = writeln!(
                s,
                "n_frequency = {}{}, scaling = {}, wavelet {}, idwt {}, seed {}",
                c.n_frequency,
                if c.proportional_parameters {
                    " (proportional)"
                } else {
                    ""
                },
                c.scaling,
                c.wavelet_family,
                c.use_idwt,
                c.random_loc_seed
            );
        }
        MethodConfig::VbLora(c) => {
            let _ = writeln!(
                s,
                "r = {}, bank {} x {}, topk {}{}",
                c.r,
                c.num_vectors,
                c.vector_length,
                c.topk,
                if c.save_only_topk_weights {
                    ", stored as top-k weights"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(s, "modules: {}", layout.modules.len());
    let _ = writeln!(
        s,
        "  {:<48} {:>7} {:>5} {:>8} {:>10} {:>13} {:>10} {:>10}",
        "module", "method", "rank", "alpha", "scaling", "in -> out", "params", "bytes"
    );
    for m in &layout.modules {
        let dims = match (m.in_features, m.out_features, m.n_frequency) {
            (Some(i), Some(o), _) => format!("{i} -> {o}"),
            (_, _, Some(n)) => format!("n = {n}"),
            _ => "?".into(),
        };
        let _ = writeln!(
            s,
            "  {:<48} {:>7} {:>5} {:>8} {:>10.6} {:>13} {:>10} {:>10}",
            m.name,
            m.method.as_str(),
            m.rank.map_or("-".into(), |r| r.to_string()),
            m.alpha.map_or("-".into(), |a| a.to_string()),
            m.scaling,
            dims,
            m.trainable_params,
            m.stored_bytes
        );
    }
    for e in &layout.extras {
        let t = &adapter.tensors[&e.key];
        let _ = writeln!(
            s,
            "  extra {:?}: {} {:?} {} ({} bytes)",
            e.kind,
            e.key,
            t.shape(),
            t.dtype(),
            t.size_in_bytes()
        );
    }
    let _ = writeln!(s, "trainable parameters: {}", adapter.num_trainable_params()?);
    let _ = writeln!(
        s,
        "files: {CONFIG_NAME} {} bytes, {WEIGHTS_NAME} {} bytes",
        file_size(dir.join(CONFIG_NAME)),
        file_size(dir.join(WEIGHTS_NAME))
    );
    let unknown = cfg.unknown_keys();
    if !unknown.is_empty() {
        let _ = writeln!(s, "config keys kept but not interpreted: {}", unknown.join(", "));
    }
    Ok(s)
}
