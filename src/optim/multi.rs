//! The host half of the multi-tensor CUDA steps (`kernels/optim.cu`, `*_multi_*`): the descriptor array
//! that tells one launch where every tensor of a group lives, and the decisions about where optimizer
//! state is placed. Plain integer logic, compiled and tested without a GPU; `cuda.rs` uploads and
//! launches.
//!
//! A descriptor is `ptrs…, n, start, scalars` as i64 words: the device addresses of the tensor's
//! operands, its element count, its first chunk in the launch's chunk numbering, and the tensor's two
//! per-step scalars (each parameter has its own step count, so its own bias corrections) packed as two
//! little-endian f32. The kernel finds the tensor of chunk `c` as the last descriptor whose start is
//! `<= c` ([`owner`] is that search on the host, for the tests).

use crate::error::{Error, Result};

/// Elements per chunk of the 32-bit-state multi-tensor kernels (`MULTI_CHUNK`: 256 threads x 4
/// elements x 4 iterations).
pub(crate) const CHUNK32: usize = 4096;
/// Elements per chunk of the 8-bit kernel: one quantization block.
pub(crate) const CHUNK8: usize = super::eightbit::BLOCK;
/// Operand pointers of a 32-bit-state descriptor: p, g, m, v (`DESC32_WORDS` = 4 + 3).
pub(crate) const PTRS32: usize = 4;
/// Operand pointers of an 8-bit descriptor: p, g, codes m, codes v, absmax m, absmax v
/// (`DESC8_WORDS` = 6 + 3).
pub(crate) const PTRS8: usize = 6;

/// bitsandbytes pages only state buffers of parameters with at least this many elements
/// (`Optimizer8bit.get_state_buffer`: `p.numel() < 1e5` stays on the device).
pub(crate) const PAGED_MIN_SIZE: usize = 100_000;

/// Whether the moments of an `n`-element parameter go to managed memory: `--paged` asked for, the state
/// is on a CUDA device (not offloaded to the host), the tensor is large enough, and the device can page
/// (`CONCURRENT_MANAGED_ACCESS`); otherwise a plain allocation on the state's device.
pub(crate) fn use_paged(paged: bool, state_on_cuda: bool, n: usize, device_can_page: bool) -> bool {
    paged && state_on_cuda && n >= PAGED_MIN_SIZE && device_can_page
}

/// One tensor of a multi-tensor launch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Item {
    /// Device addresses of the operands, in the kernel's order.
    pub ptrs: Vec<u64>,
    /// Elements.
    pub n: usize,
    /// The two per-tensor scalars (AdamW: `neg_step`, `bc2_sqrt`; bitsandbytes: `step_size`, `eps_c2`).
    pub scalars: [f32; 2],
}

/// The two f32 of a descriptor's scalar word: the first in the low half (the kernel's `desc_scalars`).
pub(crate) fn scalar_word(a: f32, b: f32) -> i64 {
    (a.to_bits() as u64 | ((b.to_bits() as u64) << 32)) as i64
}

/// The descriptor words of a launch, and its tensor and chunk counts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Descriptors {
    pub words: Vec<i64>,
    pub ntensors: usize,
    pub nchunks: usize,
}

/// Descriptors of `items` (each with exactly `nptrs` pointers) in chunks of `chunk` elements; empty
/// tensors are left out (they have no chunk), so starts strictly increase.
pub(crate) fn descriptors(items: &[Item], nptrs: usize, chunk: usize) -> Result<Descriptors> {
    if chunk == 0 {
        return Err(Error::invalid("multi-tensor chunk of 0 elements"));
    }
    let mut words = Vec::with_capacity(items.len() * (nptrs + 3));
    let (mut ntensors, mut nchunks) = (0usize, 0usize);
    for it in items.iter().filter(|it| it.n > 0) {
        if it.ptrs.len() != nptrs {
            return Err(Error::invalid(format!(
                "multi-tensor item with {} pointers, expected {nptrs}",
                it.ptrs.len()
            )));
        }
        let n = i64::try_from(it.n).map_err(|_| Error::invalid("tensor too large"))?;
        let start = i64::try_from(nchunks).map_err(|_| Error::invalid("too many chunks"))?;
        words.extend(it.ptrs.iter().map(|&p| p as i64));
        words.extend([n, start, scalar_word(it.scalars[0], it.scalars[1])]);
        nchunks = nchunks
            .checked_add(it.n.div_ceil(chunk))
            .ok_or_else(|| Error::invalid("too many chunks"))?;
        ntensors += 1;
    }
    Ok(Descriptors {
        words,
        ntensors,
        nchunks,
    })
}

/// The kernels' `find_desc`: the index of the last of `ntensors` descriptors (`nwords` words each,
/// start at word `start_word`) whose start is `<= c`, by the same binary search.
#[cfg(test)]
fn owner(words: &[i64], ntensors: usize, nwords: usize, start_word: usize, c: i64) -> usize {
    let (mut lo, mut hi) = (0usize, ntensors - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if words[mid * nwords + start_word] <= c {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn item(n: usize, tag: u64, nptrs: usize) -> Item {
        Item {
            ptrs: (0..nptrs as u64).map(|k| (tag << 8) | k).collect(),
            n,
            scalars: [tag as f32, -(tag as f32) * 0.5],
        }
    }

    /// Every chunk of every tensor maps back to its tensor and its offset through the kernel's search;
    /// chunk counts add up; empty tensors are skipped; the words hold the pointers, n and the scalars.
    #[test]
    fn every_chunk_finds_its_tensor() {
        let mut rng = Rng::new(3);
        for (nptrs, chunk) in [(PTRS32, CHUNK32), (PTRS8, CHUNK8)] {
            for trial in 0..200 {
                let count = 1 + rng.below(40) as usize;
                let items: Vec<Item> = (0..count)
                    .map(|k| {
                        let n = match rng.below(5) {
                            0 => 0,
                            1 => 1 + rng.below(chunk as u64) as usize,
                            2 => chunk * (1 + rng.below(4) as usize),
                            _ => 1 + rng.below(20 * chunk as u64) as usize,
                        };
                        item(n, k as u64 + 1, nptrs)
                    })
                    .collect();
                let d = descriptors(&items, nptrs, chunk).unwrap();
                let live: Vec<&Item> = items.iter().filter(|i| i.n > 0).collect();
                assert_eq!(d.ntensors, live.len());
                let nw = nptrs + 3;
                assert_eq!(d.words.len(), live.len() * nw);
                assert_eq!(d.nchunks, live.iter().map(|i| i.n.div_ceil(chunk)).sum::<usize>());
                if live.is_empty() {
                    continue;
                }
                // Walk the chunks in order and check the search against it.
                let mut c = 0i64;
                for (t, it) in live.iter().enumerate() {
                    let w = &d.words[t * nw..(t + 1) * nw];
                    assert_eq!(&w[..nptrs], it.ptrs.iter().map(|&p| p as i64).collect::<Vec<_>>());
                    assert_eq!(w[nptrs] as usize, it.n);
                    assert_eq!(w[nptrs + 1], c, "trial {trial}");
                    let s = w[nptrs + 2] as u64;
                    assert_eq!(f32::from_bits(s as u32), it.scalars[0]);
                    assert_eq!(f32::from_bits((s >> 32) as u32), it.scalars[1]);
                    for local in 0..it.n.div_ceil(chunk) as i64 {
                        let k = owner(&d.words, d.ntensors, nw, nptrs + 1, c + local);
                        assert_eq!(k, t, "trial {trial}: chunk {}", c + local);
                        // The kernel's range: base = (c - start) * chunk, len = min(chunk, n - base) > 0.
                        let base = local as usize * chunk;
                        assert!(base < it.n && (it.n - base).min(chunk) > 0);
                    }
                    c += it.n.div_ceil(chunk) as i64;
                }
            }
        }
    }

    #[test]
    fn rejects_bad_items() {
        assert!(descriptors(&[item(5, 1, 3)], PTRS32, CHUNK32).is_err());
        assert!(descriptors(&[item(5, 1, 4)], PTRS32, 0).is_err());
        let d = descriptors(&[item(0, 1, 3)], PTRS32, CHUNK32).unwrap();
        assert_eq!((d.ntensors, d.nchunks, d.words.len()), (0, 0, 0));
    }

    #[test]
    fn scalar_word_is_little_endian_pair() {
        let w = scalar_word(1.5, -2.0);
        let bytes = w.to_le_bytes();
        assert_eq!(f32::from_le_bytes(bytes[..4].try_into().unwrap()), 1.5);
        assert_eq!(f32::from_le_bytes(bytes[4..].try_into().unwrap()), -2.0);
    }

    #[test]
    fn paged_placement_follows_bitsandbytes() {
        assert!(use_paged(true, true, PAGED_MIN_SIZE, true));
        assert!(!use_paged(true, true, PAGED_MIN_SIZE - 1, true)); // small: on the device
        assert!(!use_paged(true, true, 1 << 24, false)); // no concurrent managed access: plain
        assert!(!use_paged(true, false, 1 << 24, true)); // host state (offload or CPU)
        assert!(!use_paged(false, true, 1 << 24, true));
    }
}
