//! NSGA-II (Deb, Pratap, Agarwal, Meyarivan, "A fast and elitist multiobjective genetic algorithm:
//! NSGA-II", IEEE TEC 2002) on two objectives, the task score (maximized) and memory (minimized), with
//! Deb's constrained domination for the memory budget: a feasible candidate dominates an infeasible
//! one, of two infeasible ones the smaller violation dominates, and two feasible ones compare by Pareto
//! dominance. Variation works on QR-Adaptor candidates: per-unit uniform crossover and a
//! one-step-neighbour mutation (one bit-width or rank step up or down) biased by sensitivity.

use super::{Candidate, SearchSpace};
use crate::rng::Rng;

/// The objectives of one evaluated candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objectives {
    /// Task score, higher is better.
    pub score: f64,
    /// Memory in bytes, lower is better.
    pub memory: f64,
    /// Constraint violation: bytes over budget (0 when feasible).
    pub violation: f64,
}

impl Objectives {
    pub fn new(score: f64, memory: f64, budget: f64) -> Self {
        Objectives {
            score,
            memory,
            violation: (memory - budget).max(0.0),
        }
    }

    pub fn feasible(&self) -> bool {
        self.violation <= 0.0
    }
}

/// Constrained domination: whether `a` dominates `b`.
pub fn dominates(a: &Objectives, b: &Objectives) -> bool {
    match (a.feasible(), b.feasible()) {
        (true, false) => true,
        (false, true) => false,
        (false, false) => a.violation < b.violation,
        (true, true) => {
            a.score >= b.score && a.memory <= b.memory && (a.score > b.score || a.memory < b.memory)
        }
    }
}

/// Fast non-dominated sort: the fronts, best first, each a list of indices in ascending order.
pub fn non_dominated_sort(objs: &[Objectives]) -> Vec<Vec<usize>> {
    let n = objs.len();
    let mut dominated_by: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut count = vec![0usize; n];
    for i in 0..n {
        for j in 0..n {
            if i != j && dominates(&objs[i], &objs[j]) {
                dominated_by[i].push(j);
            } else if i != j && dominates(&objs[j], &objs[i]) {
                count[i] += 1;
            }
        }
    }
    let mut fronts = Vec::new();
    let mut current: Vec<usize> = (0..n).filter(|&i| count[i] == 0).collect();
    while !current.is_empty() {
        let mut next = Vec::new();
        for &i in &current {
            for &j in &dominated_by[i] {
                count[j] -= 1;
                if count[j] == 0 {
                    next.push(j);
                }
            }
        }
        next.sort_unstable();
        fronts.push(current);
        current = next;
    }
    fronts
}

/// Crowding distance of each member of `front` (same order): per objective, members sorted by it,
/// the two extremes get infinity and the others the gap between their neighbours divided by the
/// objective's range over the front. An objective with zero range adds nothing.
pub fn crowding_distance(objs: &[Objectives], front: &[usize]) -> Vec<f64> {
    let n = front.len();
    let mut d = vec![0.0f64; n];
    if n <= 2 {
        return vec![f64::INFINITY; n];
    }
    for key in [|o: &Objectives| o.score, |o: &Objectives| o.memory] {
        let mut order: Vec<usize> = (0..n).collect();
        // Stable sort: ties keep front order, so the result is deterministic.
        order.sort_by(|&a, &b| key(&objs[front[a]]).total_cmp(&key(&objs[front[b]])));
        let lo = key(&objs[front[order[0]]]);
        let hi = key(&objs[front[order[n - 1]]]);
        d[order[0]] = f64::INFINITY;
        d[order[n - 1]] = f64::INFINITY;
        let range = hi - lo;
        if range <= 0.0 {
            continue;
        }
        for k in 1..n - 1 {
            let gap = key(&objs[front[order[k + 1]]]) - key(&objs[front[order[k - 1]]]);
            d[order[k]] += gap / range;
        }
    }
    d
}

/// Rank (front index) and crowding distance of every candidate.
pub fn rank_and_crowding(objs: &[Objectives]) -> (Vec<usize>, Vec<f64>) {
    let mut rank = vec![0; objs.len()];
    let mut crowd = vec![0.0; objs.len()];
    for (r, front) in non_dominated_sort(objs).iter().enumerate() {
        for (&i, c) in front.iter().zip(crowding_distance(objs, front)) {
            rank[i] = r;
            crowd[i] = c;
        }
    }
    (rank, crowd)
}

/// The crowded-comparison order: lower rank first, then larger crowding distance.
pub fn better(rank: &[usize], crowd: &[f64], a: usize, b: usize) -> bool {
    rank[a] < rank[b] || (rank[a] == rank[b] && crowd[a] > crowd[b])
}

/// Binary tournament by the crowded-comparison order (ties go to the first draw).
pub fn tournament(rng: &mut Rng, rank: &[usize], crowd: &[f64]) -> usize {
    let n = rank.len() as u64;
    let a = rng.below(n) as usize;
    let b = rng.below(n) as usize;
    if better(rank, crowd, b, a) { b } else { a }
}

/// Environmental selection: the `n` best indices by front, then crowding distance within the last
/// front that fits (ties by index).
pub fn select(objs: &[Objectives], n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    for front in non_dominated_sort(objs) {
        if out.len() + front.len() <= n {
            out.extend(&front);
        } else {
            let d = crowding_distance(objs, &front);
            let mut order: Vec<usize> = (0..front.len()).collect();
            order.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
            out.extend(order.iter().take(n - out.len()).map(|&k| front[k]));
        }
        if out.len() >= n {
            break;
        }
    }
    out
}

/// Uniform crossover: each unit's choice from either parent with probability 1/2.
pub fn crossover(rng: &mut Rng, a: &Candidate, b: &Candidate) -> Candidate {
    Candidate(
        a.0.iter()
            .zip(&b.0)
            .map(|(&x, &y)| if rng.uniform_f64() < 0.5 { x } else { y })
            .collect(),
    )
}

/// Per-unit sensitivities, normalized to [0, 1]: `fidelity` (how much the task suffers when the unit
/// drops to the lowest bit-width) and `plasticity` (how much an adapter on it can learn).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sensitivity {
    pub fidelity: Vec<f64>,
    pub plasticity: Vec<f64>,
}

impl Sensitivity {
    /// Min-max normalization of raw signals to [0, 1] (all equal → all 0.5). Non-finite values count
    /// as the largest finite one.
    pub fn normalized(fidelity: &[f64], plasticity: &[f64]) -> Self {
        fn norm(v: &[f64]) -> Vec<f64> {
            let fin: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            let lo = fin.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = fin.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            v.iter()
                .map(|&x| {
                    let x = if x.is_finite() { x } else { hi };
                    if hi > lo { (x - lo) / (hi - lo) } else { 0.5 }
                })
                .collect()
        }
        Sensitivity {
            fidelity: norm(fidelity),
            plasticity: norm(plasticity),
        }
    }

    /// Equal sensitivity for `n` units.
    pub fn flat(n: usize) -> Self {
        Sensitivity {
            fidelity: vec![0.5; n],
            plasticity: vec![0.5; n],
        }
    }
}

/// One-step-neighbour mutation: each unit mutates with probability `p`; a mutating unit moves its
/// bit-width or its rank (equally likely) one step, up with probability `0.25 + 0.5 · sensitivity`
/// (fidelity for bits, plasticity for rank), else down; a step off the end of a set goes the other way.
pub fn mutate(rng: &mut Rng, space: &SearchSpace, sens: &Sensitivity, c: &Candidate, p: f64) -> Candidate {
    let mut out = c.clone();
    for (u, ch) in out.0.iter_mut().enumerate() {
        if rng.uniform_f64() >= p {
            continue;
        }
        let bits_move = rng.uniform_f64() < 0.5;
        let (nb, nr) = space.levels(u);
        let (val, len, s) = if bits_move {
            (&mut ch.bits, nb, sens.fidelity[u])
        } else {
            (&mut ch.rank, nr, sens.plasticity[u])
        };
        if len < 2 {
            continue;
        }
        let up = rng.uniform_f64() < 0.25 + 0.5 * s;
        let v = *val as usize;
        *val = match (up, v) {
            (true, v) if v + 1 < len => v + 1,
            (true, v) => v - 1,
            (false, 0) => 1,
            (false, v) => v - 1,
        } as u8;
    }
    out
}

/// The 2-D hypervolume of the feasible non-dominated points relative to `(score_ref, memory_ref)`
/// (the area they dominate with score above `score_ref` and memory below `memory_ref`).
pub fn hypervolume(objs: &[Objectives], score_ref: f64, memory_ref: f64) -> f64 {
    let mut pts: Vec<(f64, f64)> = objs
        .iter()
        .filter(|o| o.feasible() && o.score > score_ref && o.memory < memory_ref)
        .map(|o| (o.memory, o.score))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    // Sweep by memory ascending: each point adds the strip up to the next point's memory at the best
    // score seen so far.
    let mut hv = 0.0;
    let mut best = score_ref;
    for (k, &(m, s)) in pts.iter().enumerate() {
        best = best.max(s);
        let next = pts.get(k + 1).map_or(memory_ref, |p| p.0);
        hv += (next - m) * (best - score_ref);
    }
    hv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(score: f64, memory: f64) -> Objectives {
        Objectives::new(score, memory, 100.0)
    }

    #[test]
    fn hypervolume_of_a_staircase() {
        // Points (mem 10, score 0.5), (mem 50, score 0.8), reference (0, 100):
        // [10,50) x 0.5 + [50,100) x 0.8 = 20 + 40.
        let objs = [o(0.5, 10.0), o(0.8, 50.0), o(0.4, 60.0), o(0.9, 120.0)];
        assert!((hypervolume(&objs, 0.0, 100.0) - 60.0).abs() < 1e-12);
        assert_eq!(hypervolume(&[], 0.0, 100.0), 0.0);
    }

    #[test]
    fn mutation_moves_one_step() {
        use crate::kbit::Tier;
        use crate::qr_adaptor::{Granularity, LinearShape, units};
        let ls: Vec<LinearShape> = (0..5)
            .map(|i| LinearShape {
                name: format!("l.{i}"),
                in_features: 8,
                out_features: 8,
            })
            .collect();
        let space = SearchSpace::new(
            units(&ls, Granularity::Layer),
            vec![Tier::Bits2, Tier::Bits4, Tier::Bits16],
            vec![0, 4, 8],
        )
        .unwrap();
        let mut rng = Rng::new(3);
        let sens = Sensitivity::flat(5);
        for start in [space.uniform(0, 0), space.uniform(1, 1), space.uniform(2, 2)] {
            for _ in 0..50 {
                let m = mutate(&mut rng, &space, &sens, &start, 1.0);
                space.check(&m).unwrap();
                for (a, b) in start.0.iter().zip(&m.0) {
                    let db = (a.bits as i32 - b.bits as i32).abs();
                    let dr = (a.rank as i32 - b.rank as i32).abs();
                    assert_eq!(db + dr, 1, "{a:?} -> {b:?}");
                }
            }
        }
    }
}
