//! QR-Adaptor (Zhou et al., "Efficient Fine-Tuning of Quantized Models via Adaptive Rank and
//! Bitwidth", arXiv 2505.03802): choose, per linear layer (or per transformer block), the storage
//! bit-width of the frozen base weight and the rank of its LoRA adapter jointly, scored on the
//! downstream task, under a memory budget.
//!
//! This module is pure (no CLI, no model loading): the search space and candidates ([`SearchSpace`],
//! [`Candidate`]), the memory model ([`memory`]), NSGA-II ([`nsga2`]), the budget repair
//! ([`repair`]), the Gaussian-process refinement ([`gp`]) and the search driver over an
//! [`search::Evaluator`] ([`search`]). The result is written as `qr_adaptor.json` ([`QrConfig`]),
//! which turns into a load-time tier map ([`QrConfig::tiers`]) and a PEFT LoRA config with
//! `rank_pattern` / `alpha_pattern` ([`QrConfig::adapter_config`]). Rank 0 leaves a linear without an
//! adapter (it is not in `target_modules`).

pub mod gp;
pub mod memory;
pub mod nsga2;
pub mod repair;
pub mod search;

use crate::error::{Error, Result};
use crate::io::peft::{AdapterConfig, LoraConfig, MethodConfig, PatternMap, TargetModules};
use crate::kbit::Tier;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Whether a search unit is one linear or one transformer block (all its linears share a choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Layer,
    Block,
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "layer" | "linear" => Ok(Granularity::Layer),
            "block" => Ok(Granularity::Block),
            _ => Err(Error::invalid(format!(
                "granularity {s:?}: expected layer or block"
            ))),
        }
    }
}

/// How the frozen embedding tables (word, position, token type) are stored. They are frozen in every
/// method here, and at f32 they dominate a small model's memory (MiniLM: 45 of 56 MiB under uniform
/// QLoRA), so storing them in bf16 is the largest single saving; bitsandbytes QLoRA keeps them in the
/// compute dtype (usually bf16) too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingStorage {
    /// As the checkpoint loads them (the activation dtype, f32 on the CPU).
    #[default]
    F32,
    /// bf16 (rows are gathered and cast to the activation dtype).
    Bf16,
}

impl EmbeddingStorage {
    /// Bytes per stored table element.
    pub fn bytes(self) -> usize {
        match self {
            EmbeddingStorage::F32 => 4,
            EmbeddingStorage::Bf16 => 2,
        }
    }

    /// The storage of a table dtype (`None` for a dtype the tables cannot be stored in).
    pub fn of_dtype(dt: crate::tensor::DType) -> Option<Self> {
        match dt {
            crate::tensor::DType::F32 => Some(EmbeddingStorage::F32),
            crate::tensor::DType::BF16 => Some(EmbeddingStorage::Bf16),
            _ => None,
        }
    }

    /// The storage dtype to set on a loaded model, `None` to keep the load's.
    pub fn dtype(self) -> Option<crate::tensor::DType> {
        match self {
            EmbeddingStorage::F32 => None,
            EmbeddingStorage::Bf16 => Some(crate::tensor::DType::BF16),
        }
    }
}

impl std::str::FromStr for EmbeddingStorage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(EmbeddingStorage::F32),
            "bf16" => Ok(EmbeddingStorage::Bf16),
            _ => Err(Error::invalid(format!(
                "embedding storage {s:?}: expected f32 or bf16"
            ))),
        }
    }
}

/// One adaptable linear of the model: its full module name and shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearShape {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearShape {
    pub fn numel(&self) -> usize {
        self.in_features * self.out_features
    }
}

/// One search unit: the linears that share a (bits, rank) choice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    pub modules: Vec<LinearShape>,
}

/// The block of a module name: the prefix up to and including the layer index
/// (`bert.encoder.layer.3.attention.self.query` → `bert.encoder.layer.3`); the name itself when it
/// has no numeric component.
pub fn block_of(name: &str) -> &str {
    let mut end = None;
    let mut pos = 0;
    for part in name.split('.') {
        pos += part.len();
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            end = Some(pos);
            break;
        }
        pos += 1;
    }
    end.map_or(name, |e| &name[..e])
}

/// The units of `linears` at a granularity (blocks keep the order of their first linear).
pub fn units(linears: &[LinearShape], g: Granularity) -> Vec<Unit> {
    match g {
        Granularity::Layer => linears
            .iter()
            .map(|l| Unit {
                name: l.name.clone(),
                modules: vec![l.clone()],
            })
            .collect(),
        Granularity::Block => {
            let mut out: Vec<Unit> = Vec::new();
            for l in linears {
                let b = block_of(&l.name);
                match out.iter_mut().find(|u| u.name == b) {
                    Some(u) => u.modules.push(l.clone()),
                    None => out.push(Unit {
                        name: b.to_string(),
                        modules: vec![l.clone()],
                    }),
                }
            }
            out
        }
    }
}

/// What is searched: the units, and the allowed bit-widths and ranks (each sorted ascending, unique).
///
/// With a searched embedding storage (`embeddings` holds at least two storages, cheapest first) a
/// candidate carries one more gene after the units' choices: the frozen word/position/token-type
/// tables, whose [`Choice::bits`] indexes `embeddings` and whose rank index is always 0 (the tables
/// have no adapter). Its `(bits, rank)` description is `(16, 0)` for bf16 and `(32, 0)` for f32.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    pub units: Vec<Unit>,
    pub bits: Vec<Tier>,
    pub ranks: Vec<usize>,
    /// Storages of the embedding tables to choose from, cheapest first; empty (older logs) or one
    /// storage: not searched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<EmbeddingStorage>,
}

impl SearchSpace {
    /// Sorts and deduplicates the sets; errors on an empty set of units, bits or ranks.
    pub fn new(units: Vec<Unit>, mut bits: Vec<Tier>, mut ranks: Vec<usize>) -> Result<Self> {
        bits.sort();
        bits.dedup();
        ranks.sort();
        ranks.dedup();
        if units.is_empty() || bits.is_empty() || ranks.is_empty() {
            return Err(Error::invalid(
                "a QR-Adaptor search space needs at least one unit, one bit-width and one rank",
            ));
        }
        if let Some(u) = units.iter().find(|u| u.modules.is_empty()) {
            return Err(Error::invalid(format!("search unit {:?} has no linear", u.name)));
        }
        Ok(SearchSpace {
            units,
            bits,
            ranks,
            embeddings: Vec::new(),
        })
    }

    /// The space with the embedding tables' storage searched over `storages` (sorted cheapest
    /// first, deduplicated; fewer than two: not searched).
    pub fn with_embeddings(mut self, mut storages: Vec<EmbeddingStorage>) -> Self {
        storages.sort_by_key(|s| s.bytes());
        storages.dedup();
        self.embeddings = if storages.len() >= 2 { storages } else { Vec::new() };
        self
    }

    /// The index of the embedding gene in a candidate, when the tables' storage is searched.
    pub fn embedding_gene(&self) -> Option<usize> {
        (self.embeddings.len() >= 2).then_some(self.units.len())
    }

    /// Genes per candidate: one per unit, plus the embedding gene when searched.
    pub fn genes(&self) -> usize {
        self.units.len() + usize::from(self.embedding_gene().is_some())
    }

    /// (bit levels, rank levels) of gene `g`: the bit and rank sets for a unit, (storages, 1) for
    /// the embedding gene.
    pub fn levels(&self, g: usize) -> (usize, usize) {
        if Some(g) == self.embedding_gene() {
            (self.embeddings.len(), 1)
        } else {
            (self.bits.len(), self.ranks.len())
        }
    }

    /// The embedding storage `cand` chooses (`None` when it is not searched).
    pub fn embedding_of(&self, cand: &Candidate) -> Option<EmbeddingStorage> {
        let g = self.embedding_gene()?;
        cand.0
            .get(g)
            .and_then(|c| self.embeddings.get(c.bits as usize).copied())
    }

    /// The candidate with every unit at bit index `b` and rank index `r` (clamped to the sets) and
    /// the embedding tables, when searched, at their largest storage (as a checkpoint loads them).
    pub fn uniform(&self, b: usize, r: usize) -> Candidate {
        let c = Choice {
            bits: b.min(self.bits.len() - 1) as u8,
            rank: r.min(self.ranks.len() - 1) as u8,
        };
        let mut v = vec![c; self.units.len()];
        if self.embedding_gene().is_some() {
            v.push(Choice {
                bits: (self.embeddings.len() - 1) as u8,
                rank: 0,
            });
        }
        Candidate(v)
    }

    /// The tier of a choice.
    pub fn tier(&self, c: Choice) -> Tier {
        self.bits[c.bits as usize]
    }

    /// The rank of a choice.
    pub fn rank(&self, c: Choice) -> usize {
        self.ranks[c.rank as usize]
    }

    /// Errors unless `cand` has one in-range choice per gene.
    pub fn check(&self, cand: &Candidate) -> Result<()> {
        if cand.0.len() != self.genes() {
            return Err(Error::invalid(format!(
                "candidate has {} choices, the search space {} genes",
                cand.0.len(),
                self.genes()
            )));
        }
        if cand.0.iter().enumerate().any(|(g, c)| {
            let (nb, nr) = self.levels(g);
            c.bits as usize >= nb || c.rank as usize >= nr
        }) {
            return Err(Error::invalid("candidate choice outside the bit or rank set"));
        }
        Ok(())
    }

    /// The candidate as (bits, rank) per gene (the embedding gene: (16 or 32, 0)).
    pub fn describe(&self, cand: &Candidate) -> Vec<(u8, usize)> {
        cand.0
            .iter()
            .enumerate()
            .map(|(g, &c)| match self.embedding_gene() {
                Some(e) if e == g => (
                    self.embeddings
                        .get(c.bits as usize)
                        .map_or(0, |s| (8 * s.bytes()) as u8),
                    0,
                ),
                _ => (self.tier(c).bits(), self.rank(c)),
            })
            .collect()
    }

    /// The candidate of (bits, rank) values per gene.
    pub fn from_values(&self, v: &[(u8, usize)]) -> Result<Candidate> {
        if v.len() != self.genes() {
            return Err(Error::invalid(format!(
                "{} (bits, rank) pairs for {} genes",
                v.len(),
                self.genes()
            )));
        }
        let mut out = Vec::with_capacity(v.len());
        for (g, &(b, r)) in v.iter().enumerate() {
            if Some(g) == self.embedding_gene() {
                let bi = self.embeddings.iter().position(|s| 8 * s.bytes() == b as usize);
                match (bi, r) {
                    (Some(bi), 0) => out.push(Choice {
                        bits: bi as u8,
                        rank: 0,
                    }),
                    _ => {
                        return Err(Error::invalid(format!(
                            "embedding storage ({b} bits, rank {r}) is not in the search space"
                        )));
                    }
                }
                continue;
            }
            let bi = self.bits.iter().position(|t| t.bits() == b);
            let ri = self.ranks.iter().position(|&x| x == r);
            match (bi, ri) {
                (Some(bi), Some(ri)) => out.push(Choice {
                    bits: bi as u8,
                    rank: ri as u8,
                }),
                _ => {
                    return Err(Error::invalid(format!(
                        "(bits {b}, rank {r}) is not in the search space"
                    )));
                }
            }
        }
        Ok(Candidate(out))
    }
}

/// One unit's choice: indices into [`SearchSpace::bits`] and [`SearchSpace::ranks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Choice {
    pub bits: u8,
    pub rank: u8,
}

/// A configuration: one [`Choice`] per unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Candidate(pub Vec<Choice>);

/// One unit of a chosen configuration in `qr_adaptor.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitChoice {
    pub unit: String,
    pub modules: Vec<String>,
    pub bits: Tier,
    pub rank: usize,
}

/// File name of a chosen configuration.
pub const CONFIG_FILE: &str = "qr_adaptor.json";

/// `qr_adaptor.json`: the per-unit bits and ranks a search chose, with what they cost and scored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QrConfig {
    pub granularity: Granularity,
    pub units: Vec<UnitChoice>,
    /// LoRA alpha = `alpha_over_r` · rank per module (the recipe's alpha / r).
    pub alpha_over_r: f64,
    /// Blocksize and double quantization of the quantized tiers.
    pub blocksize: usize,
    pub double_quant: bool,
    /// The budget and the memory model's bytes of this configuration.
    pub budget_bytes: usize,
    pub memory_bytes: usize,
    /// The search's best score of this configuration (validation accuracy), if it was evaluated.
    #[serde(default)]
    pub score: Option<f64>,
    /// Storage of the frozen embedding tables (older files: f32).
    #[serde(default)]
    pub embeddings: EmbeddingStorage,
}

impl QrConfig {
    /// The configuration of `cand` (its embedding storage when searched, else f32: a caller with a
    /// fixed storage sets it).
    pub fn from_candidate(
        space: &SearchSpace,
        cand: &Candidate,
        granularity: Granularity,
        alpha_over_r: f64,
        opts: &crate::quant::QuantizeOptions,
        budget_bytes: usize,
        memory_bytes: usize,
    ) -> Result<Self> {
        space.check(cand)?;
        let units = space
            .units
            .iter()
            .zip(&cand.0)
            .map(|(u, &c)| UnitChoice {
                unit: u.name.clone(),
                modules: u.modules.iter().map(|m| m.name.clone()).collect(),
                bits: space.tier(c),
                rank: space.rank(c),
            })
            .collect();
        Ok(QrConfig {
            granularity,
            units,
            alpha_over_r,
            blocksize: opts.blocksize,
            double_quant: opts.double_quant,
            budget_bytes,
            memory_bytes,
            score: None,
            embeddings: space.embedding_of(cand).unwrap_or_default(),
        })
    }

    /// The storage tier of every module.
    pub fn tiers(&self) -> BTreeMap<String, Tier> {
        self.units
            .iter()
            .flat_map(|u| u.modules.iter().map(move |m| (m.clone(), u.bits)))
            .collect()
    }

    /// Modules with an adapter (rank > 0) and their ranks, in unit order.
    pub fn ranks(&self) -> Vec<(String, usize)> {
        self.units
            .iter()
            .filter(|u| u.rank > 0)
            .flat_map(|u| u.modules.iter().map(move |m| (m.clone(), u.rank)))
            .collect()
    }

    /// The PEFT LoRA config: `target_modules` the adapted modules' full names, `r` the most common
    /// rank, `rank_pattern` / `alpha_pattern` every module's rank and alpha (`alpha_over_r · rank`).
    /// `None` when no module has an adapter. `task_type` and `modules_to_save` are the caller's.
    pub fn adapter_config(&self, dropout: f64) -> Result<Option<AdapterConfig>> {
        let ranks = self.ranks();
        if ranks.is_empty() {
            return Ok(None);
        }
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for (_, r) in &ranks {
            *counts.entry(*r).or_default() += 1;
        }
        let r = counts
            .iter()
            .max_by_key(|(r, n)| (**n, **r))
            .map_or(8, |(r, _)| *r);
        let mut rank_pattern = PatternMap::new();
        let mut alpha_pattern = PatternMap::new();
        for (m, rank) in &ranks {
            rank_pattern.insert(m.clone(), *rank)?;
            alpha_pattern.insert(m.clone(), self.alpha_over_r * *rank as f64)?;
        }
        let mut c = AdapterConfig::new(MethodConfig::Lora(LoraConfig {
            r,
            lora_alpha: self.alpha_over_r * r as f64,
            lora_dropout: dropout,
            rank_pattern,
            alpha_pattern,
            ..Default::default()
        }));
        c.target_modules = Some(TargetModules::Names(ranks.into_iter().map(|(m, _)| m).collect()));
        Ok(Some(c))
    }

    /// Reads `qr_adaptor.json` (a file, or a directory holding one).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let mut p = path.as_ref().to_path_buf();
        if p.is_dir() {
            p = p.join(CONFIG_FILE);
        }
        let bytes = std::fs::read(&p).map_err(|e| Error::Io {
            path: p.clone(),
            source: e,
        })?;
        let c: QrConfig =
            serde_json::from_slice(&bytes).map_err(|e| Error::invalid(format!("{}: {e}", p.display())))?;
        if c.units.is_empty() {
            return Err(Error::invalid(format!("{}: no units", p.display())));
        }
        Ok(c)
    }

    /// Writes `dir/qr_adaptor.json` (atomically).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(e.to_string()))?;
        crate::io::atomic_write(dir.as_ref().join(CONFIG_FILE), s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(name: &str) -> LinearShape {
        LinearShape {
            name: name.into(),
            in_features: 4,
            out_features: 4,
        }
    }

    #[test]
    fn blocks_group_by_layer_index() {
        assert_eq!(
            block_of("bert.encoder.layer.3.attention.self.query"),
            "bert.encoder.layer.3"
        );
        assert_eq!(block_of("bert.pooler.dense"), "bert.pooler.dense");
        let ls = [
            lin("m.layer.0.q"),
            lin("m.layer.0.k"),
            lin("m.layer.1.q"),
            lin("m.pooler"),
        ];
        let u = units(&ls, Granularity::Block);
        assert_eq!(u.len(), 3);
        assert_eq!(u[0].modules.len(), 2);
        assert_eq!(units(&ls, Granularity::Layer).len(), 4);
    }

    #[test]
    fn config_turns_into_tiers_and_rank_patterns() {
        let ls = [lin("m.layer.0.q"), lin("m.layer.0.k"), lin("m.layer.1.q")];
        let space = SearchSpace::new(
            units(&ls, Granularity::Layer),
            vec![Tier::Bits16, Tier::Bits4],
            vec![8, 0, 4],
        )
        .unwrap();
        assert_eq!(space.ranks, vec![0, 4, 8]);
        let cand = space.from_values(&[(4, 8), (16, 0), (4, 4)]).unwrap();
        assert_eq!(space.describe(&cand), vec![(4, 8), (16, 0), (4, 4)]);
        let c = QrConfig::from_candidate(
            &space,
            &cand,
            Granularity::Layer,
            2.0,
            &Default::default(),
            100,
            90,
        )
        .unwrap();
        assert_eq!(c.tiers()["m.layer.0.k"], Tier::Bits16);
        let ac = c.adapter_config(0.1).unwrap().unwrap();
        assert_eq!(ac.rank_for("m.layer.0.q"), Some(8));
        assert_eq!(ac.rank_for("m.layer.1.q"), Some(4));
        assert_eq!(ac.alpha_for("m.layer.1.q"), Some(8.0));
        match &ac.target_modules {
            Some(TargetModules::Names(n)) => assert_eq!(n, &["m.layer.0.q", "m.layer.1.q"]),
            other => panic!("{other:?}"),
        }
        let all_zero = space.from_values(&[(4, 0), (4, 0), (4, 0)]).unwrap();
        let c0 = QrConfig::from_candidate(
            &space,
            &all_zero,
            Granularity::Layer,
            2.0,
            &Default::default(),
            1,
            1,
        )
        .unwrap();
        assert!(c0.adapter_config(0.0).unwrap().is_none());
        assert!(space.from_values(&[(3, 8), (4, 0), (4, 0)]).is_err());
    }
}
