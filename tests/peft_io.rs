//! PEFT adapter files and merging, against fixtures written by HF PEFT 0.21.2 (tests/fixtures/gen_peft.py):
//! config resolution equals PEFT's per-module r / alpha / scaling and target matching, LoRA merges and
//! forwards equal PEFT's within 1e-5, DoRA fixtures are self-consistent with the closed form, save/load
//! round trips are byte-identical to PEFT's files, malformed inputs give clear errors, and the merge CLI
//! writes PEFT's merged weights or nothing.
//!
//! With `PEFT_KERNELS_WRITE_ROUNDTRIP=DIR`, `roundtrip_export` also writes the adapters it saves to DIR for
//! `tests/fixtures/check_peft_roundtrip.py DIR` (PEFT loading our files; CI has no Python).

mod common;

use peft_kernels::adapters::vblora::{vblora_compress_topk, vblora_expand_topk};
use peft_kernels::adapters::waveft::proportional_n_frequency;
use peft_kernels::io::peft::{
    AdapterConfig, AdapterMethod, CONFIG_NAME, ExtraKind, InitLoraWeights, LoraConfig, MethodConfig,
    ModuleNames, OneOrMany, Part, PatternMap, PeftAdapter, PeftType, TargetModules, VBLORA_BANK_KEY,
    VbLoraConfig, WEIGHTS_NAME, WaveFtConfig, module_key, vblora_index_dtype,
};
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::peft_model::inspect::inspect_adapter;
use peft_kernels::peft_model::load::to_file_form;
use peft_kernels::peft_model::merge::{
    MergeMethod, MergeOptions, MergeRegistry, lora_delta, merge_dora, merge_into_file, merge_lora,
};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;
use safetensors::Dtype as StDtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CASES: [&str; 6] = [
    "lora",
    "lora_bias_all",
    "rslora_patterns",
    "dora",
    "dora_nf4",
    "lora_fan_in_fan_out",
];
/// Cases whose base is dense: their merged.safetensors is an exact dense merge (dora_nf4's is PEFT's
/// re-quantized one; see `merge_on_nf4_base*`).
const DENSE_CASES: [&str; 5] = [
    "lora",
    "lora_bias_all",
    "rslora_patterns",
    "dora",
    "lora_fan_in_fan_out",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join(case)
}

fn expected(case: &str) -> Value {
    let text = std::fs::read_to_string(case_dir(case).join("expected_layers.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn st(case: &str, file: &str) -> SafetensorsFile {
    SafetensorsFile::open(case_dir(case).join(file)).unwrap()
}

fn vals(f: &SafetensorsFile, name: &str) -> Vec<f32> {
    f.load(name, Device::Cpu).unwrap().to_vec_f32().unwrap()
}

/// `|a - e| <= 1e-5·|e| + 1e-6·max|e|` everywhere; returns the worst relative error (vs max|e|).
#[track_caller]
fn close(actual: &[f32], expect: &[f32], what: &str) -> f32 {
    assert_eq!(actual.len(), expect.len(), "{what}: length");
    let scale = expect
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let mut worst = 0f32;
    for (i, (&a, &e)) in actual.iter().zip(expect).enumerate() {
        let err = (a - e).abs();
        assert!(
            err <= 1e-5 * e.abs() + 1e-6 * scale && a.is_finite(),
            "{what}[{i}]: got {a}, expected {e} (err {err})"
        );
        worst = worst.max(err / scale);
    }
    worst
}

fn load(case: &str) -> PeftAdapter {
    PeftAdapter::load(case_dir(case).join("adapter"), Device::Cpu).unwrap()
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn err_string<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// =============================================================================================== config

#[test]
fn fixture_config_resolution_matches_peft() {
    for case in CASES {
        let exp = expected(case);
        let a = load(case);
        let cfg = &a.config;
        let layers = exp["layers"].as_object().unwrap();
        let modules = a.modules().unwrap();
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        let want: Vec<&str> = layers.keys().map(String::as_str).collect();
        assert_eq!(names, want, "{case}: adapted modules");
        for m in &modules {
            let e = &layers[&m.name];
            let r = e["r"].as_u64().unwrap() as usize;
            let alpha = e["alpha"].as_f64().unwrap();
            let scaling = e["scaling"].as_f64().unwrap();
            assert_eq!(cfg.rank_for(&m.name), Some(r), "{case} {}: r", m.name);
            assert_eq!(cfg.alpha_for(&m.name), Some(alpha), "{case} {}: alpha", m.name);
            let s = cfg.scaling_for(&m.name);
            assert!(
                (s - scaling).abs() <= 1e-15 * scaling,
                "{case} {}: scaling {s} vs {scaling}",
                m.name
            );
            assert_eq!(m.rank, Some(r));
            assert_eq!(m.scaling, s);
            assert_eq!(m.in_features, Some(e["in_features"].as_u64().unwrap() as usize));
            assert_eq!(m.out_features, Some(e["out_features"].as_u64().unwrap() as usize));
            assert_eq!(m.fan_in_fan_out, e["fan_in_fan_out"].as_bool().unwrap());
            assert_eq!(m.lora_bias, e["lora_bias"].as_bool().unwrap());
            let dora = e["use_dora"].as_bool().unwrap();
            assert_eq!(
                m.method,
                if dora {
                    AdapterMethod::Dora
                } else {
                    AdapterMethod::Lora
                }
            );
            // Shapes as PEFT stores them.
            let (i, o) = (m.in_features.unwrap(), m.out_features.unwrap());
            assert_eq!(a.module_tensor(&m.name, Part::LoraA).unwrap().shape(), [r, i]);
            assert_eq!(a.module_tensor(&m.name, Part::LoraB).unwrap().shape(), [o, r]);
            if dora {
                assert_eq!(a.module_tensor(&m.name, Part::Magnitude).unwrap().shape(), [o]);
            }
        }
        // targets() against every module of the base model, PEFT's matching included.
        let linear: Vec<&str> = exp["linear_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let targeted: Vec<&str> = exp["targeted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for v in exp["all_modules"].as_array().unwrap() {
            let n = v.as_str().unwrap();
            assert_eq!(
                cfg.targets(n, linear.contains(&n)),
                targeted.contains(&n),
                "{case}: targets({n:?})"
            );
        }
        assert_eq!(
            a.num_trainable_params().unwrap(),
            exp["trainable_params"].as_u64().unwrap() as usize,
            "{case}: trainable parameters (PEFT's get_nb_trainable_parameters)"
        );
    }
}

#[test]
fn fresh_configs_are_written_like_peft() {
    let dir = fixtures().join("configs");
    let read = |n: &str| std::fs::read_to_string(dir.join(format!("{n}.json"))).unwrap();

    let mut lora = LoraConfig::default();
    let mut cfg = AdapterConfig::new(MethodConfig::Lora(lora.clone()));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
    assert_eq!(cfg.to_json_string().unwrap(), read("lora_default"));

    lora.r = 16;
    lora.lora_alpha = 22.627416997969522;
    lora.use_rslora = true;
    lora.use_dora = true;
    lora.rank_pattern.insert("v_proj", 4).unwrap();
    lora.rank_pattern.insert(r"^model\.layers\.0\..*", 2).unwrap();
    lora.alpha_pattern.insert("v_proj", 1.5).unwrap();
    lora.lora_dropout = 0.05;
    lora.init_lora_weights = InitLoraWeights::Named("gaussian".into());
    let mut cfg = AdapterConfig::new(MethodConfig::Lora(lora));
    cfg.target_modules = Some(TargetModules::Regex(
        peft_kernels::io::peft::ModuleRegex::new(r".*\.(q|v)_proj").unwrap(),
    ));
    cfg.exclude_modules = Some(ModuleNames::Names(vec!["lm_head".into()]));
    cfg.task_type = Some("CAUSAL_LM".into());
    cfg.base_model_name_or_path = Some("org/model".into());
    cfg.modules_to_save = Some(vec!["score".into()]);
    assert_eq!(cfg.to_json_string().unwrap(), read("lora_full"));

    let mut cfg = AdapterConfig::new(MethodConfig::WaveFt(WaveFtConfig::default()));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
    assert_eq!(cfg.to_json_string().unwrap(), read("waveft_default"));
    let mut w = WaveFtConfig {
        n_frequency: 100,
        scaling: 12.5,
        wavelet_family: "sym2".into(),
        use_idwt: false,
        random_loc_seed: 42,
        ..Default::default()
    };
    w.n_frequency_pattern.insert("layers.1.c_attn", 50).unwrap();
    let mut cfg = AdapterConfig::new(MethodConfig::WaveFt(w));
    cfg.target_modules = Some(TargetModules::Names(vec!["c_attn".into()]));
    cfg.layers_to_transform = Some(OneOrMany::Many(vec![0, 1]));
    cfg.layers_pattern = Some(OneOrMany::One("layers".into()));
    cfg.bias = "waveft_only".into();
    assert_eq!(cfg.to_json_string().unwrap(), read("waveft_full"));

    let mut cfg = AdapterConfig::new(MethodConfig::VbLora(VbLoraConfig::default()));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
    assert_eq!(cfg.to_json_string().unwrap(), read("vblora_default"));
    let mut cfg = AdapterConfig::new(MethodConfig::VbLora(VbLoraConfig {
        r: 2,
        num_vectors: 300,
        vector_length: 2,
        topk: 3,
        save_only_topk_weights: true,
        vblora_dropout: 0.1,
        init_vector_bank_bound: 0.5,
        init_logits_std: 1e-5,
    }));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
    cfg.layers_to_transform = Some(OneOrMany::One(3));
    assert_eq!(cfg.to_json_string().unwrap(), read("vblora_full"));

    // And every PEFT-written config parses back to the same thing and is rewritten byte for byte.
    for n in [
        "lora_default",
        "lora_full",
        "waveft_default",
        "waveft_full",
        "vblora_default",
        "vblora_full",
    ] {
        let text = read(n);
        let c = AdapterConfig::from_json_str(&text).unwrap();
        assert_eq!(c.to_json_string().unwrap(), text, "{n}");
        assert!(c.unknown_keys().is_empty(), "{n}: {:?}", c.unknown_keys());
    }
}

#[test]
fn config_defaults_and_unknown_keys() {
    let c = AdapterConfig::from_json_str(r#"{"peft_type": "LORA", "target_modules": ["q"]}"#).unwrap();
    let l = c.lora().unwrap();
    assert_eq!(
        (l.r, l.lora_alpha, l.use_dora, l.use_rslora, l.lora_bias),
        (8, 8.0, false, false, false)
    );
    assert_eq!(c.scaling_for("x.q"), 1.0);
    assert_eq!(c.bias, "none");
    // Written back with all of PEFT's keys, and equal to PEFT's output for the same config.
    let peft = std::fs::read_to_string(fixtures().join("configs/lora_default.json")).unwrap();
    let ours = c.to_json_string().unwrap();
    assert_eq!(ours.replace("\"q\"", "\"q_proj\""), peft);

    // Unknown keys survive; unchanged values keep their spelling; changed ones are rewritten.
    let text =
        r#"{"peft_type": "LORA", "lora_alpha": 16.0, "r": 4, "future_key": {"b": [1, 2.50], "a": null}}"#;
    let mut c = AdapterConfig::from_json_str(text).unwrap();
    assert_eq!(c.unknown_keys(), vec!["future_key"]);
    let out = c.to_json_string().unwrap();
    assert!(
        out.contains("\"future_key\": {\n    \"a\": null,\n    \"b\": [\n      1,\n      2.5\n    ]\n  }"),
        "{out}"
    );
    assert!(out.contains("\"lora_alpha\": 16.0,"), "{out}");
    if let MethodConfig::Lora(l) = &mut c.method {
        l.lora_alpha = 32.0;
        l.r = 16;
    }
    let out = c.to_json_string().unwrap();
    assert!(
        out.contains("\"lora_alpha\": 32,") && out.contains("\"r\": 16,"),
        "{out}"
    );
    let again = AdapterConfig::from_json_str(&out).unwrap();
    assert_eq!(
        again,
        AdapterConfig::from_json_str(&again.to_json_string().unwrap()).unwrap()
    );
    assert_eq!(again.to_json_string().unwrap(), out);
}

#[test]
fn config_errors_are_clear() {
    let cases: &[(&str, &str)] = &[
        ("{", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (r#"{"r": 8}"#, "missing `peft_type`"),
        (r#"{"peft_type": "ADALORA"}"#, "unsupported peft_type \"ADALORA\""),
        (
            r#"{"peft_type": "LORA", "r": "8"}"#,
            "r must be a non-negative integer",
        ),
        (
            r#"{"peft_type": "LORA", "r": 0}"#,
            "`r` should be a positive integer",
        ),
        (
            r#"{"peft_type": "LORA", "rank_pattern": {"q": 2.5}}"#,
            "rank_pattern[\"q\"]",
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": "(?<=x)q"}"#,
            "look-around",
        ),
        (
            r#"{"peft_type": "LORA", "target_modules": "q", "layers_to_transform": 1}"#,
            "layers_to_transform",
        ),
        (
            r#"{"peft_type": "LORA", "layers_pattern": "h"}"#,
            "layers_to_transform` must also be specified",
        ),
        (r#"{"peft_type": "LORA", "bias": "vblora_only"}"#, "bias must be"),
        (
            r#"{"peft_type": "LORA", "lora_bias": true, "use_dora": true}"#,
            "not supported for DoRA",
        ),
        (
            r#"{"peft_type": "LORA", "task_type": "CHAT"}"#,
            "invalid task_type",
        ),
        (
            r#"{"peft_type": "WAVEFT", "wavelet_family": "db99"}"#,
            "wavelet family",
        ),
        (
            r#"{"peft_type": "VBLORA", "topk": 5, "num_vectors": 4}"#,
            "topk (5) cannot exceed",
        ),
        (
            r#"{"peft_type": "LORA", "use_dora": "yes"}"#,
            "use_dora must be true or false",
        ),
    ];
    for (text, want) in cases {
        let e = err_string(AdapterConfig::from_json_str(text));
        assert!(e.contains(want), "{text}: {e:?} should contain {want:?}");
        assert!(e.contains(CONFIG_NAME), "{text}: {e:?} should name the file");
    }
}

#[test]
fn pattern_resolution_follows_get_pattern_key() {
    let mut l = LoraConfig::default();
    // First match in order wins; keys are regexes matched at a '.' boundary, anchored at the end.
    l.rank_pattern.insert(r"^layers\.1\..*k_proj", 3).unwrap();
    l.rank_pattern.insert("k_proj", 5).unwrap();
    l.rank_pattern.insert("layers.0.self_attn.q_proj", 2).unwrap();
    l.alpha_pattern.insert("q_proj", 16.0).unwrap();
    l.use_rslora = true;
    let c = AdapterConfig::new(MethodConfig::Lora(l));
    assert_eq!(c.rank_for("layers.1.self_attn.k_proj"), Some(3));
    assert_eq!(c.rank_for("layers.0.self_attn.k_proj"), Some(5));
    assert_eq!(
        c.rank_for("model.layers.1.self_attn.k_proj"),
        Some(5),
        "^ anchors at the name start"
    );
    assert_eq!(c.rank_for("layers.0.self_attn.q_proj"), Some(2));
    assert_eq!(
        c.rank_for("xlayers.0.self_attn.q_proj"),
        Some(8),
        "must start at a '.' boundary"
    );
    assert_eq!(c.rank_for("layers.0.self_attn.xk_proj"), Some(8));
    assert_eq!(
        c.rank_for("layers.0.self_attn.k_proj.sub"),
        Some(8),
        "anchored at the end"
    );
    assert_eq!(c.alpha_for("layers.0.self_attn.q_proj"), Some(16.0));
    assert_eq!(c.scaling_for("layers.0.self_attn.q_proj"), 16.0 / 2f64.sqrt());
    assert_eq!(c.scaling_for("other"), 8.0 / 8f64.sqrt());

    let mut p = PatternMap::new();
    p.insert("a|b", 1usize).unwrap(); // the key is wrapped in a group: (.*\.)?(a|b)$
    assert_eq!(p.get("x.b"), Some(&1));
    assert_eq!(p.get("x.ab"), None);
    assert!(p.insert("(", 2).is_err());
}

#[test]
fn target_matching_follows_check_target_module_exists() {
    let base = |t: TargetModules| {
        let mut c = AdapterConfig::new(MethodConfig::Lora(LoraConfig::default()));
        c.target_modules = Some(t);
        c
    };
    let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());

    let mut c = base(names(&["q_proj", "model.embed"]));
    assert!(c.targets("model.layers.0.q_proj", true));
    assert!(c.targets("q_proj", true));
    assert!(!c.targets("model.layers.0.xq_proj", true));
    assert!(!c.targets("model.layers.0.q_proj.lora", true));
    assert!(
        c.targets("model.embed", false),
        "list matching ignores the module kind"
    );
    // layers_to_transform: first numbered segment (or the one after layers_pattern).
    c.layers_to_transform = Some(OneOrMany::One(1));
    assert!(c.targets("model.layers.1.q_proj", true));
    assert!(!c.targets("model.layers.0.q_proj", true));
    assert!(!c.targets("q_proj.x", true));
    assert!(
        c.targets("q_proj", true),
        "an exact list entry bypasses layers_to_transform"
    );
    c.layers_to_transform = Some(OneOrMany::Many(vec![0, 2]));
    assert!(c.targets("model.layers.2.q_proj", true));
    assert!(!c.targets("model.layers.1.q_proj", true));
    assert!(
        c.targets("model.layers.0.experts.1.q_proj", true),
        "the first index is the layer"
    );
    c.layers_to_transform = Some(OneOrMany::Many(vec![]));
    assert!(
        c.targets("model.layers.1.q_proj", true),
        "an empty list means all layers"
    );
    c.layers_to_transform = Some(OneOrMany::One(3));
    c.layers_pattern = Some(OneOrMany::Many(vec!["blocks".into(), "h".into()]));
    assert!(c.targets("transformer.h.3.q_proj", true));
    assert!(c.targets("blocks.3.q_proj", true));
    assert!(!c.targets("encoder.3.h.1.q_proj", true));
    c.layers_pattern = Some(OneOrMany::One(String::new()));
    assert!(
        c.targets("encoder.x.3.q_proj", true),
        "an empty layers_pattern means any"
    );
    c.layers_pattern = None;
    c.layers_to_transform = None;
    // exclude_modules and modules_to_save win over targets.
    c.exclude_modules = Some(ModuleNames::Names(vec!["layers.1.q_proj".into()]));
    assert!(!c.targets("model.layers.1.q_proj", true));
    assert!(c.targets("model.layers.11.q_proj", true));
    c.exclude_modules = Some(ModuleNames::Regex(
        peft_kernels::io::peft::ModuleRegex::new(r".*\.1\..*").unwrap(),
    ));
    assert!(!c.targets("model.layers.1.q_proj", true));
    c.exclude_modules = None;
    c.modules_to_save = Some(vec!["layers.0".into()]);
    assert!(
        !c.targets("model.layers.0.q_proj", true),
        "inside a modules_to_save module"
    );
    assert!(c.targets("model.layers.01.q_proj", true));

    let c = base(TargetModules::Regex(
        peft_kernels::io::peft::ModuleRegex::new(r".*\.(q|v)_proj").unwrap(),
    ));
    assert!(c.targets("a.q_proj", true));
    assert!(!c.targets("a.q_proj.b", true), "regex is a full match");
    assert!(!c.targets("q_proj", true));

    let c = base(TargetModules::AllLinear);
    assert!(c.targets("anything.dense", true));
    assert!(!c.targets("lm_head", false));
    let parsed =
        AdapterConfig::from_json_str(r#"{"peft_type": "LORA", "target_modules": "ALL-LINEAR"}"#).unwrap();
    assert_eq!(parsed.target_modules, Some(TargetModules::AllLinear));

    let mut c = base(names(&["q"]));
    c.target_modules = None;
    assert!(
        !c.targets("q", true),
        "null target_modules: architecture defaults are unknown"
    );
}

/// PEFT's own answers (tests/fixtures/peft/configs/matching.json, from `check_target_module_exists` and
/// `get_pattern_key`) on tricky names: suffixes, layer indices, layers_pattern forms, exclusions,
/// modules_to_save, regexes, pattern order.
#[test]
fn matching_agrees_with_peft() {
    let text = std::fs::read_to_string(fixtures().join("configs/matching.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for case in v["targets"].as_array().unwrap() {
        let mut obj = case["config"].as_object().unwrap().clone();
        obj.insert("peft_type".into(), Value::String("LORA".into()));
        let cfg = AdapterConfig::from_json_str(&Value::Object(obj).to_string()).unwrap();
        for (key, want) in case["targets"].as_object().unwrap() {
            assert_eq!(
                cfg.targets(key, true),
                want.as_bool().unwrap(),
                "{}: {key}",
                case["config"]
            );
            checked += 1;
        }
    }
    for case in v["patterns"].as_array().unwrap() {
        let pairs: Vec<String> = case["pattern"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| format!("{}: {}", kv[0], kv[1]))
            .collect();
        let text = format!(
            r#"{{"peft_type": "LORA", "r": 8, "rank_pattern": {{{}}}}}"#,
            pairs.join(", ")
        );
        let cfg = AdapterConfig::from_json_str(&text).unwrap();
        for (name, want) in case["resolved"].as_object().unwrap() {
            let want = want.as_u64().map_or(8, |r| r as usize);
            assert_eq!(cfg.rank_for(name), Some(want), "{text}: {name}");
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked}");
}

#[test]
fn waveft_n_frequency_resolution() {
    let mut w = WaveFtConfig {
        n_frequency: 9,
        ..Default::default()
    };
    w.n_frequency_pattern.insert("b", 4).unwrap();
    let mut c = AdapterConfig::new(MethodConfig::WaveFt(w));
    assert_eq!(c.n_frequency_for("x.a"), Some(9));
    assert_eq!(c.n_frequency_for("x.b"), Some(4));
    assert_eq!(c.scaling_for("x.a"), 25.0);
    assert_eq!(c.rank_for("x.a"), None);
    if let MethodConfig::WaveFt(w) = &mut c.method {
        w.proportional_parameters = true;
    }
    assert_eq!(c.n_frequency_for("x.a"), None);
    // PEFT's own allocation for these layers (tests/fixtures/peft/configs/waveft_proportional.json).
    let text = std::fs::read_to_string(fixtures().join("configs/waveft_proportional.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let layers: Vec<(String, usize, usize)> = v["layers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, d)| {
            (
                k.clone(),
                d[0].as_u64().unwrap() as usize,
                d[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let budget = c.waveft().unwrap().n_frequency;
    let cells: Vec<(usize, usize)> = layers.iter().map(|(_, i, o)| (*o, *i)).collect();
    let got = proportional_n_frequency(budget, &cells).unwrap();
    for ((name, _, _), n) in layers.iter().zip(got) {
        assert_eq!(n as u64, v["allocation"][&name].as_u64().unwrap(), "{name}");
    }
    assert!(proportional_n_frequency(budget, &[]).is_err());
}

// =============================================================================================== files

#[test]
fn save_load_round_trip_is_byte_identical() {
    for case in CASES {
        let src = case_dir(case).join("adapter");
        let a = load(case);
        let dir = tmpdir();
        a.save(dir.path()).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            assert_eq!(
                std::fs::read(dir.path().join(f)).unwrap(),
                std::fs::read(src.join(f)).unwrap(),
                "{case}: {f} differs from PEFT's"
            );
        }
        let b = PeftAdapter::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(a.config, b.config);
        assert_eq!(
            a.tensors.keys().collect::<Vec<_>>(),
            b.tensors.keys().collect::<Vec<_>>()
        );
        for (k, t) in &a.tensors {
            assert_eq!(
                t.to_bytes().unwrap(),
                b.tensors[k].to_bytes().unwrap(),
                "{case}: {k}"
            );
        }
    }
}

/// A synthetic VB-LoRA adapter on the fixtures' TinyLM (q_proj 12->12, up_proj 12->20; L = 2).
fn vblora_adapter(num_vectors: usize, topk_form: bool) -> PeftAdapter {
    let (r, l, k) = (2usize, 2usize, 3usize);
    let mut cfg = AdapterConfig::new(MethodConfig::VbLora(VbLoraConfig {
        r,
        num_vectors,
        vector_length: l,
        topk: k,
        save_only_topk_weights: topk_form,
        ..Default::default()
    }));
    cfg.target_modules = Some(TargetModules::Names(vec![
        "layers.0.self_attn.q_proj".into(),
        "layers.1.mlp.up_proj".into(),
    ]));
    let mut tensors = BTreeMap::new();
    tensors.insert(
        VBLORA_BANK_KEY.to_string(),
        Tensor::rand(&[num_vectors, l], -0.5, 0.5, 1, DType::F32, Device::Cpu).unwrap(),
    );
    let mut seed = 10;
    for (m, i, o) in [
        ("layers.0.self_attn.q_proj", 12, 12),
        ("layers.1.mlp.up_proj", 12, 20),
    ] {
        for (suffix, shape) in [
            ("vblora_logits_A", [r, i / l, num_vectors]),
            ("vblora_logits_B", [o / l, r, num_vectors]),
        ] {
            seed += 1;
            tensors.insert(
                module_key(m, suffix),
                Tensor::randn(&shape, 1.0, seed, DType::F32, Device::Cpu).unwrap(),
            );
        }
    }
    PeftAdapter { config: cfg, tensors }
}

#[test]
fn vblora_topk_files_follow_peft() {
    for (nv, want) in [(200, StDtype::U8), (300, StDtype::I16), (40000, StDtype::I32)] {
        assert_eq!(vblora_index_dtype(nv), want);
        let full = vblora_adapter(nv, true);
        let dir = tmpdir();
        // Saved as is, full logits contradict save_only_topk_weights; to_file_form converts them as PEFT
        // does on save.
        assert!(full.save(dir.path()).is_err());
        to_file_form(full.clone()).unwrap().save(dir.path()).unwrap();
        let f = SafetensorsFile::open(dir.path().join(WEIGHTS_NAME)).unwrap();
        let key = module_key("layers.0.self_attn.q_proj", "vblora_logits_A_topk_indices");
        let (dt, shape, _) = f.raw(&key).unwrap();
        assert_eq!((dt, shape), (want, vec![2, 6, 3]), "num_vectors {nv}");
        let wkey = module_key("layers.0.self_attn.q_proj", "vblora_logits_A_topk_weights");
        assert_eq!(f.raw(&wkey).unwrap().1, vec![2, 6, 2]);
        let loaded = PeftAdapter::load(dir.path(), Device::Cpu).unwrap();
        let idx = &loaded.tensors[&key];
        assert!(matches!(idx.dtype(), DType::U8 | DType::I32), "{:?}", idx.dtype());
        // Loaded top-k expands to logits whose softmax equals the softmax over the original top k.
        let logits = &full.tensors[&module_key("layers.0.self_attn.q_proj", "vblora_logits_A")];
        let expanded = vblora_expand_topk(idx, &loaded.tensors[&wkey], nv).unwrap();
        assert_eq!(expanded.shape(), [2, 6, nv]);
        let (lv, ev) = (logits.to_vec_f32().unwrap(), expanded.to_vec_f32().unwrap());
        for (row_l, row_e) in lv.chunks(nv).zip(ev.chunks(nv)) {
            let mut order: Vec<usize> = (0..nv).collect();
            order.sort_by(|&a, &b| row_l[b].total_cmp(&row_l[a]));
            let top = &order[..3];
            let max = row_l[top[0]];
            let z: f32 = top.iter().map(|&i| (row_l[i] - max).exp()).sum();
            for (j, &v) in row_e.iter().enumerate() {
                if top.contains(&j) {
                    let want = ((row_l[j] - max).exp() / z).ln();
                    assert!((v - want).abs() < 1e-5, "{v} vs {want}");
                } else {
                    assert_eq!(v, f32::NEG_INFINITY);
                }
            }
        }
        // Saving the loaded adapter again is byte-identical (int16 written back as int16).
        let dir2 = tmpdir();
        loaded.save(dir2.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(WEIGHTS_NAME)).unwrap(),
            std::fs::read(dir2.path().join(WEIGHTS_NAME)).unwrap()
        );
        let m = loaded.modules().unwrap();
        assert_eq!(m[0].method, AdapterMethod::VbLora);
        assert_eq!(
            (m[0].in_features, m[0].out_features, m[0].rank),
            (Some(12), Some(12), Some(2))
        );
        assert_eq!(m[0].trainable_params, (2 * 6 + 6 * 2) * nv);
        assert_eq!(
            loaded.num_trainable_params().unwrap(),
            (2 * 6 + 6 * 2 + 2 * 6 + 10 * 2) * nv + 2 * nv
        );
    }
    // Index out of range is rejected.
    let mut a = to_file_form(vblora_adapter(300, true)).unwrap();
    let saved = tmpdir();
    a.save(saved.path()).unwrap();
    a = PeftAdapter::load(saved.path(), Device::Cpu).unwrap();
    let key = module_key("layers.1.mlp.up_proj", "vblora_logits_B_topk_indices");
    a.tensors.insert(
        key.clone(),
        Tensor::full(&[10, 2, 3], 0.0, DType::F32, Device::Cpu).unwrap(),
    );
    assert!(err_string(a.layout()).contains("integer dtype"));
    a.tensors.insert(
        key,
        Tensor::from_vec(vec![300i64; 60], &[10, 2, 3], Device::Cpu).unwrap(),
    );
    assert!(err_string(a.layout()).contains("outside [0, num_vectors = 300)"));
}

#[test]
fn vblora_compress_expand_round_trip() {
    let logits = Tensor::from_vec(
        vec![0.5f32, 3.0, -1.0, 3.0, 2.0, 1.0, 1.0, 1.0],
        &[2, 4],
        Device::Cpu,
    )
    .unwrap();
    let (i, w) = vblora_compress_topk(&logits, 2).unwrap();
    // Ties are broken exactly as torch.topk does on the CPU (an unstable partial sort): torch 2.15 returns
    // [[1, 3], [0, 2]] for these logits, not the lowest tied index.
    assert_eq!(i.to_vec::<i64>().unwrap(), vec![1, 3, 0, 2]);
    let wv = w.to_vec::<f32>().unwrap();
    assert!((wv[0] - 0.5).abs() < 1e-7 && (wv[1] - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    let e = vblora_expand_topk(&i, &w, 4).unwrap().to_vec::<f32>().unwrap();
    assert!(e[0].is_infinite() && e[2].is_infinite() && (e[1] - 0.5f32.ln()).abs() < 1e-6);
    assert!(vblora_compress_topk(&logits, 5).is_err());
    assert!(vblora_expand_topk(&i, &i, 4).is_err());
}

#[test]
fn waveft_adapters_validate_against_the_config() {
    let mut w = WaveFtConfig {
        n_frequency: 8,
        ..Default::default()
    };
    w.n_frequency_pattern.insert("v_proj", 5).unwrap();
    let mut cfg = AdapterConfig::new(MethodConfig::WaveFt(w));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    let mut tensors = BTreeMap::new();
    for (m, n) in [("layers.0.self_attn.q_proj", 8), ("layers.0.self_attn.v_proj", 5)] {
        tensors.insert(
            module_key(m, "waveft_spectrum"),
            Tensor::randn(&[n], 0.01, n as u64, DType::F32, Device::Cpu).unwrap(),
        );
    }
    let mut a = PeftAdapter { config: cfg, tensors };
    let dir = tmpdir();
    a.save(dir.path()).unwrap();
    let b = PeftAdapter::load(dir.path(), Device::Cpu).unwrap();
    let m = b.modules().unwrap();
    assert_eq!(
        m.iter().map(|m| m.n_frequency).collect::<Vec<_>>(),
        vec![Some(8), Some(5)]
    );
    assert_eq!(m[0].scaling, 25.0);
    assert_eq!(b.num_trainable_params().unwrap(), 13);
    a.tensors.insert(
        module_key("layers.0.self_attn.v_proj", "waveft_spectrum"),
        Tensor::zeros(&[8], DType::F32, Device::Cpu).unwrap(),
    );
    assert!(err_string(a.layout()).contains("n_frequency = 5"));
    // A LoRA tensor in a WaveFT adapter.
    a.tensors.insert(
        module_key("layers.0.self_attn.v_proj", "lora_A.weight"),
        Tensor::zeros(&[2, 2], DType::F32, Device::Cpu).unwrap(),
    );
    assert!(err_string(a.layout()).contains("is a LORA tensor but the config's peft_type is WAVEFT"));
}

/// Copies the `lora` fixture adapter to a temp dir with tensors changed by `edit`.
fn edited_lora(edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tmpdir();
    copy_dir(&case_dir("lora").join("adapter"), dir.path());
    let mut a = load("lora");
    edit(&mut a.tensors);
    let list: Vec<(String, TensorBytes)> = a
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), TensorBytes::from_tensor(t).unwrap()))
        .collect();
    write_safetensors(dir.path().join(WEIGHTS_NAME), &list, None).unwrap();
    dir
}

#[test]
fn malformed_adapters_give_clear_errors() {
    let q = "layers.0.self_attn.q_proj";
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, Device::Cpu).unwrap();
    let check = |dir: &Path, want: &str| {
        let e = err_string(PeftAdapter::load(dir, Device::Cpu));
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    };

    check(Path::new("/nonexistent/adapter"), "adapter directory not found");
    let empty = tmpdir();
    check(empty.path(), "no adapter_config.json");
    std::fs::copy(
        case_dir("lora").join("adapter").join(CONFIG_NAME),
        empty.path().join(CONFIG_NAME),
    )
    .unwrap();
    check(empty.path(), "no adapter_model.safetensors");
    std::fs::write(empty.path().join("adapter_model.bin"), b"pickle").unwrap();
    check(empty.path(), "legacy adapter_model.bin (a PyTorch pickle)");
    std::fs::write(
        empty.path().join(CONFIG_NAME),
        "{\"peft_type\": \"LORA\",\n \"r\": }",
    )
    .unwrap();
    check(empty.path(), "invalid JSON: expecting a value (line 2, column 7)");
    std::fs::write(empty.path().join(CONFIG_NAME), r#"{"peft_type": "IA3"}"#).unwrap();
    check(empty.path(), "unsupported peft_type \"IA3\"");
    std::fs::write(
        empty.path().join(CONFIG_NAME),
        r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    std::fs::write(empty.path().join(WEIGHTS_NAME), b"not safetensors").unwrap();
    let e = err_string(PeftAdapter::load(empty.path(), Device::Cpu));
    assert!(e.contains(WEIGHTS_NAME), "{e}");

    check(
        edited_lora(|t| {
            t.insert(module_key(q, "lora_A.weight"), z(&[3, 12]));
        })
        .path(),
        "expected [r, in] and [out, r] with r = 4",
    );
    check(
        edited_lora(|t| {
            t.insert(module_key(q, "lora_B.weight"), z(&[12, 4, 1]));
        })
        .path(),
        "not 2-D",
    );
    check(
        edited_lora(|t| {
            t.remove(&module_key(q, "lora_B.weight"));
        })
        .path(),
        "missing base_model.model.layers.0.self_attn.q_proj.lora_B.weight",
    );
    check(
        edited_lora(|t| {
            t.insert(module_key(q, "lora_magnitude_vector"), z(&[12]));
        })
        .path(),
        "has a lora_magnitude_vector but use_dora is false",
    );
    check(
        edited_lora(|t| {
            t.insert(
                module_key(q, "lora_A.weight"),
                Tensor::from_vec(vec![0i32; 48], &[4, 12], Device::Cpu).unwrap(),
            );
        })
        .path(),
        "expected a float dtype",
    );
    // Keys for modules the config does not target: not listed, and excluded.
    for m in ["layers.0.self_attn.k_proj", "layers.1.self_attn.v_proj"] {
        check(
            edited_lora(|t| {
                t.insert(module_key(m, "lora_A.weight"), z(&[4, 12]));
                t.insert(module_key(m, "lora_B.weight"), z(&[12, 4]));
            })
            .path(),
            &format!("module \"{m}\", which the config does not target"),
        );
    }
    check(
        edited_lora(|t| {
            t.insert("base_model.model.in_proj.foo".into(), z(&[1]));
        })
        .path(),
        "unexpected key \"base_model.model.in_proj.foo\"",
    );
    check(
        edited_lora(|t| {
            t.insert("model.in_proj.lora_A.weight".into(), z(&[1]));
        })
        .path(),
        "start with \"base_model.model.\"",
    );
    check(
        edited_lora(|t| {
            t.insert(module_key(q, "waveft_spectrum"), z(&[8]));
        })
        .path(),
        "is a WAVEFT tensor but the config's peft_type is LORA",
    );
    // Saving an invalid adapter writes nothing.
    let mut a = load("lora");
    a.tensors.insert(module_key(q, "lora_A.weight"), z(&[3, 12]));
    let out = tmpdir();
    let target = out.path().join("new");
    assert!(a.save(&target).is_err());
    assert!(!target.exists());
}

#[test]
fn extras_are_classified() {
    let a = load("lora_bias_all");
    let layout = a.layout().unwrap();
    let find = |key: &str| layout.extras.iter().find(|e| e.key == key).unwrap();
    let e = find("base_model.model.layers.0.mlp.up_proj.base_layer.bias");
    assert_eq!(
        (e.kind, e.base_name.as_str()),
        (ExtraKind::Bias, "layers.0.mlp.up_proj.bias")
    );
    let e = find("base_model.model.lm_head.modules_to_save.bias");
    assert_eq!(
        (e.kind, e.base_name.as_str()),
        (ExtraKind::ModulesToSave, "lm_head.bias")
    );
    let e = find("base_model.model.lm_head.original_module.bias");
    assert_eq!(
        (e.kind, e.base_name.as_str()),
        (ExtraKind::OriginalModule, "lm_head.bias")
    );
    let e = find("base_model.model.lm_head.weight");
    assert_eq!(
        (e.kind, e.base_name.as_str()),
        (ExtraKind::ModulesToSave, "lm_head.weight")
    );
}

#[test]
fn inspect_adapter_summarizes() {
    let s = inspect_adapter(case_dir("rslora_patterns").join("adapter")).unwrap();
    assert!(s.contains("peft_type: LORA (LoRA)"), "{s}");
    assert!(s.contains("rsLoRA"), "{s}");
    assert!(s.contains("layers.0.self_attn.q_proj"), "{s}");
    assert!(s.contains("11.313708"), "{s}");
    assert!(s.contains("trainable parameters: 856"), "{s}");
    let s = inspect_adapter(case_dir("dora").join("adapter")).unwrap();
    assert!(
        s.contains("(DoRA)") && s.contains("trainable parameters: 1623"),
        "{s}"
    );
}

/// Writes the adapters this crate saves, for `check_peft_roundtrip.py`: every fixture re-saved, every
/// fixture rebuilt from a fresh config (exercising the config writer's defaults), and synthetic VB-LoRA
/// (int16 top-k) and WaveFT adapters on the fixtures' TinyLM.
#[test]
fn roundtrip_export() {
    let tmp = tmpdir();
    let root = std::env::var_os("PEFT_KERNELS_WRITE_ROUNDTRIP")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let meta = |dir: &Path, v: Value| std::fs::write(dir.join("roundtrip.json"), v.to_string()).unwrap();
    for case in CASES {
        let a = load(case);
        let dir = root.join(case);
        a.save(&dir).unwrap();
        meta(&dir, serde_json::json!({"kind": "fixture", "fixture": case}));
        // The same adapter under a config rebuilt from the public fields only.
        let c = &a.config;
        let mut fresh = AdapterConfig::new(c.method.clone());
        fresh.target_modules = c.target_modules.clone();
        fresh.exclude_modules = c.exclude_modules.clone();
        fresh.modules_to_save = c.modules_to_save.clone();
        fresh.layers_to_transform = c.layers_to_transform.clone();
        fresh.layers_pattern = c.layers_pattern.clone();
        fresh.fan_in_fan_out = c.fan_in_fan_out;
        fresh.bias = c.bias.clone();
        let b = PeftAdapter {
            config: fresh,
            tensors: a.tensors.clone(),
        };
        let dir = root.join(format!("{case}_fresh_config"));
        b.save(&dir).unwrap();
        assert_eq!(
            PeftAdapter::load(&dir, Device::Cpu).unwrap().modules().unwrap(),
            a.modules().unwrap()
        );
        meta(&dir, serde_json::json!({"kind": "fixture", "fixture": case}));
    }
    let v = to_file_form(vblora_adapter(300, true)).unwrap();
    let dir = root.join("vblora_int16");
    v.save(&dir).unwrap();
    // What PEFT must hold after loading: the logits expanded from the top-k form, and the bank.
    let loaded = PeftAdapter::load(&dir, Device::Cpu).unwrap();
    let mut expect = vec![(
        VBLORA_BANK_KEY.to_string(),
        TensorBytes::from_tensor(&loaded.tensors[VBLORA_BANK_KEY]).unwrap(),
    )];
    for m in loaded.modules().unwrap() {
        for (ab, pi, pw) in [
            ("A", Part::VbTopkIndicesA, Part::VbTopkWeightsA),
            ("B", Part::VbTopkIndicesB, Part::VbTopkWeightsB),
        ] {
            let e = vblora_expand_topk(
                loaded.module_tensor(&m.name, pi).unwrap(),
                loaded.module_tensor(&m.name, pw).unwrap(),
                300,
            )
            .unwrap();
            expect.push((
                format!("{}.vblora_logits_{ab}", m.name),
                TensorBytes::from_tensor(&e).unwrap(),
            ));
        }
    }
    write_safetensors(dir.join("expected.safetensors"), &expect, None).unwrap();
    meta(&dir, serde_json::json!({"kind": "vblora", "fixture": "lora"}));

    let mut w = WaveFtConfig {
        n_frequency: 8,
        ..Default::default()
    };
    w.n_frequency_pattern.insert("v_proj", 5).unwrap();
    let mut cfg = AdapterConfig::new(MethodConfig::WaveFt(w));
    cfg.target_modules = Some(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    cfg.exclude_modules = Some(ModuleNames::Names(vec!["layers.1.self_attn.v_proj".into()]));
    let mut tensors = BTreeMap::new();
    for (m, n) in [
        ("layers.0.self_attn.q_proj", 8),
        ("layers.1.self_attn.q_proj", 8),
        ("layers.0.self_attn.v_proj", 5),
    ] {
        tensors.insert(
            module_key(m, "waveft_spectrum"),
            Tensor::randn(&[n], 0.01, n as u64, DType::F32, Device::Cpu).unwrap(),
        );
    }
    let dir = root.join("waveft");
    PeftAdapter { config: cfg, tensors }.save(&dir).unwrap();
    meta(&dir, serde_json::json!({"kind": "waveft", "fixture": "lora"}));
}

// =============================================================================================== math

#[allow(clippy::too_many_arguments)]
fn lora_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&[f32]>,
    a: &Tensor,
    b: &Tensor,
    s: f32,
    lb: Option<&[f32]>,
    fifo: bool,
) -> Vec<f32> {
    let base = if fifo {
        x.matmul(w).unwrap()
    } else {
        x.matmul_t(w, false, true).unwrap()
    };
    let lora = x
        .matmul_t(a, false, true)
        .unwrap()
        .matmul_t(b, false, true)
        .unwrap()
        .scale(s)
        .unwrap();
    let mut y = base.add(&lora).unwrap().to_vec::<f32>().unwrap();
    let out = *base.shape().last().unwrap();
    for row in y.chunks_mut(out) {
        for (j, v) in row.iter_mut().enumerate() {
            *v += bias.map_or(0.0, |b| b[j]) + lb.map_or(0.0, |b| s * b[j]);
        }
    }
    y
}

/// The bias a base layer of the fixture model has: the adapter's trained copy if any, else the base's.
fn layer_bias(a: &PeftAdapter, base: &SafetensorsFile, module: &str) -> Option<Vec<f32>> {
    let name = format!("{module}.bias");
    let layout = a.layout().unwrap();
    if let Some(e) = layout
        .extras
        .iter()
        .find(|e| e.base_name == name && e.kind == ExtraKind::Bias)
    {
        return Some(a.tensors[&e.key].to_vec_f32().unwrap());
    }
    base.contains(&name).then(|| vals(base, &name))
}

#[test]
fn lora_forward_matches_peft() {
    for case in ["lora", "lora_bias_all", "rslora_patterns", "lora_fan_in_fan_out"] {
        let (a, base, io) = (
            load(case),
            st(case, "base.safetensors"),
            st(case, "io.safetensors"),
        );
        let mut worst = 0f32;
        for m in a.modules().unwrap() {
            let x = io.load(&format!("{}.input", m.name), Device::Cpu).unwrap();
            let w = base.load(&format!("{}.weight", m.name), Device::Cpu).unwrap();
            let bias = layer_bias(&a, &base, &m.name);
            let lb = m.lora_bias.then(|| {
                a.module_tensor(&m.name, Part::LoraBBias)
                    .unwrap()
                    .to_vec_f32()
                    .unwrap()
            });
            let y = lora_forward(
                &x,
                &w,
                bias.as_deref(),
                a.module_tensor(&m.name, Part::LoraA).unwrap(),
                a.module_tensor(&m.name, Part::LoraB).unwrap(),
                m.scaling as f32,
                lb.as_deref(),
                m.fan_in_fan_out,
            );
            worst = worst.max(close(
                &y,
                &vals(&io, &format!("{}.output", m.name)),
                &format!("{case} {}", m.name),
            ));
        }
        println!("{case}: LoRA forward max error {worst:.2e} (relative to max |y|)");
    }
}

/// DoRA closed form `(m / ‖W + sBA‖_row) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b`: checks that the DoRA fixtures hold
/// everything the DoRA kernels need (for NF4, with the dequantized base PEFT used).
#[test]
fn dora_fixtures_are_consistent_with_the_closed_form() {
    for (case, wfile) in [
        ("dora", "base.safetensors"),
        ("dora_nf4", "base_dequantized.safetensors"),
    ] {
        let (a, base, wf, io) = (
            load(case),
            st(case, "base.safetensors"),
            st(case, wfile),
            st(case, "io.safetensors"),
        );
        let mut worst = 0f32;
        for m in a.modules().unwrap() {
            let x = io.load(&format!("{}.input", m.name), Device::Cpu).unwrap();
            let w = wf.load(&format!("{}.weight", m.name), Device::Cpu).unwrap();
            let (la, lb) = (
                a.module_tensor(&m.name, Part::LoraA).unwrap(),
                a.module_tensor(&m.name, Part::LoraB).unwrap(),
            );
            let s = m.scaling as f32;
            let bias = layer_bias(&a, &base, &m.name);
            // The base layer alone (validates the dequantized weights against PEFT's forward).
            let yb = lora_forward(
                &x,
                &w,
                bias.as_deref(),
                la,
                &Tensor::zeros(lb.shape(), DType::F32, Device::Cpu).unwrap(),
                s,
                None,
                false,
            );
            worst = worst.max(close(
                &yb,
                &vals(&io, &format!("{}.base_output", m.name)),
                &format!("{case} {} base", m.name),
            ));
            let norms = merge_lora(&w, la, lb, s, false)
                .unwrap()
                .row_norms()
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            let mag = a
                .module_tensor(&m.name, Part::Magnitude)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let y0 = lora_forward(&x, &w, None, la, lb, s, None, false);
            let out = mag.len();
            let mut y = y0.clone();
            for row in y.chunks_mut(out) {
                for j in 0..out {
                    row[j] = mag[j] / norms[j] * row[j] + bias.as_ref().map_or(0.0, |b| b[j]);
                }
            }
            worst = worst.max(close(
                &y,
                &vals(&io, &format!("{}.output", m.name)),
                &format!("{case} {}", m.name),
            ));
        }
        println!("{case}: DoRA closed-form forward max error {worst:.2e}");
    }
}

fn merge_fixture_modules(dev: Device) -> Result<()> {
    for case in [
        "lora",
        "lora_bias_all",
        "rslora_patterns",
        "lora_fan_in_fan_out",
        "dora",
        "dora_nf4",
    ] {
        let a = PeftAdapter::load(case_dir(case).join("adapter"), dev)?;
        let nf4 = case == "dora_nf4";
        let wf = st(
            case,
            if nf4 {
                "base_dequantized.safetensors"
            } else {
                "base.safetensors"
            },
        );
        let merged = st(
            case,
            if nf4 {
                "merged_dense.safetensors"
            } else {
                "merged.safetensors"
            },
        );
        let mut worst = 0f32;
        for m in a.modules()? {
            let name = format!("{}.weight", m.name);
            let w = wf.load(&name, dev)?;
            let (la, lb) = (
                a.module_tensor(&m.name, Part::LoraA)?,
                a.module_tensor(&m.name, Part::LoraB)?,
            );
            let got = match m.method {
                AdapterMethod::Dora => merge_dora(
                    &w,
                    la,
                    lb,
                    a.module_tensor(&m.name, Part::Magnitude)?,
                    m.scaling as f32,
                    m.fan_in_fan_out,
                )?,
                _ => merge_lora(&w, la, lb, m.scaling as f32, m.fan_in_fan_out)?,
            };
            assert_eq!(got.dtype(), DType::F32);
            worst = worst.max(close(
                &got.to_vec_f32()?,
                &vals(&merged, &name),
                &format!("{case} {name}"),
            ));
        }
        println!("{case} on {dev}: merged weights max error {worst:.2e}");
    }
    Ok(())
}

device_test!(merge_fixture_modules);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merge_math_matches_f64(
        out in 1usize..19, inp in 1usize..23, r in 1usize..7, s in -4.0f32..4.0,
        fifo: bool, seed in 0u64..1000, dt in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
    ) {
        let dev = Device::Cpu;
        let wshape = if fifo { [inp, out] } else { [out, inp] };
        let w = Tensor::randn(&wshape, 1.0, seed, dt, dev).unwrap();
        let a = Tensor::randn(&[r, inp], 0.5, seed + 1, dt, dev).unwrap();
        let b = Tensor::randn(&[out, r], 0.5, seed + 2, dt, dev).unwrap();
        let m = Tensor::rand(&[out], 0.5, 2.0, seed + 3, DType::F32, dev).unwrap();
        let (wv, av, bv, mv) = (w.to_vec_f32().unwrap(), a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), m.to_vec_f32().unwrap());
        // f64 reference in [out, in] layout.
        let mut merged = vec![0f64; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let d: f64 = (0..r).map(|k| bv[o * r + k] as f64 * av[k * inp + i] as f64).sum();
                let wi = if fifo { wv[i * out + o] } else { wv[o * inp + i] } as f64;
                merged[o * inp + i] = wi + s as f64 * d;
            }
        }
        let norms: Vec<f64> = (0..out).map(|o| merged[o * inp..(o + 1) * inp].iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
        let stored = |v: &dyn Fn(usize, usize) -> f64| -> Vec<f32> {
            let mut res = vec![0f32; out * inp];
            for o in 0..out {
                for i in 0..inp {
                    let idx = if fifo { i * out + o } else { o * inp + i };
                    res[idx] = v(o, i) as f32;
                }
            }
            res
        };
        let want_lora = stored(&|o, i| merged[o * inp + i]);
        let want_dora = stored(&|o, i| mv[o] as f64 / norms[o] * merged[o * inp + i]);
        let got = merge_lora(&w, &a, &b, s, fifo).unwrap();
        prop_assert_eq!(got.dtype(), DType::F32);
        common::assert_close_scaled(&got.to_vec_f32().unwrap(), &want_lora, 2e-6, "merge_lora");
        let got = merge_dora(&w, &a, &b, &m, s, fifo).unwrap();
        common::assert_close_scaled(&got.to_vec_f32().unwrap(), &want_dora, 4e-6, "merge_dora");
        let d = lora_delta(&a, &b, s, fifo).unwrap();
        prop_assert_eq!(d.shape(), &wshape[..]);
    }
}

#[test]
fn merge_math_rejects_bad_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, Device::Cpu).unwrap();
    assert!(matches!(
        merge_lora(&z(&[4, 5]), &z(&[2, 5]), &z(&[4, 3]), 1.0, false),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        merge_lora(&z(&[4, 5]), &z(&[2, 5]), &z(&[4, 2]), 1.0, true),
        Err(Error::Shape { .. })
    ));
    assert!(merge_dora(&z(&[4, 5]), &z(&[2, 5]), &z(&[4, 2]), &z(&[5]), 1.0, false).is_err());
    let i = Tensor::from_vec(vec![0i32; 10], &[2, 5], Device::Cpu).unwrap();
    assert!(matches!(
        merge_lora(&z(&[4, 5]), &i, &z(&[4, 2]), 1.0, false),
        Err(Error::DType { .. })
    ));
}

// =============================================================================================== driver

fn no_temp_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".peftk-tmp"))
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// The merged checkpoint equals PEFT's `merge_and_unload` state dict: merged weights within 1e-5, every
/// other tensor byte for byte (replaced biases / lm_head exactly, or within 1e-5 with a lora_B bias).
fn check_merged_file(case: &str, out: &Path) -> f32 {
    let (ours, peft, base) = (
        SafetensorsFile::open(out).unwrap(),
        st(case, "merged.safetensors"),
        st(case, "base.safetensors"),
    );
    assert_eq!(ours.names(), peft.names(), "{case}: tensor names");
    assert_eq!(ours.metadata(), base.metadata(), "{case}: metadata copied");
    let merged: Vec<String> = load(case)
        .modules()
        .unwrap()
        .iter()
        .map(|m| format!("{}.weight", m.name))
        .collect();
    let mut worst = 0f32;
    for n in ours.names() {
        let (od, os, ob) = ours.raw(n).unwrap();
        let (pd, ps, pb) = peft.raw(n).unwrap();
        assert_eq!((od, &os), (pd, &ps), "{case} {n}");
        if merged.contains(n) || ob != pb {
            worst = worst.max(close(&vals(&ours, n), &vals(&peft, n), &format!("{case} {n}")));
        }
        if !merged.contains(n) && base.contains(n) && base.raw(n).unwrap().2 == pb {
            assert_eq!(ob, pb, "{case} {n}: copied through unchanged");
        }
    }
    worst
}

#[test]
fn merge_driver_matches_peft_merge_and_unload() {
    for case in DENSE_CASES {
        let dir = tmpdir();
        let out = dir.path().join("merged.safetensors");
        let report = merge_into_file(
            case_dir(case).join("base.safetensors"),
            &load(case),
            &out,
            &MergeOptions::default(),
            &MergeRegistry::new(),
        )
        .unwrap();
        assert_eq!(report.merged.len(), load(case).modules().unwrap().len());
        assert_eq!(report.bytes_written, std::fs::metadata(&out).unwrap().len());
        let worst = check_merged_file(case, &out);
        println!(
            "{case}: merged file max error {worst:.2e}; {} replaced, {} copied",
            report.replaced.len(),
            report.copied
        );
        no_temp_files(dir.path());
    }
}

#[test]
fn merge_driver_output_dtype_and_plugins() {
    let case = "lora";
    let dir = tmpdir();
    let out = dir.path().join("m.safetensors");
    let opts = MergeOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    merge_into_file(
        case_dir(case).join("base.safetensors"),
        &load(case),
        &out,
        &opts,
        &MergeRegistry::new(),
    )
    .unwrap();
    let (f, peft, base) = (
        SafetensorsFile::open(&out).unwrap(),
        st(case, "merged.safetensors"),
        st(case, "base.safetensors"),
    );
    let merged: Vec<String> = load(case)
        .modules()
        .unwrap()
        .iter()
        .map(|m| format!("{}.weight", m.name))
        .collect();
    for n in f.names() {
        let (d, _, bytes) = f.raw(n).unwrap();
        if merged.contains(n) {
            assert_eq!(d, StDtype::BF16, "{n}");
            let want: Vec<f32> = vals(&peft, n)
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect();
            let got = vals(&f, n);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{n}: {g} vs {w}");
            }
        } else {
            assert_eq!(bytes, base.raw(n).unwrap().2, "{n} copied");
        }
    }

    // A method with no implementation fails before writing; a registered one is used.
    let out2 = dir.path().join("m2.safetensors");
    let e = err_string(merge_into_file(
        case_dir(case).join("base.safetensors"),
        &load(case),
        &out2,
        &MergeOptions::default(),
        &MergeRegistry::empty(),
    ));
    assert!(e.contains("merging LoRA adapters is not implemented yet"), "{e}");
    assert!(!out2.exists());
    struct Zero;
    impl MergeMethod for Zero {
        fn merge(
            &self,
            _: &PeftAdapter,
            _: &peft_kernels::io::peft::AdapterModule,
            w: &Tensor,
        ) -> Result<Tensor> {
            w.scale(0.0)
        }
    }
    let mut reg = MergeRegistry::empty();
    reg.register(AdapterMethod::Lora, Arc::new(Zero));
    merge_into_file(
        case_dir(case).join("base.safetensors"),
        &load(case),
        &out2,
        &MergeOptions::default(),
        &reg,
    )
    .unwrap();
    assert!(
        vals(&SafetensorsFile::open(&out2).unwrap(), "in_proj.weight")
            .iter()
            .all(|v| *v == 0.0)
    );
    no_temp_files(dir.path());
}

#[test]
fn failing_merges_write_nothing() {
    let dir = tmpdir();
    let out = dir.path().join("out.safetensors");
    let run = |base: &Path, adapter: &PeftAdapter, opts: &MergeOptions| {
        let e = err_string(merge_into_file(base, adapter, &out, opts, &MergeRegistry::new()));
        assert!(!out.exists(), "output written despite {e}");
        no_temp_files(dir.path());
        e
    };
    // Adapter for another model: missing modules.
    let e = run(
        &case_dir("lora_fan_in_fan_out").join("base.safetensors"),
        &load("lora"),
        &MergeOptions::default(),
    );
    assert!(
        e.contains("the adapter has module \"in_proj\" but the base has no tensor \"in_proj.weight\""),
        "{e}"
    );
    // A module with the wrong shape (base weight transposed).
    let base = st("lora", "base.safetensors");
    let mut list: Vec<(String, TensorBytes)> = Vec::new();
    for n in base.names() {
        let (d, s, b) = base.raw(n).unwrap();
        if n == "layers.0.mlp.down_proj.weight" {
            let t = base.load(n, Device::Cpu).unwrap().t().unwrap();
            list.push((n.clone(), TensorBytes::from_tensor(&t).unwrap()));
        } else {
            list.push((n.clone(), TensorBytes::borrowed(d, s, b)));
        }
    }
    let bad_base = dir.path().join("bad_base.safetensors");
    write_safetensors(&bad_base, &list, None).unwrap();
    let e = run(&bad_base, &load("lora"), &MergeOptions::default());
    assert!(
        e.contains("module \"layers.0.mlp.down_proj\": base weight is [20, 12], the adapter needs [12, 20]"),
        "{e}"
    );
    std::fs::remove_file(&bad_base).unwrap();
    // Non-finite merged values: found while streaming, after the header; the temp file is discarded.
    let mut a = load("lora");
    let k = module_key("layers.1.self_attn.q_proj", "lora_A.weight");
    let mut v = a.tensors[&k].to_vec_f32().unwrap();
    v[3] = f32::NAN;
    a.tensors
        .insert(k, Tensor::from_vec(v, &[4, 12], Device::Cpu).unwrap());
    let e = run(
        &case_dir("lora").join("base.safetensors"),
        &a,
        &MergeOptions::default(),
    );
    assert!(
        e.contains("non-finite value NaN in tensor 'layers.1.self_attn.q_proj.weight"),
        "{e}"
    );
    // f16 output overflow.
    let mut a = load("lora");
    let k = module_key("in_proj", "lora_B.weight");
    let big = a.tensors[&k].scale(1e6).unwrap();
    a.tensors.insert(k, big);
    let opts = MergeOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let e = run(&case_dir("lora").join("base.safetensors"), &a, &opts);
    assert!(
        e.contains("non-finite value") && e.contains("inf in tensor 'in_proj.weight"),
        "{e}"
    );
    // --requantize on a dense base, integer --dtype, same input and output.
    let e = run(
        &case_dir("lora").join("base.safetensors"),
        &load("lora"),
        &MergeOptions {
            requantize: true,
            ..Default::default()
        },
    );
    assert!(e.contains("--requantize needs a bitsandbytes 4-bit base"), "{e}");
    let e = run(
        &case_dir("lora").join("base.safetensors"),
        &load("lora"),
        &MergeOptions {
            dtype: Some(DType::I32),
            ..Default::default()
        },
    );
    assert!(e.contains("float dtype"), "{e}");
    let same = dir.path().join("same.safetensors");
    std::fs::copy(case_dir("lora").join("base.safetensors"), &same).unwrap();
    let e = err_string(merge_into_file(
        &same,
        &load("lora"),
        &same,
        &MergeOptions::default(),
        &MergeRegistry::new(),
    ));
    assert!(e.contains("must differ"), "{e}");
}

/// QDoRA on a bitsandbytes NF4 (double-quant) base: the dequantize-merge path against PEFT's f32 merged
/// weights (before PEFT's re-quantization), written dense with the quant-state tensors dropped.
#[test]
fn merge_on_nf4_base() {
    let dir = tmpdir();
    let out = dir.path().join("out.safetensors");
    let opts = MergeOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let a = load("dora_nf4");
    let report = merge_into_file(
        case_dir("dora_nf4").join("base.safetensors"),
        &a,
        &out,
        &opts,
        &MergeRegistry::new(),
    )
    .unwrap();
    let (f, dense) = (
        SafetensorsFile::open(&out).unwrap(),
        st("dora_nf4", "merged_dense.safetensors"),
    );
    let mut worst = 0f32;
    for m in a.modules().unwrap() {
        let n = format!("{}.weight", m.name);
        assert_eq!(f.raw(&n).unwrap().0, StDtype::F32, "{n}");
        worst = worst.max(close(&vals(&f, &n), &vals(&dense, &n), &n));
        assert!(!f.contains(&format!("{n}.absmax")));
        assert!(!f.contains(&format!("{n}.quant_state.bitsandbytes__nf4")));
    }
    println!("dora_nf4 dense merge: max error {worst:.2e} (relative to max |w|)");
    // Every quant-state tensor of each merged weight was dropped (absmax, quant_map, nested_*, state).
    assert_eq!(report.dropped.len(), 5 * a.modules().unwrap().len());
    // Untargeted 4-bit layers are copied as they were.
    let base = st("dora_nf4", "base.safetensors");
    for k in [
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.k_proj.weight.absmax",
    ] {
        if !a.modules().unwrap().iter().any(|m| k.starts_with(&m.name)) {
            assert_eq!(f.raw(k).unwrap().2, base.raw(k).unwrap().2, "{k}");
        }
    }
    // The default output dtype of a 4-bit base is the dtype its quant state records (float32 here).
    let out2 = dir.path().join("out2.safetensors");
    merge_into_file(
        case_dir("dora_nf4").join("base.safetensors"),
        &a,
        &out2,
        &MergeOptions::default(),
        &MergeRegistry::new(),
    )
    .unwrap();
    let m0 = format!("{}.weight", a.modules().unwrap()[0].name);
    assert_eq!(
        SafetensorsFile::open(&out2).unwrap().raw(&m0).unwrap().0,
        StDtype::F32
    );
    no_temp_files(dir.path());
}

/// `--requantize`: the merged weights go back into the bitsandbytes layout with the base's settings (NF4,
/// blocksize 64, double quant). The file has exactly the tensors (names, dtypes, shapes) of PEFT's own
/// re-quantized merge, every weight loads through the quant module, and its dequantized values are
/// PEFT's merged f32 weights up to one NF4 rounding. PEFT re-quantized the same f32 values, so the packed
/// codes agree with PEFT's except where a merged value sits on a code boundary within f32 noise.
#[test]
fn merge_on_nf4_base_requantized() {
    use peft_kernels::quant::io::{load_quantized, quantized_names};
    let dir = tmpdir();
    let out = dir.path().join("out.safetensors");
    let a = load("dora_nf4");
    let report = merge_into_file(
        case_dir("dora_nf4").join("base.safetensors"),
        &a,
        &out,
        &MergeOptions {
            requantize: true,
            ..Default::default()
        },
        &MergeRegistry::new(),
    )
    .unwrap();
    assert!(report.dropped.is_empty());
    let (ours, peft, dense) = (
        SafetensorsFile::open(&out).unwrap(),
        st("dora_nf4", "merged.safetensors"),
        st("dora_nf4", "merged_dense.safetensors"),
    );
    assert_eq!(ours.names(), peft.names());
    for n in ours.names() {
        let (od, os, _) = ours.raw(n).unwrap();
        let (pd, ps, _) = peft.raw(n).unwrap();
        assert_eq!((od, os), (pd, ps), "{n}");
    }
    assert_eq!(quantized_names(&ours), quantized_names(&peft));
    let (mut same, mut total) = (0usize, 0usize);
    for m in a.modules().unwrap() {
        let n = format!("{}.weight", m.name);
        let q = load_quantized(&ours, &n, Device::Cpu).unwrap();
        let qp = load_quantized(&peft, &n, Device::Cpu).unwrap();
        assert_eq!(q.state().blocksize, 64);
        assert!(q.state().is_double());
        assert_eq!(q.state().shape, qp.state().shape);
        assert_eq!(q.dtype(), qp.dtype());
        let got = q.dequantize(DType::F32).unwrap().to_vec_f32().unwrap();
        let want = vals(&dense, &n);
        // One NF4 rounding: at most half the widest code gap ((1 - 0.7230) / 2 = 0.1385 of the block
        // absmax) per element, plus the double-quantized absmax's own rounding.
        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 0.145 * amax + 1e-6, "{n}[{i}]: {g} vs {w}");
        }
        let (ob, pb) = (
            q.data().to_vec::<u8>().unwrap(),
            qp.data().to_vec::<u8>().unwrap(),
        );
        same += ob.iter().zip(&pb).filter(|(a, b)| a == b).count();
        total += ob.len();
    }
    println!("requantized NF4 codes: {same}/{total} packed bytes identical to PEFT's");
    assert!(
        same as f64 >= 0.97 * total as f64,
        "{same}/{total} packed bytes agree with PEFT"
    );
    // Untouched tensors are byte-identical to the base.
    let base = st("dora_nf4", "base.safetensors");
    let merged: Vec<String> = a
        .modules()
        .unwrap()
        .iter()
        .map(|m| format!("{}.weight", m.name))
        .collect();
    for n in ours.names() {
        if !merged.iter().any(|m| n == m || n.starts_with(&format!("{m}."))) {
            assert_eq!(ours.raw(n).unwrap().2, base.raw(n).unwrap().2, "{n}");
        }
    }
    no_temp_files(dir.path());
}

#[test]
fn merge_cli() {
    let exe = env!("CARGO_BIN_EXE_peftk");
    let dir = tmpdir();
    let out = dir.path().join("merged.safetensors");
    let case = "rslora_patterns";
    let o = std::process::Command::new(exe)
        .args(["merge", "--base"])
        .arg(case_dir(case).join("base.safetensors"))
        .arg("--adapter")
        .arg(case_dir(case).join("adapter"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("merged 8 module(s)"));
    check_merged_file(case, &out);

    let bad = dir.path().join("bad.safetensors");
    let o = std::process::Command::new(exe)
        .args(["merge", "--dtype", "bf16", "--base"])
        .arg(case_dir("lora").join("base.safetensors"))
        .arg("--adapter")
        .arg(case_dir("lora_fan_in_fan_out").join("adapter"))
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error:") && err.contains("h.0.attn.c_attn"), "{err}");
    assert!(!bad.exists());
    no_temp_files(dir.path());

    let o = std::process::Command::new(exe)
        .args([
            "merge",
            "--dtype",
            "i32",
            "--base",
            "x",
            "--adapter",
            "y",
            "--out",
            "z",
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("--dtype must be f32, f16 or bf16")
    );

    let o = std::process::Command::new(exe)
        .arg("inspect-adapter")
        .arg(case_dir("lora").join("adapter"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("trainable parameters: 632"));
}

#[test]
fn pattern_map_order_comes_from_the_file() {
    // Two overlapping keys: file order decides (PEFT iterates the dict as loaded).
    let a = AdapterConfig::from_json_str(r#"{"peft_type": "LORA", "rank_pattern": {"q_proj": 2, ".*": 3}}"#)
        .unwrap();
    let b = AdapterConfig::from_json_str(r#"{"peft_type": "LORA", "rank_pattern": {".*": 3, "q_proj": 2}}"#)
        .unwrap();
    assert_eq!(a.rank_for("x.q_proj"), Some(2));
    assert_eq!(b.rank_for("x.q_proj"), Some(3));
    assert_eq!(PeftType::VbLora.as_str(), "VBLORA");
}

// ------------------------------------------------------------------------------------------------
// Fuzz corpus of the adapter loader: every seed, and random mutations of the valid ones (config and
// weights separately), through the fuzz entry point
// ------------------------------------------------------------------------------------------------

#[test]
fn adapter_fuzz_corpus_never_panics() {
    use peft_kernels::peft_model::fuzz::{adapter_input, fuzz_load_adapter, split_adapter_input};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/load_adapter");
    let seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(seeds.len() >= 20, "seed corpus missing");
    let mut valid = Vec::new();
    for (name, s) in &seeds {
        let r = fuzz_load_adapter(s);
        // The fixtures PEFT wrote load, save and reload; the damaged seeds do not load.
        if name.starts_with("valid_") {
            assert_eq!(r, 2, "{name}");
            valid.push(s.clone());
        }
    }
    assert_eq!(fuzz_load_adapter(&[]), 0);
    let mut rng = peft_kernels::rng::Rng::new(0xada9);
    for i in 0..300 {
        let (cfg, w) = split_adapter_input(&valid[i % valid.len()]);
        let (mut cfg, mut w) = (cfg.to_vec(), w.to_vec());
        for _ in 0..1 + rng.below(4) {
            // The config as text (digits, brackets, quotes), or the weights' header (mostly).
            let header_end = match w.first_chunk::<8>() {
                Some(n) => (u64::from_le_bytes(*n) as usize).saturating_add(8).min(w.len()),
                None => w.len(),
            };
            let (target, limit) = if rng.below(2) == 0 {
                let n = cfg.len();
                (&mut cfg, n)
            } else {
                let n = if rng.below(4) == 0 { w.len() } else { header_end };
                (&mut w, n)
            };
            if target.is_empty() {
                continue;
            }
            let at = (rng.below(limit.max(1) as u64) as usize).min(target.len() - 1);
            match rng.below(5) {
                0 => target[at] = b"0123456789-.eE[]{},:\"nul"[rng.below(24) as usize],
                1 => target[at] ^= 1 << rng.below(8),
                2 => {
                    target.remove(at);
                }
                3 => target.insert(at, rng.next_u64() as u8),
                _ => target.truncate(at.max(1)),
            }
        }
        fuzz_load_adapter(&adapter_input(&cfg, &w));
    }
}
