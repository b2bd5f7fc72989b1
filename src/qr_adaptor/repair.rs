//! Budget repair: while a candidate is over budget, apply the one-step downgrade (one bit-width step
//! or one rank step down on one unit) with the smallest estimated sensitivity cost per byte saved.
//!
//! The cost model: a unit's fidelity signal is measured as the loss increase at the lowest bit-width,
//! and quantization error of a `b`-bit code shrinks roughly as `2^-b`, so a step from `b` to `b'` costs
//! `fidelity · (2^-b' − 2^-b) / (2^-b_min − 2^-b_max)`. A rank step from `r` to `r'` costs
//! `plasticity · (r − r') / r_max`. The embedding gene (when the tables' storage is searched) has one
//! step per storage and its fidelity is measured for the whole drop to the cheapest storage, so a step
//! costs `fidelity · (steps / (storages − 1))`. A small floor keeps zero-sensitivity units ordered by bytes.

use super::memory::MemoryModel;
use super::nsga2::Sensitivity;
use super::{Candidate, Choice, SearchSpace};
use crate::error::{Error, Result};

const FLOOR: f64 = 1e-3;

fn err_scale(bits: u8) -> f64 {
    if bits >= 16 { 0.0 } else { (-(bits as f64)).exp2() }
}

/// The cost of moving gene `u` from `from` to `to` (one of them differs by one step).
pub fn step_cost(space: &SearchSpace, sens: &Sensitivity, u: usize, from: Choice, to: Choice) -> f64 {
    if Some(u) == space.embedding_gene() {
        let span = (space.embeddings.len().max(2) - 1) as f64;
        let steps = (from.bits as f64 - to.bits as f64).max(0.0);
        return sens.fidelity[u] * steps / span + FLOOR;
    }
    let lo = err_scale(space.bits[0].bits());
    let hi = err_scale(space.bits[space.bits.len() - 1].bits());
    let span = (lo - hi).max(1e-12);
    let db = err_scale(space.tier(to).bits()) - err_scale(space.tier(from).bits());
    let r_max = space.ranks[space.ranks.len() - 1].max(1) as f64;
    let dr = space.rank(from) as f64 - space.rank(to) as f64;
    sens.fidelity[u] * db.max(0.0) / span + sens.plasticity[u] * dr.max(0.0) / r_max + FLOOR
}

/// The candidate at the lowest bit-width and rank everywhere (and the cheapest embedding storage).
pub fn lowest(space: &SearchSpace) -> Candidate {
    Candidate(vec![Choice { bits: 0, rank: 0 }; space.genes()])
}

/// `cand` repaired to fit `budget` bytes (unchanged when it fits). Errors when it does not fit and even
/// [`lowest`] is over budget; never returns a candidate over budget.
///
/// Bytes need not fall with bits on tiny linears (a 4-bit code of a 1×1 weight carries a 4-byte absmax
/// and costs more than its 2-byte bf16 copy), so the floor is checked only when a repair is needed.
pub fn repair(
    space: &SearchSpace,
    mem: &MemoryModel,
    sens: &Sensitivity,
    cand: &Candidate,
    budget: usize,
) -> Result<Candidate> {
    space.check(cand)?;
    if sens.fidelity.len() != space.genes() || sens.plasticity.len() != space.genes() {
        return Err(Error::invalid("sensitivity has the wrong number of units"));
    }
    if mem.total(space, cand) <= budget {
        return Ok(cand.clone());
    }
    let floor = lowest(space);
    let floor_bytes = mem.total(space, &floor);
    if floor_bytes > budget {
        return Err(Error::invalid(format!(
            "budget {budget} bytes is below the smallest configuration ({floor_bytes} bytes: every unit at {} bits, rank {})",
            space.bits[0].bits(),
            space.ranks[0]
        )));
    }
    let mut c = cand.clone();
    let mut unit_bytes: Vec<usize> = (0..c.0.len()).map(|u| bytes_of(space, mem, u, c.0[u])).collect();
    let mut total = mem.total(space, &c);
    while total > budget {
        let mut best: Option<(f64, usize, Choice, usize)> = None;
        for (u, &ch) in c.0.iter().enumerate() {
            let mut moves = Vec::with_capacity(2);
            if ch.bits > 0 {
                moves.push(Choice {
                    bits: ch.bits - 1,
                    ..ch
                });
            }
            if ch.rank > 0 {
                moves.push(Choice {
                    rank: ch.rank - 1,
                    ..ch
                });
            }
            for to in moves {
                let b = bytes_of(space, mem, u, to);
                if b >= unit_bytes[u] {
                    continue;
                }
                let per_byte = step_cost(space, sens, u, ch, to) / (unit_bytes[u] - b) as f64;
                if best.is_none_or(|(s, ..)| per_byte < s) {
                    best = Some((per_byte, u, to, b));
                }
            }
        }
        match best {
            Some((_, u, to, b)) => {
                c.0[u] = to;
                unit_bytes[u] = b;
                total = mem.total(space, &c);
            }
            // No step saves bytes (cannot happen with the shipped formats): the floor fits.
            None => return Ok(floor),
        }
    }
    Ok(c)
}

fn bytes_of(space: &SearchSpace, mem: &MemoryModel, u: usize, c: Choice) -> usize {
    mem.gene_bytes(space, u, c)
}
