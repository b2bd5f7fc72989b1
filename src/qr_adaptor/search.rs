//! The QR-Adaptor search driver over an [`Evaluator`] (the thing that fine-tunes and scores):
//!
//! 1. Phase I: per-unit sensitivity (fidelity and plasticity signals), normalized.
//! 2. Warm start: the reference configurations, the seed configurations (e.g. each bit-width
//!    uniformly), the all-highest configuration repaired by sensitivity, and sensitivity-shaped random
//!    configurations, each repaired into the budget.
//! 3. Phase II: NSGA-II on (score, memory) with low-fidelity scores (short fine-tunes), stopped early
//!    when the hypervolume of the feasible front has not grown for `patience` generations.
//! 4. Phase III (optional): Gaussian-process expected improvement over repaired one-step neighbours
//!    of the Pareto set.
//! 5. High fidelity: the best few feasible configurations get a longer fine-tune; the best of them
//!    is the result.
//!
//! Every evaluation is appended to `search.jsonl` as it finishes. A rerun with the same log replays
//! the search: the logged scores are reused instead of re-evaluated, and because every random draw
//! comes from the seed the rerun takes the same path, so an interrupted search resumes to the same
//! result. A torn last line (a crash mid-write) is dropped.

use super::memory::MemoryModel;
use super::nsga2::{self, Objectives, Sensitivity};
use super::repair::repair;
use super::{Candidate, SearchSpace, gp};
use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How long a candidate is fine-tuned before it is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fidelity {
    /// Short fine-tune on a subset (every candidate).
    Low,
    /// Longer fine-tune (the best few).
    High,
}

/// Fine-tunes and scores configurations.
pub trait Evaluator {
    /// Raw per-gene (fidelity, plasticity) signals, e.g. the calibration loss increase when only
    /// that unit drops to the lowest bit-width, and the gradient norm of a fresh adapter on it; for
    /// the embedding gene (when searched, last) the fidelity of the tables alone at the cheapest
    /// storage, plasticity 0.
    fn sensitivity(&mut self, space: &SearchSpace) -> Result<(Vec<f64>, Vec<f64>)>;
    /// The task score (higher is better) of `cand` after a fine-tune of `fidelity`.
    fn evaluate(&mut self, space: &SearchSpace, cand: &Candidate, fidelity: Fidelity) -> Result<f64>;
    /// Called as a phase progresses (`done` of `total` steps); for progress bars.
    fn progress(&mut self, _phase: &str, _done: usize, _total: usize) {}
}

/// Search settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub population: usize,
    pub generations: usize,
    pub seed: u64,
    pub budget_bytes: usize,
    /// Configurations re-scored at high fidelity at the end.
    pub high_fidelity: usize,
    /// Generations without hypervolume growth before Phase II stops.
    pub patience: usize,
    /// Phase III evaluations (0: no Phase III).
    pub phase3: usize,
    /// Configurations evaluated first and shown for reference (e.g. uniform 4-bit QLoRA); they join
    /// the initial population when within budget.
    pub references: Vec<Candidate>,
    /// Configurations that join the initial population after the references, each repaired into the
    /// budget (e.g. every bit-width uniformly with the cheapest embedding storage): a population that
    /// starts at each tier, instead of one drawn only from sensitivity, does not have to find a good
    /// uniform configuration through noisy low-fidelity scores.
    #[serde(default)]
    pub seeds: Vec<Candidate>,
    /// The evaluator's settings that make its scores comparable (fidelities, storage of the fixed
    /// part); part of the header, so a resumed log must have been scored the same way.
    #[serde(default)]
    pub evaluator: String,
}

/// One evaluated configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluated {
    pub candidate: Candidate,
    pub memory: usize,
    pub low: f64,
    pub high: Option<f64>,
}

/// What a search found.
#[derive(Clone, Debug)]
pub struct SearchResult {
    pub best: Evaluated,
    /// Every evaluated configuration (first-evaluation order).
    pub evaluated: Vec<Evaluated>,
    /// Indices into `evaluated` of the feasible non-dominated set (low-fidelity scores).
    pub front: Vec<usize>,
    pub sensitivity: Sensitivity,
    pub generations_run: usize,
    /// Hypervolume after the initial population and after each generation.
    pub hypervolume: Vec<f64>,
    /// How well the low fidelity ranks candidates: Spearman's correlation between the low- and
    /// high-fidelity scores of the configurations scored at both.
    pub rank_stability: RankStability,
}

/// Spearman's rank correlation between low- and high-fidelity scores over the `n` configurations
/// scored at both (`None` when fewer than 2, or when one side is constant).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankStability {
    pub n: usize,
    pub spearman: Option<f64>,
}

/// One line of `search.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LogLine {
    /// The search the log belongs to (checked on resume).
    Header {
        space: SearchSpace,
        config: SearchConfig,
    },
    /// Phase I's raw and normalized signals.
    Sensitivity {
        fidelity_raw: Vec<f64>,
        plasticity_raw: Vec<f64>,
        normalized: Sensitivity,
    },
    /// One evaluation: `config` lists (bits, rank) per unit.
    Eval {
        phase: String,
        generation: usize,
        config: Vec<(u8, usize)>,
        fidelity: Fidelity,
        score: f64,
        memory: usize,
    },
    /// After the high-fidelity phase: how the low fidelity ranked the finalists (informational; a
    /// resumed search that ends the same way does not write it again).
    Stability(RankStability),
}

/// The log file of a search in `dir`.
pub const LOG_FILE: &str = "search.jsonl";

struct Log {
    path: PathBuf,
    file: std::fs::File,
    cache: BTreeMap<(Candidate, Fidelity), f64>,
    sensitivity: Option<(Vec<f64>, Vec<f64>)>,
    /// The last rank-stability line (a resumed search that ends the same way writes none).
    stability: Option<RankStability>,
}

impl Log {
    /// Opens (resuming) or creates the log; errors when it belongs to another search.
    fn open(path: &Path, space: &SearchSpace, config: &SearchConfig) -> Result<Self> {
        let header = LogLine::Header {
            space: space.clone(),
            config: config.clone(),
        };
        let mut cache = BTreeMap::new();
        let mut sensitivity = None;
        let mut stability = None;
        let mut valid = 0usize;
        let mut have_header = false;
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.split_inclusive('\n') {
                if !line.ends_with('\n') {
                    break; // torn last line
                }
                let Ok(l) = serde_json::from_str::<LogLine>(line) else {
                    break;
                };
                match l {
                    LogLine::Header { .. } => {
                        if l != header {
                            return Err(Error::invalid(format!(
                                "{}: the log belongs to another search (space or settings differ); use another --out or remove it",
                                path.display()
                            )));
                        }
                        have_header = true;
                    }
                    LogLine::Sensitivity {
                        fidelity_raw,
                        plasticity_raw,
                        ..
                    } => sensitivity = Some((fidelity_raw, plasticity_raw)),
                    LogLine::Eval {
                        config,
                        fidelity,
                        score,
                        ..
                    } => {
                        cache.insert((space.from_values(&config)?, fidelity), score);
                    }
                    LogLine::Stability(s) => stability = Some(s),
                }
                valid += line.len();
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(valid as u64).map_err(|e| Error::io(path, e))?;
        let mut log = Log {
            path: path.to_path_buf(),
            file,
            cache,
            sensitivity,
            stability,
        };
        use std::io::Seek;
        log.file
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        if !have_header {
            if valid > 0 {
                return Err(Error::invalid(format!("{}: no header line", path.display())));
            }
            log.append(&header)?;
        }
        Ok(log)
    }

    fn append(&mut self, l: &LogLine) -> Result<()> {
        let s = serde_json::to_string(l).map_err(|e| Error::invalid(e.to_string()))?;
        writeln!(self.file, "{s}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

struct Driver<'a, E: Evaluator> {
    space: &'a SearchSpace,
    mem: &'a MemoryModel,
    cfg: &'a SearchConfig,
    ev: &'a mut E,
    log: Log,
    evaluated: Vec<Evaluated>,
    index: BTreeMap<Candidate, usize>,
}

impl<E: Evaluator> Driver<'_, E> {
    fn score(&mut self, c: &Candidate, fid: Fidelity, phase: &str, generation: usize) -> Result<f64> {
        let memory = self.mem.total(self.space, c);
        let score = match self.log.cache.get(&(c.clone(), fid)) {
            Some(&s) => s,
            None => {
                let s = self.ev.evaluate(self.space, c, fid)?;
                if !s.is_finite() {
                    return Err(Error::invalid(format!("the evaluator returned a score of {s}")));
                }
                let s = as_logged(s);
                self.log.append(&LogLine::Eval {
                    phase: phase.into(),
                    generation,
                    config: self.space.describe(c),
                    fidelity: fid,
                    score: s,
                    memory,
                })?;
                self.log.cache.insert((c.clone(), fid), s);
                s
            }
        };
        let i = match self.index.get(c) {
            Some(&i) => i,
            None => {
                self.evaluated.push(Evaluated {
                    candidate: c.clone(),
                    memory,
                    low: f64::NAN,
                    high: None,
                });
                self.index.insert(c.clone(), self.evaluated.len() - 1);
                self.evaluated.len() - 1
            }
        };
        match fid {
            Fidelity::Low => self.evaluated[i].low = score,
            Fidelity::High => self.evaluated[i].high = Some(score),
        }
        Ok(score)
    }

    fn objectives(&self, cands: &[Candidate]) -> Vec<Objectives> {
        cands
            .iter()
            .map(|c| {
                let e = &self.evaluated[self.index[c]];
                Objectives::new(e.low, e.memory as f64, self.cfg.budget_bytes as f64)
            })
            .collect()
    }

    fn hypervolume(&self) -> f64 {
        let all: Vec<Objectives> = self
            .evaluated
            .iter()
            .filter(|e| e.low.is_finite())
            .map(|e| Objectives::new(e.low, e.memory as f64, self.cfg.budget_bytes as f64))
            .collect();
        nsga2::hypervolume(&all, 0.0, self.cfg.budget_bytes as f64)
    }

    /// Evaluates each at low fidelity, reporting progress.
    fn score_all(&mut self, cands: &[Candidate], phase: &str, generation: usize) -> Result<()> {
        for (k, c) in cands.iter().enumerate() {
            self.ev.progress(phase, k, cands.len());
            self.score(c, Fidelity::Low, phase, generation)?;
        }
        self.ev.progress(phase, cands.len(), cands.len());
        Ok(())
    }
}

/// `x` as a resumed search reads it back from the log: serde_json's default float parser may differ
/// from the printed value in the last bit, so a fresh run uses the parsed value too and a resumed one
/// takes exactly the same path.
fn as_logged(x: f64) -> f64 {
    serde_json::to_string(&x)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(x)
}

/// Spearman's rank correlation of paired samples: Pearson's correlation of their ranks, ties given
/// their average rank. `None` for fewer than 2 pairs, unequal lengths, a non-finite value or a
/// constant side.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let ranks = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for &k in &idx[i..=j] {
                r[k] = avg;
            }
            i = j + 1;
        }
        r
    };
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some(sxy / (sxx * syy).sqrt())
}

/// Features of a candidate for the GP: per gene, the bit (or storage) and rank positions scaled to
/// [0, 1].
pub fn features(space: &SearchSpace, c: &Candidate) -> Vec<f64> {
    c.0.iter()
        .enumerate()
        .flat_map(|(g, ch)| {
            let (nb, nr) = space.levels(g);
            let (nb, nr) = ((nb.max(2) - 1) as f64, (nr.max(2) - 1) as f64);
            [ch.bits as f64 / nb, ch.rank as f64 / nr]
        })
        .collect()
}

fn sensitivity_shaped(rng: &mut Rng, space: &SearchSpace, sens: &Sensitivity) -> Candidate {
    let pick = |rng: &mut Rng, s: f64, n: usize| {
        let x = (s + 0.6 * (rng.uniform_f64() - 0.5)).clamp(0.0, 1.0);
        ((x * (n - 1) as f64).round() as usize).min(n - 1) as u8
    };
    Candidate(
        (0..space.genes())
            .map(|u| {
                let (nb, nr) = space.levels(u);
                super::Choice {
                    bits: pick(rng, sens.fidelity[u], nb),
                    rank: pick(rng, sens.plasticity[u], nr),
                }
            })
            .collect(),
    )
}

/// Runs (or resumes) a search, logging to `log_path`.
pub fn run<E: Evaluator>(
    space: &SearchSpace,
    mem: &MemoryModel,
    cfg: &SearchConfig,
    ev: &mut E,
    log_path: &Path,
) -> Result<SearchResult> {
    if cfg.population < 2 {
        return Err(Error::invalid("the population must be at least 2"));
    }
    for r in cfg.references.iter().chain(&cfg.seeds) {
        space.check(r)?;
    }
    let log = Log::open(log_path, space, cfg)?;
    let mut d = Driver {
        space,
        mem,
        cfg,
        ev,
        log,
        evaluated: Vec::new(),
        index: BTreeMap::new(),
    };
    let mut rng = Rng::new(cfg.seed ^ 0x9a_ad_a9_70);

    // Phase I.
    let (f_raw, p_raw) = match d.log.sensitivity.clone() {
        Some(s) => s,
        None => {
            d.ev.progress("sensitivity", 0, 1);
            let s = d.ev.sensitivity(space)?;
            d.ev.progress("sensitivity", 1, 1);
            s
        }
    };
    if f_raw.len() != space.genes() || p_raw.len() != space.genes() {
        return Err(Error::invalid(format!(
            "sensitivity has {} / {} values for {} genes",
            f_raw.len(),
            p_raw.len(),
            space.genes()
        )));
    }
    // Fidelity is one signal for every gene (the tables' too); plasticity exists for the units only
    // (the tables take no adapter): normalized over them, 0 for the embedding gene.
    let n_units = space.units.len();
    let mut sens = Sensitivity::normalized(&f_raw, &p_raw[..n_units]);
    sens.plasticity.resize(space.genes(), 0.0);
    if d.log.sensitivity.is_none() {
        d.log.append(&LogLine::Sensitivity {
            fidelity_raw: f_raw.clone(),
            plasticity_raw: p_raw.clone(),
            normalized: sens.clone(),
        })?;
        d.log.sensitivity = Some((f_raw, p_raw));
    }
    let budget = cfg.budget_bytes;
    let fix = |c: &Candidate| repair(space, mem, &sens, c, budget);

    // Warm start.
    let top = space.uniform(space.bits.len() - 1, space.ranks.len() - 1);
    let mut pop: Vec<Candidate> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut push = |pop: &mut Vec<Candidate>, c: Candidate| {
        if seen.insert(c.clone()) {
            pop.push(c);
        }
    };
    d.score_all(&cfg.references, "reference", 0)?;
    for r in &cfg.references {
        if mem.total(space, r) <= budget {
            push(&mut pop, r.clone());
        }
    }
    for c in &cfg.seeds {
        push(&mut pop, fix(c)?);
    }
    push(&mut pop, fix(&top)?);
    let mut tries = 0;
    while pop.len() < cfg.population && tries < 50 * cfg.population {
        tries += 1;
        let c = sensitivity_shaped(&mut rng, space, &sens);
        push(&mut pop, fix(&c)?);
    }
    pop.truncate(cfg.population.max(1));
    d.score_all(&pop, "init", 0)?;
    let mut hv = vec![d.hypervolume()];

    // Phase II.
    let p_mut = (1.5 / space.genes() as f64).min(1.0);
    let mut stale = 0;
    let mut generations_run = 0;
    for g in 1..=cfg.generations {
        let objs = d.objectives(&pop);
        let (rank, crowd) = nsga2::rank_and_crowding(&objs);
        let mut kids = Vec::with_capacity(cfg.population);
        let mut tries = 0;
        while kids.len() < cfg.population && tries < 20 * cfg.population {
            tries += 1;
            let a = &pop[nsga2::tournament(&mut rng, &rank, &crowd)];
            let b = &pop[nsga2::tournament(&mut rng, &rank, &crowd)];
            let child = nsga2::crossover(&mut rng, a, b);
            let child = fix(&nsga2::mutate(&mut rng, space, &sens, &child, p_mut))?;
            if !pop.contains(&child) && !kids.contains(&child) {
                kids.push(child);
            }
        }
        d.score_all(&kids, "nsga2", g)?;
        let mut all = pop.clone();
        all.extend(kids);
        let objs = d.objectives(&all);
        pop = nsga2::select(&objs, cfg.population)
            .into_iter()
            .map(|i| all[i].clone())
            .collect();
        generations_run = g;
        let h = d.hypervolume();
        let prev = hv.iter().copied().fold(0.0, f64::max);
        stale = if h > prev + 1e-9 * prev.abs().max(1.0) {
            0
        } else {
            stale + 1
        };
        hv.push(h);
        if cfg.patience > 0 && stale >= cfg.patience {
            break;
        }
    }

    // Phase III.
    for it in 0..cfg.phase3 {
        d.ev.progress("phase3", it, cfg.phase3);
        let feas: Vec<&Evaluated> = d
            .evaluated
            .iter()
            .filter(|e| e.memory <= budget && e.low.is_finite())
            .collect();
        if feas.is_empty() {
            break;
        }
        let x: Vec<Vec<f64>> = feas.iter().map(|e| features(space, &e.candidate)).collect();
        let y: Vec<f64> = feas.iter().map(|e| e.low).collect();
        let best = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ls = 0.5 * (x[0].len() as f64).sqrt();
        let model = gp::Gp::fit(&x, &y, ls, 1e-4)?;
        let objs: Vec<Objectives> = feas
            .iter()
            .map(|e| Objectives::new(e.low, e.memory as f64, budget as f64))
            .collect();
        let front: Vec<Candidate> = nsga2::non_dominated_sort(&objs)
            .first()
            .map(|f| f.iter().map(|&i| feas[i].candidate.clone()).collect())
            .unwrap_or_default();
        let mut pool: BTreeSet<Candidate> = BTreeSet::new();
        for c in &front {
            for _ in 0..8 {
                let n = fix(&nsga2::mutate(&mut rng, space, &sens, c, p_mut))?;
                if !d.index.contains_key(&n) {
                    pool.insert(n);
                }
            }
        }
        let pick = pool
            .into_iter()
            .map(|c| {
                let (mu, var) = model.predict(&features(space, &c));
                (gp::expected_improvement(mu, var, best, 0.0), c)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        match pick {
            Some((_, c)) => {
                d.score(&c, Fidelity::Low, "phase3", it + 1)?;
            }
            None => break,
        }
    }
    if cfg.phase3 > 0 {
        d.ev.progress("phase3", cfg.phase3, cfg.phase3);
    }

    // High fidelity for the best few feasible.
    let mut order: Vec<usize> = (0..d.evaluated.len())
        .filter(|&i| d.evaluated[i].memory <= budget && d.evaluated[i].low.is_finite())
        .collect();
    if order.is_empty() {
        return Err(Error::invalid("no configuration within the budget was evaluated"));
    }
    order.sort_by(|&a, &b| {
        let (ea, eb) = (&d.evaluated[a], &d.evaluated[b]);
        eb.low
            .total_cmp(&ea.low)
            .then(ea.memory.cmp(&eb.memory))
            .then(a.cmp(&b))
    });
    let n_high = cfg.high_fidelity.max(1).min(order.len());
    let finalists: Vec<Candidate> = order[..n_high]
        .iter()
        .map(|&i| d.evaluated[i].candidate.clone())
        .collect();
    for (k, c) in finalists.iter().enumerate() {
        d.ev.progress("high-fidelity", k, n_high);
        d.score(c, Fidelity::High, "high", 0)?;
    }
    d.ev.progress("high-fidelity", n_high, n_high);
    let best = finalists
        .iter()
        .map(|c| d.evaluated[d.index[c]].clone())
        .reduce(|a, b| {
            let (sa, sb) = (a.high.unwrap_or(a.low), b.high.unwrap_or(b.low));
            if sb > sa || (sb == sa && b.memory < a.memory) {
                b
            } else {
                a
            }
        })
        .ok_or_else(|| Error::invalid("no finalist"))?;
    let (lo, hi): (Vec<f64>, Vec<f64>) = d
        .evaluated
        .iter()
        .filter_map(|e| e.high.map(|h| (e.low, h)))
        .unzip();
    let rank_stability = RankStability {
        n: lo.len(),
        spearman: spearman(&lo, &hi).map(as_logged),
    };
    if d.log.stability != Some(rank_stability) {
        d.log.append(&LogLine::Stability(rank_stability))?;
    }
    let objs: Vec<Objectives> = d
        .evaluated
        .iter()
        .map(|e| Objectives::new(e.low, e.memory as f64, budget as f64))
        .collect();
    let front = nsga2::non_dominated_sort(&objs)
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .filter(|&i| objs[i].feasible())
        .collect();
    Ok(SearchResult {
        best,
        evaluated: d.evaluated,
        front,
        sensitivity: sens,
        generations_run,
        hypervolume: hv,
        rank_stability,
    })
}
