//! QR-Adaptor search: NSGA-II's sort and crowding against hand-computed cases, the budget repair
//! (proptest), the memory model against the bytes of a really loaded model, the Gaussian process
//! against closed forms, and the search driver's determinism and resume on a fake evaluator.

use peft_kernels::autograd::ParamStore;
use peft_kernels::kbit::Tier;
use peft_kernels::models::{self, ModelLoadOptions, QuantizeOnLoad};
use peft_kernels::qr_adaptor::gp::{Gp, expected_improvement, matern52, normal_cdf, normal_pdf};
use peft_kernels::qr_adaptor::memory::{self, MemoryModel, OptimBytes, Tables};
use peft_kernels::qr_adaptor::nsga2::{
    Objectives, Sensitivity, crowding_distance, dominates, non_dominated_sort, select,
};
use peft_kernels::qr_adaptor::repair::{lowest, repair};
use peft_kernels::qr_adaptor::search::{self, Evaluator, Fidelity, SearchConfig};
use peft_kernels::qr_adaptor::{
    Candidate, Choice, EmbeddingStorage, Granularity, LinearShape, QrConfig, SearchSpace, units,
};
use peft_kernels::{Result, Tensor};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn o(score: f64, memory: f64) -> Objectives {
    Objectives::new(score, memory, 100.0)
}

/// A: (.9, 80), B and C: (.8, 50) (a tie), D: (.7, 60) dominated by B and C, E: (.95, 120) and F: (.99,
/// 150) over the budget of 100 (violations 20 and 50), G: (.5, 40).
fn case() -> Vec<Objectives> {
    vec![
        o(0.9, 80.0),
        o(0.8, 50.0),
        o(0.8, 50.0),
        o(0.7, 60.0),
        o(0.95, 120.0),
        o(0.99, 150.0),
        o(0.5, 40.0),
    ]
}

#[test]
fn constrained_domination() {
    let c = case();
    assert!(dominates(&c[6], &c[4]), "feasible beats infeasible");
    assert!(!dominates(&c[4], &c[6]));
    assert!(dominates(&c[4], &c[5]), "smaller violation wins");
    assert!(dominates(&c[1], &c[3]));
    assert!(!dominates(&c[1], &c[2]) && !dominates(&c[2], &c[1]), "ties");
    assert!(!dominates(&c[0], &c[6]) && !dominates(&c[6], &c[0]));
}

#[test]
fn non_dominated_sort_by_hand() {
    assert_eq!(
        non_dominated_sort(&case()),
        vec![vec![0, 1, 2, 6], vec![3], vec![4], vec![5]]
    );
    assert!(non_dominated_sort(&[]).is_empty());
    // All infeasible, equal violation: one front.
    let inf = [o(0.1, 110.0), o(0.9, 110.0)];
    assert_eq!(non_dominated_sort(&inf), vec![vec![0, 1]]);
}

#[test]
fn crowding_distance_by_hand() {
    let c = case();
    // Front [A, B, C, G]. Score: sorted G .5, B .8, C .8, A .9 (range .4): B gets (.8 - .5)/.4 = .75,
    // C gets (.9 - .8)/.4 = .25. Memory: G 40, B 50, C 50, A 80 (range 40): B (50 - 40)/40 = .25,
    // C (80 - 50)/40 = .75. Extremes A and G: infinite.
    let d = crowding_distance(&c, &[0, 1, 2, 6]);
    assert!(d[0].is_infinite() && d[3].is_infinite());
    assert!((d[1] - 1.0).abs() < 1e-12, "{d:?}");
    assert!((d[2] - 1.0).abs() < 1e-12, "{d:?}");
    // Two members or fewer: all infinite. Zero range adds nothing.
    assert!(crowding_distance(&c, &[1, 2]).iter().all(|x| x.is_infinite()));
    let flat = [o(0.5, 10.0), o(0.5, 20.0), o(0.5, 40.0)];
    let d = crowding_distance(&flat, &[0, 1, 2]);
    assert!((d[1] - 1.0).abs() < 1e-12, "{d:?}");
    // Selection: front 0 does not fit in 3; its two extremes, then B (tie with C broken by index).
    assert_eq!(select(&c, 3), vec![0, 6, 1]);
    assert_eq!(select(&c, 5), vec![0, 1, 2, 6, 3]);
}

fn lin(name: String, i: usize, o: usize) -> LinearShape {
    LinearShape {
        name,
        in_features: i,
        out_features: o,
    }
}

fn mem(optim: OptimBytes, dq: bool) -> MemoryModel {
    MemoryModel {
        blocksize: 64,
        double_quant: dq,
        optim,
        fixed_frozen_bytes: 5_000,
        fixed_trainable: vec![40, 2],
        tables: Some(Tables {
            elems: 700,
            loaded: EmbeddingStorage::F32,
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn repair_never_returns_over_budget(
        shapes in prop::collection::vec((1usize..300, 1usize..300), 1..7),
        bits_mask in 1u8..32,
        ranks in prop::collection::vec(0usize..33, 1..5),
        sens in prop::collection::vec((0.0f64..1.0, 0.0f64..1.0), 7),
        start in prop::collection::vec((0u8..5, 0u8..5), 7),
        budget_frac in 0.0f64..1.3,
        eight in any::<bool>(),
        dq in any::<bool>(),
        emb in any::<bool>(),
    ) {
        let ls: Vec<LinearShape> = shapes
            .iter()
            .enumerate()
            .map(|(k, &(i, o))| lin(format!("m.{k}.w"), i, o))
            .collect();
        let bits: Vec<Tier> = Tier::ALL
            .into_iter()
            .enumerate()
            .filter(|(k, _)| bits_mask >> k & 1 == 1)
            .map(|(_, t)| t)
            .collect();
        let storages = if emb { vec![EmbeddingStorage::F32, EmbeddingStorage::Bf16] } else { vec![] };
        let space = SearchSpace::new(units(&ls, Granularity::Layer), bits, ranks)
            .unwrap()
            .with_embeddings(storages);
        let m = mem(if eight { OptimBytes::AdamW8bit } else { OptimBytes::AdamW }, dq);
        let n = space.genes();
        let s = Sensitivity {
            fidelity: sens.iter().take(n).map(|x| x.0).collect(),
            plasticity: sens.iter().take(n).map(|x| x.1).collect(),
        };
        let cand = Candidate(
            start
                .iter()
                .take(n)
                .enumerate()
                .map(|(g, &(b, r))| {
                    let (nb, nr) = space.levels(g);
                    Choice { bits: b % nb as u8, rank: r % nr as u8 }
                })
                .collect(),
        );
        let floor = m.total(&space, &lowest(&space));
        let top = m.total(&space, &space.uniform(9, 9));
        // Bytes need not fall with bits on tiny linears (absmax overhead), so `top` may sit below `floor`.
        let budget = (floor as f64 * 0.9 + budget_frac * top.saturating_sub(floor) as f64) as usize;
        let fits = m.total(&space, &cand) <= budget;
        match repair(&space, &m, &s, &cand, budget) {
            Ok(c) => {
                prop_assert!(fits || floor <= budget);
                prop_assert!(m.total(&space, &c) <= budget);
                space.check(&c).unwrap();
                // Only downgrades.
                for (a, b) in cand.0.iter().zip(&c.0) {
                    prop_assert!(b.bits <= a.bits && b.rank <= a.rank);
                }
                if fits {
                    prop_assert_eq!(c, cand);
                }
            }
            Err(_) => prop_assert!(!fits && floor > budget),
        }
    }
}

#[test]
fn repair_spends_the_downgrade_where_sensitivity_per_byte_is_lowest() {
    // Two equal linears, 16 or 4 bits, rank 0: one downgrade fits the budget; the insensitive unit
    // takes it.
    let ls = [lin("a.0.q".into(), 128, 128), lin("a.1.q".into(), 128, 128)];
    let space = SearchSpace::new(
        units(&ls, Granularity::Layer),
        vec![Tier::Bits4, Tier::Bits16],
        vec![0],
    )
    .unwrap();
    let m = mem(OptimBytes::AdamW, false);
    let top = space.uniform(1, 0);
    let one_down = space.from_values(&[(16, 0), (4, 0)]).unwrap();
    let budget = m.total(&space, &one_down);
    let s = Sensitivity {
        fidelity: vec![0.9, 0.1],
        plasticity: vec![0.0, 0.0],
    };
    assert_eq!(repair(&space, &m, &s, &top, budget).unwrap(), one_down);
    let s = Sensitivity {
        fidelity: vec![0.1, 0.9],
        plasticity: vec![0.0, 0.0],
    };
    assert_eq!(
        repair(&space, &m, &s, &top, budget).unwrap(),
        space.from_values(&[(4, 0), (16, 0)]).unwrap()
    );
    assert!(repair(&space, &m, &s, &top, m.total(&space, &lowest(&space)) - 1).is_err());
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny")
}

/// The configuration of `cand` and the tiny fixture loaded with its tiers (no adapter yet).
fn load_tiered(
    space: &SearchSpace,
    cand: &Candidate,
    mm: &MemoryModel,
) -> (QrConfig, models::BertForSequenceClassification, ParamStore) {
    let qc =
        QrConfig::from_candidate(space, cand, Granularity::Layer, 2.0, &mm.quantize_options(), 0, 0).unwrap();
    let mut q = QuantizeOnLoad::nf4_dq_all_linear();
    q.tiers = qc.tiers();
    let opts = ModelLoadOptions {
        quantize: Some(q),
        ..Default::default()
    };
    let mut store = ParamStore::new();
    let model = models::from_pretrained_seq_cls(tiny(), &opts, &mut store, 0).unwrap();
    (qc, model, store)
}

/// The memory model's weight bytes against the real model: a dense load gives the linears and the
/// fixed part; a load with the configuration's tiers and its adapter (rank pattern, rank 0 = none)
/// must hold exactly the predicted bytes in base weights, other frozen tensors and trainable
/// parameters, and an optimizer step must allocate the predicted state.
fn check_memory_model(bits: &[Tier], values: impl Fn(usize) -> (u8, usize), optim: OptimBytes) {
    let dq = true;
    let mut store = ParamStore::new();
    let dense = models::from_pretrained_seq_cls(tiny(), &ModelLoadOptions::default(), &mut store, 0).unwrap();
    let (linears, mm) = memory::for_seq_cls(&dense, &store, optim, 64, dq).unwrap();
    assert_eq!(linears.len(), 2 * 6 + 1, "6 linears per layer and the pooler");
    let space = SearchSpace::new(
        units(&linears, Granularity::Layer),
        bits.to_vec(),
        vec![0, 2, 3, 8],
    )
    .unwrap();
    let vals: Vec<(u8, usize)> = (0..space.units.len()).map(&values).collect();
    let cand = space.from_values(&vals).unwrap();
    let (qc, mut model, mut store) = load_tiered(&space, &cand, &mm);
    let mut ac = qc.adapter_config(0.0).unwrap().unwrap();
    ac.task_type = Some("SEQ_CLS".into());
    ac.modules_to_save = Some(vec!["classifier".into()]);
    model.init_adapter(&ac, &mut store, 1).unwrap();
    let predicted = mm.breakdown(&space, &cand);
    let base: usize = model
        .bert()
        .linears()
        .iter()
        .map(|s| s.base().size_in_bytes())
        .sum();
    assert_eq!(base, predicted.base, "base weights");
    assert_eq!(
        model.bert().frozen_bytes(),
        predicted.base + predicted.fixed_frozen
    );
    let ids = model.param_ids();
    let params: usize = ids.iter().map(|&id| store.get(id).unwrap().size_in_bytes()).sum();
    assert_eq!(params, predicted.params, "trainable parameters");
    assert_eq!(predicted.grads, predicted.params);
    // Optimizer state: one step with a gradient for every trainable tensor.
    let kind = match optim {
        OptimBytes::AdamW => peft_kernels::optim::OptimKind::AdamW,
        OptimBytes::AdamW8bit => peft_kernels::optim::OptimKind::AdamW8bit,
    };
    let mut opt = peft_kernels::optim::Optimizer::new(peft_kernels::optim::OptimConfig {
        optim: kind,
        ..Default::default()
    })
    .unwrap();
    let mut g = peft_kernels::autograd::Gradients::default();
    for &id in &ids {
        let t = store.get(id).unwrap();
        g.insert_or_add(id, Tensor::full(t.shape(), 0.01, t.dtype(), t.device()).unwrap())
            .unwrap();
    }
    opt.step(&mut store, g).unwrap();
    assert_eq!(opt.state_bytes(), predicted.optimizer, "optimizer state");
}

#[test]
fn memory_model_matches_a_loaded_nf4_model_with_a_rank_pattern() {
    check_memory_model(&[Tier::Bits4], |u| (4, [0, 2, 3, 8][u % 4]), OptimBytes::AdamW);
    check_memory_model(&[Tier::Bits4], |u| (4, [8, 0, 3][u % 3]), OptimBytes::AdamW8bit);
}

#[test]
fn memory_model_matches_a_loaded_model_in_every_tier() {
    let all = Tier::ALL.to_vec();
    check_memory_model(
        &all,
        |u| ([2, 3, 4, 8, 16][u % 5], [0, 2, 3, 8][u % 4]),
        OptimBytes::AdamW,
    );
    check_memory_model(
        &all,
        |u| ([16, 8, 2, 3, 4][u % 5], [3, 8, 0][u % 3]),
        OptimBytes::AdamW8bit,
    );
}

#[test]
fn gp_posterior_matches_the_closed_form() {
    // One observation (x0 = 0, y0 = 1): the prior mean is 1 and the signal variance (no spread) 1;
    // posterior mean at z is 1 + k(z,0)/(1 + noise) · 0 = 1 and variance 1 − k²/(1 + noise).
    let gp = Gp::fit(&[vec![0.0]], &[1.0], 1.0, 0.0).unwrap();
    let k = matern52(&[0.5], &[0.0], 1.0, 1.0);
    let s = 5f64.sqrt() * 0.5;
    assert!((k - (1.0 + s + s * s / 3.0) * (-s).exp()).abs() < 1e-15);
    let (mu, var) = gp.predict(&[0.5]);
    assert!((mu - 1.0).abs() < 1e-12);
    assert!((var - (1.0 - k * k)).abs() < 1e-8, "{var}");
    // Two observations y = (0, 1) at x = 0, 1: mean 0.5, signal variance 0.25, K = 0.25 [[1, c], [c, 1]]
    // with c = matern(1). At x = 0 the posterior interpolates y0.
    let noise = 1e-3;
    let gp = Gp::fit(&[vec![0.0], vec![1.0]], &[0.0, 1.0], 1.0, noise).unwrap();
    let c = matern52(&[0.0], &[1.0], 1.0, 0.25);
    let z = [0.3];
    let k0 = matern52(&z, &[0.0], 1.0, 0.25);
    let k1 = matern52(&z, &[1.0], 1.0, 0.25);
    // (K + nI)^-1 for [[a, c], [c, a]]: [[a, -c], [-c, a]] / (a² − c²).
    let a = 0.25 + noise + 1e-10 * 0.25;
    let det = a * a - c * c;
    let (w0, w1) = ((a * k0 - c * k1) / det, (a * k1 - c * k0) / det);
    let mu_exact = 0.5 + w0 * -0.5 + w1 * 0.5;
    let var_exact = 0.25 - (k0 * w0 + k1 * w1);
    let (mu, var) = gp.predict(&z);
    assert!((mu - mu_exact).abs() < 1e-10, "{mu} vs {mu_exact}");
    assert!((var - var_exact).abs() < 1e-10, "{var} vs {var_exact}");
    assert!(Gp::fit(&[], &[], 1.0, 0.0).is_err());
    assert!(Gp::fit(&[vec![0.0]], &[f64::NAN], 1.0, 0.0).is_err());
    assert!(Gp::fit(&[vec![0.0]], &[1.0], 0.0, 0.0).is_err());
}

#[test]
fn expected_improvement_known_values() {
    // mu = best, sigma = 1: EI = φ(0) = 1/√(2π).
    assert!((expected_improvement(0.0, 1.0, 0.0, 0.0) - 0.398_942_280_401_432_7).abs() < 1e-12);
    // mu − best = 1, sigma = 1: Φ(1) + φ(1) = 0.841344746068543 + 0.241970724519143.
    assert!((expected_improvement(1.0, 1.0, 0.0, 0.0) - 1.083_315_470_587_686).abs() < 1e-9);
    // No uncertainty: the plain improvement.
    assert_eq!(expected_improvement(2.0, 0.0, 0.5, 0.0), 1.5);
    assert_eq!(expected_improvement(0.0, 0.0, 0.5, 0.0), 0.0);
    assert!((normal_cdf(0.0) - 0.5).abs() < 1e-15);
    assert!((normal_pdf(0.0) - 0.398_942_280_401_432_7).abs() < 1e-15);
}

/// A deterministic stand-in for fine-tuning: the score rewards bits and rank on the "important"
/// units, plus a hash-based wobble; it counts evaluations and can fail after N.
struct Fake {
    calls: usize,
    fail_after: Option<usize>,
}

impl Evaluator for Fake {
    fn sensitivity(&mut self, space: &SearchSpace) -> Result<(Vec<f64>, Vec<f64>)> {
        let n = space.genes();
        Ok((
            // The tables (when searched) barely change the output, as bf16 tables do on MiniLM.
            (0..n)
                .map(|u| {
                    if Some(u) == space.embedding_gene() {
                        0.0
                    } else {
                        (u % 3) as f64
                    }
                })
                .collect(),
            (0..n).map(|u| ((u + 1) % 4) as f64).collect(),
        ))
    }
    fn evaluate(&mut self, space: &SearchSpace, c: &Candidate, f: Fidelity) -> Result<f64> {
        if self.fail_after.is_some_and(|n| self.calls >= n) {
            return Err(peft_kernels::Error::InvalidArgument("killed".into()));
        }
        self.calls += 1;
        let mut s = 0.0;
        for (u, (b, r)) in space.describe(c).into_iter().enumerate() {
            let w = 1.0 + (u % 3) as f64;
            s += w * (1.0 - (-(b as f64)).exp2()) + 0.01 * (r as f64).sqrt() * ((u + 1) % 4) as f64;
        }
        let h = c.0.iter().fold(7u64, |h, ch| {
            h.wrapping_mul(31).wrapping_add((ch.bits * 5 + ch.rank) as u64)
        });
        let bonus = if f == Fidelity::High { 0.05 } else { 0.0 };
        Ok(s / 10.0 + (h % 97) as f64 * 1e-4 + bonus)
    }
}

fn search_setup() -> (SearchSpace, MemoryModel, SearchConfig) {
    let ls: Vec<LinearShape> = (0..8)
        .map(|k| lin(format!("enc.layer.{}.l{k}", k / 2), 96, 64))
        .collect();
    let space = SearchSpace::new(
        units(&ls, Granularity::Layer),
        vec![Tier::Bits2, Tier::Bits4, Tier::Bits8, Tier::Bits16],
        vec![0, 4, 8],
    )
    .unwrap();
    let m = mem(OptimBytes::AdamW, true);
    let mid = m.total(&space, &space.uniform(1, 2));
    let cfg = SearchConfig {
        population: 6,
        generations: 4,
        seed: 11,
        budget_bytes: mid,
        high_fidelity: 2,
        patience: 3,
        phase3: 3,
        references: vec![space.uniform(1, 2), space.uniform(1, 1)],
        seeds: vec![space.uniform(0, 2), space.uniform(3, 2)],
        evaluator: "fake".into(),
    };
    (space, m, cfg)
}

fn run_fake(
    dir: &Path,
    cfg: &SearchConfig,
    fail_after: Option<usize>,
) -> (Result<search::SearchResult>, usize) {
    let (space, m, _) = search_setup();
    let mut ev = Fake { calls: 0, fail_after };
    let r = search::run(&space, &m, cfg, &mut ev, &dir.join(search::LOG_FILE));
    (r, ev.calls)
}

#[test]
fn search_is_deterministic_and_resumes_from_a_truncated_log() {
    let (space, m, cfg) = search_setup();
    let d1 = tempfile::tempdir().unwrap();
    let (r1, calls) = run_fake(d1.path(), &cfg, None);
    let r1 = r1.unwrap();
    assert!(r1.best.memory <= cfg.budget_bytes);
    assert!(r1.best.high.is_some());
    assert!(
        r1.evaluated
            .iter()
            .all(|e| e.memory == m.total(&space, &e.candidate))
    );
    assert!(!r1.front.is_empty());
    // The found configuration scores at least the uniform reference at the budget.
    let reference = r1
        .evaluated
        .iter()
        .find(|e| e.candidate == space.uniform(1, 2))
        .unwrap();
    assert!(r1.best.low >= reference.low);
    // The seeds join the initial population: the 2-bit one fits the budget as it is, the 16-bit one
    // is over it, so it is evaluated only as repaired.
    assert!(r1.evaluated.iter().any(|e| e.candidate == space.uniform(0, 2)));
    assert!(m.total(&space, &space.uniform(3, 2)) > cfg.budget_bytes);
    assert!(!r1.evaluated.iter().any(|e| e.candidate == space.uniform(3, 2)));
    // Same seed, fresh directory: the same search.
    let d2 = tempfile::tempdir().unwrap();
    let (r2, _) = run_fake(d2.path(), &cfg, None);
    let r2 = r2.unwrap();
    assert_eq!(r1.best, r2.best);
    assert_eq!(r1.evaluated, r2.evaluated);
    let log1 = std::fs::read_to_string(d1.path().join(search::LOG_FILE)).unwrap();
    assert_eq!(
        log1,
        std::fs::read_to_string(d2.path().join(search::LOG_FILE)).unwrap()
    );
    assert_eq!(
        log1.lines().count(),
        3 + calls,
        "header, sensitivity, one line per evaluation, the rank stability"
    );
    assert_eq!(r1.rank_stability.n, cfg.high_fidelity);
    let last: serde_json::Value = serde_json::from_str(log1.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "stability");
    assert_eq!(last["n"].as_u64(), Some(cfg.high_fidelity as u64));
    // Rerun over a complete log: nothing is evaluated again.
    let (r3, calls3) = run_fake(d1.path(), &cfg, None);
    assert_eq!(calls3, 0);
    assert_eq!(r3.unwrap().best, r1.best);
    // Interrupted (the evaluator dies after half the work), with a torn last line: resumes to the
    // same result, evaluating only what is missing.
    let d3 = tempfile::tempdir().unwrap();
    let (r4, done) = run_fake(d3.path(), &cfg, Some(calls / 2));
    assert!(r4.is_err());
    let p = d3.path().join(search::LOG_FILE);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("{\"kind\":\"eval\",\"phase\":\"ns");
    std::fs::write(&p, text).unwrap();
    let (r5, rest) = run_fake(d3.path(), &cfg, None);
    let r5 = r5.unwrap();
    assert_eq!(r5.best, r1.best);
    assert_eq!(r5.evaluated, r1.evaluated);
    assert_eq!(done + rest, calls);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), log1);
    // Another seed: a log that belongs to another search is refused.
    let other = SearchConfig {
        seed: 12,
        ..cfg.clone()
    };
    assert!(run_fake(d1.path(), &other, None).0.is_err());
    // A different seed explores differently.
    let d4 = tempfile::tempdir().unwrap();
    let r6 = run_fake(d4.path(), &other, None).0.unwrap();
    assert_ne!(r6.evaluated, r1.evaluated);
}

#[test]
fn search_refuses_an_impossible_budget() {
    let (space, m, mut cfg) = search_setup();
    cfg.budget_bytes = m.total(&space, &lowest(&space)) - 1;
    cfg.references.clear();
    let d = tempfile::tempdir().unwrap();
    assert!(run_fake(d.path(), &cfg, None).0.is_err());
}

/// A WordPiece `tokenizer.json` for the tiny fixture's 53-token vocabulary.
fn tiny_tokenizer() -> String {
    let special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let words: Vec<String> = (0..40).map(|k| format!("w{k}")).collect();
    let vocab: serde_json::Map<String, serde_json::Value> = special
        .iter()
        .map(|s| s.to_string())
        .chain(words)
        .enumerate()
        .map(|(i, t)| (t, serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = special
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = |id: &str| serde_json::json!({"SpecialToken": {"id": id, "type_id": 0}});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [tok("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, tok("[SEP]")],
            "pair": [tok("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, tok("[SEP]"),
                {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// The tiny fixture with a tokenizer, and a 3-class data file whose class shows in its words.
fn tiny_task(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), model.join(f)).unwrap();
    }
    std::fs::write(model.join("tokenizer.json"), tiny_tokenizer()).unwrap();
    let mut lines = String::new();
    for k in 0..90usize {
        let c = k % 3;
        let words: Vec<String> = (0..6)
            .map(|j| format!("w{}", c * 10 + (k * 7 + j * 3) % 10))
            .collect();
        lines.push_str(&serde_json::json!({"text": words.join(" "), "class": c.to_string()}).to_string());
        lines.push('\n');
    }
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines).unwrap();
    (model, data)
}

#[test]
fn cli_qr_adapt_smoke_on_the_tiny_model() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = tiny_task(d.path());
    let out = d.path().join("out");
    let args: Vec<String> = [
        "qr-adapt",
        "--granularity",
        "layer",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--split",
        "0.3",
        "--bits",
        "4,16",
        "--ranks",
        "0,2,4",
        "--r",
        "2",
        "--alpha",
        "4",
        "--population",
        "4",
        "--generations",
        "2",
        "--low-examples",
        "24",
        "--high-examples",
        "40",
        "--calib",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-len",
        "12",
        "--phase3",
        "--phase3-iters",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let peftk = || assert_cmd::Command::new(env!("CARGO_BIN_EXE_peftk"));
    let o = peftk().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let budget = summary["budget_bytes"].as_u64().unwrap();
    assert!(summary["chosen"]["memory_bytes"].as_u64().unwrap() <= budget);
    let qc = QrConfig::load(&out).unwrap();
    assert_eq!(qc.units.len(), 13);
    assert!(qc.memory_bytes as u64 <= budget);
    // The adapter carries the chosen ranks.
    let ac: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    for u in qc.units.iter().filter(|u| u.rank > 0) {
        assert_eq!(
            ac["rank_pattern"][&u.modules[0]].as_u64(),
            Some(u.rank as u64),
            "{ac}"
        );
    }
    let svg = std::fs::read_to_string(out.join("pareto.svg")).unwrap();
    roxmltree::Document::parse(&svg).unwrap();
    assert!(
        std::fs::read(out.join("pareto.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    let log = std::fs::read_to_string(out.join(search::LOG_FILE)).unwrap();
    assert!(log.lines().count() > 5);
    // The tables' storage is searched by default: every logged configuration carries the gene
    // ((16, 0) bf16 or (32, 0) f32 after the 13 linears), and the choice is the file's.
    let header: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(header["space"]["embeddings"], serde_json::json!(["bf16", "f32"]));
    for l in log.lines().skip(2) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["kind"] == "eval" {
            let c = v["config"].as_array().unwrap();
            assert_eq!(c.len(), 14);
            assert!(c[13] == serde_json::json!([16, 0]) || c[13] == serde_json::json!([32, 0]));
        }
    }
    assert_eq!(
        summary["chosen"]["embeddings"],
        serde_json::to_value(qc.embeddings).unwrap()
    );
    // A rerun resumes from the log: no new evaluation, the same choice.
    let o = peftk().args(&args).arg("--no-final").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(out.join(search::LOG_FILE)).unwrap(), log);
    assert_eq!(QrConfig::load(&out).unwrap().units, qc.units);
    // finetune accepts the configuration.
    let ft = d.path().join("ft");
    let o = peftk()
        .args(["finetune", "--method", "qr-adaptor", "--qr-config"])
        .arg(out.join("qr_adaptor.json"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--split",
            "0.3",
        ])
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-len",
            "12",
            "--quiet",
            "--out",
        ])
        .arg(&ft)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(ft.join("adapter/adapter_model.safetensors").exists());
    // Without the file: a clear error.
    let o = peftk()
        .args([
            "finetune",
            "--method",
            "qr-adaptor",
            "--model",
            model.to_str().unwrap(),
        ])
        .args(["--data", data.to_str().unwrap(), "--split", "0.3", "--out"])
        .arg(d.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--qr-config"));
}

/// `peftk eval` / `predict` of a QR-Adaptor fine-tune load the base in the run's tiers and embedding
/// storage (from the `qr_adaptor.json` saved beside the adapter, or `--qr-config`): eval on the run's
/// own test split reproduces the run's accuracy, and the uniform NF4 base gives other probabilities.
#[test]
fn cli_eval_and_predict_use_the_qr_adaptor_storage() {
    use peft_kernels::data::{Columns, load_train_files};
    use peft_kernels::qr_adaptor::EmbeddingStorage;
    let d = tempfile::tempdir().unwrap();
    let (model, data) = tiny_task(d.path());
    // A configuration with every tier and bf16 embeddings, over the fixture's linears.
    let mut store = ParamStore::new();
    let m = models::from_pretrained_seq_cls(&model, &ModelLoadOptions::default(), &mut store, 0).unwrap();
    let (linears, _) = memory::for_seq_cls(&m, &store, OptimBytes::AdamW, 64, true).unwrap();
    let tiers = [Tier::Bits2, Tier::Bits3, Tier::Bits4, Tier::Bits8, Tier::Bits16];
    let space = SearchSpace::new(units(&linears, Granularity::Layer), tiers.to_vec(), vec![0, 2]).unwrap();
    let cand = Candidate(
        (0..space.units.len())
            .map(|u| Choice {
                bits: (u % tiers.len()) as u8,
                rank: (u % 4 != 3) as u8,
            })
            .collect(),
    );
    let mut qc =
        QrConfig::from_candidate(&space, &cand, Granularity::Layer, 2.0, &Default::default(), 0, 0).unwrap();
    qc.embeddings = EmbeddingStorage::Bf16;
    let cfg_dir = d.path().join("cfg");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    qc.save(&cfg_dir).unwrap();
    let peftk = || assert_cmd::Command::new(env!("CARGO_BIN_EXE_peftk"));
    let ft = d.path().join("ft");
    let o = peftk()
        .args(["finetune", "--method", "qr-adaptor", "--qr-config"])
        .arg(cfg_dir.join("qr_adaptor.json"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--split",
            "0.3",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--max-len",
            "12",
        ])
        .args(["--lr", "0.01", "--quiet", "--out"])
        .arg(&ft)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let adapter = ft.join("adapter");
    assert_eq!(QrConfig::load(&adapter).unwrap(), qc);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("summary.json")).unwrap()).unwrap();
    // The run's test split (seed 0), as a file.
    let cols = Columns {
        text: "text".into(),
        label: "class".into(),
    };
    let (_, test) = load_train_files(std::slice::from_ref(&data), &cols)
        .unwrap()
        .split(0.3, 0)
        .unwrap();
    let mut lines = String::new();
    for (t, &l) in test.texts.iter().zip(&test.labels) {
        let row = serde_json::json!({"text": t, "class": test.label_map.name(l).unwrap()});
        lines.push_str(&format!("{row}\n"));
    }
    let test_file = d.path().join("test.jsonl");
    std::fs::write(&test_file, lines).unwrap();
    let eval = |extra: &[&str]| -> serde_json::Value {
        let o = peftk()
            .args(["eval", "--model", model.to_str().unwrap(), "--adapter"])
            .arg(&adapter)
            .arg("--data")
            .arg(&test_file)
            .args(["--max-len", "12", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    let auto = eval(&[]);
    assert_eq!(auto["n"].as_u64(), Some(test.len() as u64));
    assert_eq!(
        auto["accuracy"].as_f64(),
        summary["accuracy"].as_f64(),
        "{auto} vs {summary}"
    );
    let cfg_path = cfg_dir.join("qr_adaptor.json");
    let explicit = eval(&["--qr-config", cfg_path.to_str().unwrap()]);
    assert_eq!(explicit, auto);
    let predict = |adapter: &Path| -> Vec<f64> {
        let o = peftk()
            .args(["predict", "--model", model.to_str().unwrap(), "--adapter"])
            .arg(adapter)
            .arg("--data")
            .arg(&test_file)
            .args(["--max-len", "12", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["prob"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let with_tiers = predict(&adapter);
    assert_eq!(with_tiers.len(), test.len());
    // The same adapter without its qr_adaptor.json loads a uniform NF4 base: other numbers.
    let bare = d.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for e in std::fs::read_dir(&adapter).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "qr_adaptor.json" {
            std::fs::copy(&p, bare.join(p.file_name().unwrap())).unwrap();
        }
    }
    let uniform = predict(&bare);
    assert_eq!(uniform.len(), with_tiers.len());
    assert_ne!(uniform, with_tiers);
    // A broken --qr-config is an error, not a silent uniform load.
    let o = peftk()
        .args(["eval", "--model", model.to_str().unwrap(), "--adapter"])
        .arg(&adapter)
        .arg("--data")
        .arg(&test_file)
        .args(["--qr-config", d.path().join("missing.json").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn spearman_against_hand_computed_ranks() {
    // Identical order: 1; reversed: -1.
    assert_eq!(search::spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
    assert_eq!(search::spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
    // Ranks x (1, 2, 3, 4), y (2, 1, 4, 3): d² = 4, rho = 1 - 6·4 / (4·15) = 0.6.
    let r = search::spearman(&[0.1, 0.2, 0.3, 0.4], &[5.0, 1.0, 9.0, 7.0]).unwrap();
    assert!((r - 0.6).abs() < 1e-12, "{r}");
    // Ties take their average rank: x ranks (1.5, 1.5, 3), y (1, 2, 3); Pearson of the ranks:
    // centred x (-0.5, -0.5, 1), y (-1, 0, 1): 1.5 / sqrt(1.5 · 2) = 0.866...
    let r = search::spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]).unwrap();
    assert!((r - 1.5 / 3f64.sqrt()).abs() < 1e-12, "{r}");
    assert_eq!(search::spearman(&[1.0], &[1.0]), None);
    assert_eq!(search::spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    assert_eq!(search::spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
    assert_eq!(search::spearman(&[1.0, 2.0], &[1.0]), None);
}

/// bf16 embedding tables: the memory model's fixed part shrinks by exactly half the tables' f32
/// bytes and matches the loaded model; the forward equals an f32 model whose tables hold the same
/// bf16-rounded values (gather then cast = cast then gather), and differs from the f32 original.
#[test]
fn bf16_embeddings_are_counted_exactly_and_only_round_the_tables() {
    use peft_kernels::models::BertBatch;
    use peft_kernels::tensor::DType;
    let mut store = ParamStore::new();
    let f32m = models::from_pretrained_seq_cls(tiny(), &ModelLoadOptions::default(), &mut store, 0).unwrap();
    let (linears, mm32) = memory::for_seq_cls(&f32m, &store, OptimBytes::AdamW, 64, true).unwrap();
    let c = f32m.bert().config().clone();
    let table_elems = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size;
    let mut bf = f32m.clone();
    bf.bert_mut().set_embedding_dtype(DType::BF16).unwrap();
    assert_eq!(bf.bert().embedding_dtype(), DType::BF16);
    let (_, mm16) = memory::for_seq_cls(&bf, &store, OptimBytes::AdamW, 64, true).unwrap();
    assert_eq!(mm32.fixed_frozen_bytes - mm16.fixed_frozen_bytes, 2 * table_elems);
    // A quantized load with bf16 tables holds exactly the predicted frozen bytes.
    let space = SearchSpace::new(units(&linears, Granularity::Layer), vec![Tier::Bits3], vec![0]).unwrap();
    let cand = space.uniform(0, 0);
    let (_, mut qm, _) = load_tiered(&space, &cand, &mm16);
    qm.bert_mut().set_embedding_dtype(DType::BF16).unwrap();
    let b = mm16.breakdown(&space, &cand);
    assert_eq!(qm.bert().frozen_bytes(), b.base + b.fixed_frozen);
    // Forward: bf16 tables vs f32 tables holding the bf16-rounded values.
    let mut rounded = bf.clone();
    rounded.bert_mut().set_embedding_dtype(DType::F32).unwrap();
    let ids = vec![vec![2u32, 7, 11, 3, 0], vec![2, 5, 9, 3, 0]];
    let mask = vec![vec![1u8, 1, 1, 1, 0], vec![1, 1, 1, 1, 1]];
    let batch = BertBatch::from_rows(&ids, &mask, None).unwrap();
    let l16 = bf.logits(&store, &batch).unwrap().to_vec_f32().unwrap();
    let lr = rounded.logits(&store, &batch).unwrap().to_vec_f32().unwrap();
    let l32 = f32m.logits(&store, &batch).unwrap().to_vec_f32().unwrap();
    assert_eq!(l16, lr);
    assert_ne!(l16, l32);
    assert!(bf.bert_mut().set_embedding_dtype(DType::U8).is_err());
}

/// The embedding gene: (16, 0) / (32, 0) in descriptions, f32 as loaded in `uniform`, bf16 in
/// `lowest`; the memory model counts the tables at the chosen storage; repair spends the table step
/// first when it is the cheapest per byte and keeps it for last when the linears are cheaper.
#[test]
fn embedding_gene_describes_counts_and_repairs() {
    let ls = [lin("a.0.q".into(), 128, 128), lin("a.1.q".into(), 128, 128)];
    let space = SearchSpace::new(
        units(&ls, Granularity::Layer),
        vec![Tier::Bits4, Tier::Bits16],
        vec![0],
    )
    .unwrap()
    .with_embeddings(vec![EmbeddingStorage::F32, EmbeddingStorage::Bf16]);
    assert_eq!(
        space.embeddings,
        vec![EmbeddingStorage::Bf16, EmbeddingStorage::F32]
    );
    assert_eq!(
        (space.genes(), space.embedding_gene(), space.levels(2)),
        (3, Some(2), (2, 1))
    );
    let top = space.uniform(1, 0);
    assert_eq!(space.describe(&top), vec![(16, 0), (16, 0), (32, 0)]);
    assert_eq!(space.from_values(&space.describe(&top)).unwrap(), top);
    assert_eq!(space.embedding_of(&top), Some(EmbeddingStorage::F32));
    assert_eq!(space.embedding_of(&lowest(&space)), Some(EmbeddingStorage::Bf16));
    assert!(space.from_values(&[(16, 0), (16, 0), (8, 0)]).is_err());
    assert!(space.from_values(&[(16, 0), (16, 0)]).is_err());
    assert!(space.check(&Candidate(top.0[..2].to_vec())).is_err());
    let m = mem(OptimBytes::AdamW, false);
    // The tables: 700 elements, 4 bytes each as loaded, 2 in bf16.
    let bf = space.from_values(&[(16, 0), (16, 0), (16, 0)]).unwrap();
    assert_eq!(m.total(&space, &top) - m.total(&space, &bf), 1400);
    assert_eq!(m.breakdown(&space, &bf).fixed_frozen, 5_000 - 1400);
    // Without the gene the fixed part is as loaded.
    let plain = SearchSpace::new(space.units.clone(), space.bits.clone(), space.ranks.clone()).unwrap();
    assert_eq!(m.breakdown(&plain, &plain.uniform(1, 0)).fixed_frozen, 5_000);
    // Budget: one step. Tables insensitive: the table step (1,400 bytes for ~0 cost) is taken even
    // though a linear step saves more bytes.
    let budget = m.total(&space, &top) - 1000;
    let s = Sensitivity {
        fidelity: vec![0.9, 0.9, 0.0],
        plasticity: vec![0.0, 0.0, 0.0],
    };
    assert_eq!(repair(&space, &m, &s, &top, budget).unwrap(), bf);
    // Tables very sensitive, one linear not at all: that linear goes to 4 bits and the tables stay.
    let s = Sensitivity {
        fidelity: vec![0.9, 0.0, 1.0],
        plasticity: vec![0.0, 0.0, 0.0],
    };
    assert_eq!(
        repair(&space, &m, &s, &top, budget).unwrap(),
        space.from_values(&[(16, 0), (4, 0), (32, 0)]).unwrap()
    );
    // Everything lowest, tables included, is the floor.
    let floor = m.total(&space, &lowest(&space));
    assert!(repair(&space, &m, &s, &top, floor - 1).is_err());
    assert_eq!(repair(&space, &m, &s, &top, floor).unwrap(), lowest(&space));
}

/// A searched table storage is counted exactly: loads of the tiny fixture with the tiers, adapters and
/// table storage of candidates whose gene is bf16 or f32 hold the predicted frozen and trainable bytes,
/// whether the memory model was counted from an f32 or a bf16 load.
#[test]
fn searched_embedding_storage_is_counted_exactly() {
    use peft_kernels::tensor::DType;
    let mut store = ParamStore::new();
    let dense = models::from_pretrained_seq_cls(tiny(), &ModelLoadOptions::default(), &mut store, 0).unwrap();
    let (linears, mm32) = memory::for_seq_cls(&dense, &store, OptimBytes::AdamW, 64, true).unwrap();
    let mut bf = dense.clone();
    bf.bert_mut().set_embedding_dtype(DType::BF16).unwrap();
    let (_, mm16) = memory::for_seq_cls(&bf, &store, OptimBytes::AdamW, 64, true).unwrap();
    assert_eq!(mm16.tables.unwrap().loaded, EmbeddingStorage::Bf16);
    let space = SearchSpace::new(
        units(&linears, Granularity::Layer),
        Tier::ALL.to_vec(),
        vec![0, 2, 8],
    )
    .unwrap()
    .with_embeddings(vec![EmbeddingStorage::Bf16, EmbeddingStorage::F32]);
    for table_bits in [16u8, 32] {
        let mut vals: Vec<(u8, usize)> = (0..space.units.len())
            .map(|u| ([2, 3, 4, 8, 16][u % 5], [0, 2, 8][u % 3]))
            .collect();
        vals.push((table_bits, 0));
        let cand = space.from_values(&vals).unwrap();
        let (qc, mut model, mut store) = load_tiered(&space, &cand, &mm32);
        let want = if table_bits == 16 {
            EmbeddingStorage::Bf16
        } else {
            EmbeddingStorage::F32
        };
        assert_eq!(qc.embeddings, want);
        if let Some(dt) = qc.embeddings.dtype() {
            model.bert_mut().set_embedding_dtype(dt).unwrap();
        }
        let mut ac = qc.adapter_config(0.0).unwrap().unwrap();
        ac.task_type = Some("SEQ_CLS".into());
        ac.modules_to_save = Some(vec!["classifier".into()]);
        model.init_adapter(&ac, &mut store, 1).unwrap();
        for mm in [&mm32, &mm16] {
            let b = mm.breakdown(&space, &cand);
            assert_eq!(
                model.bert().frozen_bytes(),
                b.base + b.fixed_frozen,
                "tables {table_bits}"
            );
            let params: usize = model
                .param_ids()
                .iter()
                .map(|&id| store.get(id).unwrap().size_in_bytes())
                .sum();
            assert_eq!(params, b.params);
        }
    }
}

/// A search with the embedding gene: every evaluated configuration carries it, the budget (uniform
/// 4-bit at rank 8 with f32 tables) holds, and a rerun resumes from the log without evaluating.
#[test]
fn search_with_the_embedding_gene_resumes() {
    let (space, m, mut cfg) = search_setup();
    let space = space.with_embeddings(vec![EmbeddingStorage::Bf16, EmbeddingStorage::F32]);
    cfg.references = vec![space.uniform(1, 2), space.uniform(1, 1)];
    // Seeds carry the gene too: the 2-bit one with bf16 tables.
    let mut seed = space.uniform(0, 2);
    let g = space.embedding_gene().unwrap();
    seed.0[g].bits = 0;
    cfg.seeds = vec![seed.clone()];
    cfg.budget_bytes = m.total(&space, &space.uniform(1, 2));
    let d = tempfile::tempdir().unwrap();
    let mut ev = Fake {
        calls: 0,
        fail_after: None,
    };
    let p = d.path().join(search::LOG_FILE);
    let r = search::run(&space, &m, &cfg, &mut ev, &p).unwrap();
    assert!(ev.calls > 0);
    assert!(r.evaluated.iter().any(|e| e.candidate == seed));
    assert!(r.best.memory <= cfg.budget_bytes);
    assert!(
        r.evaluated
            .iter()
            .all(|e| e.candidate.0.len() == space.genes() && e.memory == m.total(&space, &e.candidate))
    );
    // Both storages were tried (sensitivity-shaped starts put insensitive tables in bf16).
    assert!(
        r.evaluated
            .iter()
            .any(|e| space.embedding_of(&e.candidate) == Some(EmbeddingStorage::Bf16))
    );
    assert_eq!(r.sensitivity.plasticity[space.genes() - 1], 0.0);
    let mut ev2 = Fake {
        calls: 0,
        fail_after: None,
    };
    let r2 = search::run(&space, &m, &cfg, &mut ev2, &p).unwrap();
    assert_eq!(ev2.calls, 0);
    assert_eq!(r2.best, r.best);
}
