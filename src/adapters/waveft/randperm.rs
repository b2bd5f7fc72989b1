//! Bit-exact `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU.
//!
//! PEFT regenerates WaveFT's coefficient positions from `random_loc_seed` instead of saving them, so a
//! PEFT adapter can only be loaded if this permutation is reproduced exactly. Facts (ATen
//! `TensorFactories.cpp::randperm_cpu`, `CPUGeneratorImpl`, `core/MT19937RNGEngine.h`):
//! - the generator is a standard 32-bit MT19937 seeded with `seed & 0xffff_ffff` (the 64-bit seed is
//!   truncated by `mt19937::init_with_uint32`);
//! - `n < u32::MAX / 20` (n < 214 748 364): forward Fisher-Yates; for `i in 0..n-1`:
//!   `z = mt() % (n - i)`, swap `r[i]` and `r[i + z]`;
//! - larger `n`: the "inside-out" variant with 64-bit draws; for `i in 0..n`:
//!   `z = random64() % (i + 1)`, `r[i] = r[z]`, `r[z] = i`, where `random64() = mt() << 32 | mt()`
//!   (first draw in the high half).
//!
//! WaveFT needs only the first `k = n_frequency` entries, so [`randperm_prefix`] computes exactly those:
//! the forward variant fixes `r[i]` at step `i`, so it stops after `k` draws and tracks displaced values
//! in a hash map (O(k) time and memory instead of O(n): a 4096x14336 layer no longer allocates 470 MB);
//! the inside-out variant must still draw all `2n` words, but only positions `< k` are kept (O(k) memory).

use std::collections::HashMap;

/// The first branch of torch's randperm applies for `n` strictly below this (`u32::MAX / 20`).
pub const SMALL_N_LIMIT: u64 = u32::MAX as u64 / 20;

/// The 32-bit Mersenne Twister (MT19937), as `std::mt19937` and `at::mt19937`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    /// Seeded like torch: the low 32 bits of `seed` go through the reference `init_genrand`.
    pub fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed as u32; // truncation to the low 32 bits is torch's behaviour
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, next: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        let s = &mut self.state;
        for i in 0..624 {
            let y = (s[i] & UPPER) | (s[(i + 1) % 624] & LOWER);
            let mut v = s[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            s[i] = v;
        }
        self.next = 0;
    }

    /// The next tempered 32-bit output.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// torch's `random64()`: two draws, the first one in the high half.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// The full permutation `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` (CPU).
/// Allocates `8n` bytes; WaveFT uses [`randperm_prefix`] instead.
pub fn randperm_torch(n: usize, seed: u64) -> Vec<i64> {
    randperm_prefix(n, n, seed)
}

/// The first `k` entries of [`randperm_torch`]`(n, seed)` (`k` is clamped to `n`), without building the
/// whole permutation when `k` is much smaller than `n`.
pub fn randperm_prefix(n: usize, k: usize, seed: u64) -> Vec<i64> {
    let k = k.min(n);
    if (n as u64) < SMALL_N_LIMIT {
        forward_prefix(n, k, seed)
    } else {
        inside_out_prefix(n, k, seed)
    }
}

/// Forward Fisher-Yates (torch's small-n branch), first `k` entries.
pub(crate) fn forward_prefix(n: usize, k: usize, seed: u64) -> Vec<i64> {
    let mut mt = Mt19937::new(seed);
    let mut out = Vec::with_capacity(k);
    // A dense array is cheaper than hashing once a good part of the permutation is needed.
    if k.saturating_mul(8) >= n {
        let mut r: Vec<i64> = (0..n as i64).collect();
        for i in 0..k.min(n.saturating_sub(1)) {
            let z = (mt.next_u32() as u64 % (n - i) as u64) as usize;
            r.swap(i, i + z);
        }
        r.truncate(k);
        return r;
    }
    // Sparse: positions never touched still hold their own index.
    let mut moved: HashMap<usize, i64> = HashMap::with_capacity(2 * k);
    for i in 0..k {
        if i + 1 >= n {
            // The last position gets no draw in torch's loop (`i < n - 1`).
            out.push(moved.get(&i).copied().unwrap_or(i as i64));
            break;
        }
        let z = (mt.next_u32() as u64 % (n - i) as u64) as usize;
        let j = i + z;
        let vi = moved.get(&i).copied().unwrap_or(i as i64);
        let vj = moved.get(&j).copied().unwrap_or(j as i64);
        moved.insert(j, vi);
        moved.remove(&i); // position i is final now; keep the map small
        out.push(vj);
    }
    out
}

/// Inside-out Fisher-Yates with 64-bit draws (torch's large-n branch), first `k` entries.
/// Steps `i >= k` can only write `r[z] = i` into the kept prefix (when `z < k`); what they move to `r[i]`
/// lies beyond the prefix, so the prefix is exact with O(k) memory.
pub(crate) fn inside_out_prefix(n: usize, k: usize, seed: u64) -> Vec<i64> {
    let mut mt = Mt19937::new(seed);
    let mut r = vec![0i64; k];
    for i in 0..n {
        let z = (mt.next_u64() % (i as u64 + 1)) as usize;
        if i < k {
            r[i] = r[z];
            r[z] = i as i64;
        } else if z < k {
            r[z] = i as i64;
        }
    }
    r
}

/// The inside-out algorithm over the whole array, written literally (the test oracle for
/// [`inside_out_prefix`] at sizes where the branch itself is out of reach).
#[cfg(test)]
pub(crate) fn inside_out_full(n: usize, seed: u64) -> Vec<i64> {
    let mut mt = Mt19937::new(seed);
    let mut r = vec![0i64; n];
    for i in 0..n {
        let z = (mt.next_u64() % (i as u64 + 1)) as usize;
        r[i] = i as i64;
        r[i] = r[z];
        r[z] = i as i64;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_outputs() {
        // The 10000th output of a default-seeded (5489) std::mt19937 is 4123659995 (C++ standard,
        // [rand.predef]); torch's engine is the same generator.
        let mut mt = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = mt.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
        // Seeds are truncated to 32 bits, as in torch.
        let (mut a, mut b) = (Mt19937::new(777), Mt19937::new((1u64 << 32) + 777));
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn prefixes_agree_with_full_permutations() {
        for &(n, seed) in &[(1usize, 0u64), (2, 1), (10, 777), (1000, 3), (4099, 777)] {
            let full = forward_prefix(n, n, seed);
            let mut sorted = full.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..n as i64).collect::<Vec<_>>(),
                "n={n} is a permutation"
            );
            for k in [0, 1, n / 7, n / 2, n.saturating_sub(1), n] {
                assert_eq!(forward_prefix(n, k, seed), full[..k], "forward n={n} k={k}");
            }
            let full = inside_out_full(n, seed);
            let mut sorted = full.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n as i64).collect::<Vec<_>>(), "inside-out n={n}");
            for k in [0, 1, n / 7, n / 2, n] {
                assert_eq!(inside_out_prefix(n, k, seed), full[..k], "inside-out n={n} k={k}");
            }
        }
        assert!(randperm_torch(0, 1).is_empty());
    }
}
