//! The memory model of a QR-Adaptor configuration: the bytes training needs, counted from the formats.
//!
//! * base weights: [`Tier::storage_bytes`] (packed codes + first-level absmax, or with double
//!   quantization u8 absmax codes + nested f32 absmax + the 256-entry nested code book; 16-bit: two
//!   bytes per weight), equal to `BaseWeight::size_in_bytes` of what the loader builds;
//! * adapter parameters: LoRA `A` (`r × in`) and `B` (`out × r`) in f32, their f32 gradients and the
//!   optimizer state per tensor ([`OptimBytes`]);
//! * the fixed part the search does not change: embeddings, norms, biases, the frozen non-searched
//!   weights, and the trainable head with its gradient and optimizer state.
//!
//! Activations are not counted: they depend on batch shape, not on the configuration's bits or
//! (beyond a few percent) its ranks.

use super::{Candidate, Choice, EmbeddingStorage, LinearShape, SearchSpace};
use crate::kbit::Tier;
use crate::quant::QuantizeOptions;
use serde::{Deserialize, Serialize};

/// Optimizer state bytes per trainable tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimBytes {
    /// torch.optim.AdamW: two f32 moments, 8 bytes per element.
    AdamW,
    /// bitsandbytes AdamW8bit (`Optimizer2State`, `optim_bits=8`): tensors of at least
    /// `min_8bit_size` (4096) elements keep u8 moments plus one f32 absmax per 256-element block and
    /// moment; smaller tensors keep f32 moments.
    AdamW8bit,
}

impl OptimBytes {
    /// State bytes of one trainable tensor of `numel` elements (as `Optimizer::state_bytes` counts).
    pub fn state_bytes(self, numel: usize) -> usize {
        use crate::optim::eightbit::{BLOCK, MIN_8BIT_SIZE};
        match self {
            OptimBytes::AdamW => 8 * numel,
            OptimBytes::AdamW8bit if numel >= MIN_8BIT_SIZE => 2 * numel + 8 * numel.div_ceil(BLOCK),
            OptimBytes::AdamW8bit => 8 * numel,
        }
    }
}

/// Bytes of one configuration, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Searched base weights as stored.
    pub base: usize,
    /// Everything frozen the search does not change.
    pub fixed_frozen: usize,
    /// Trainable parameters (adapters + the fixed trainable head), f32.
    pub params: usize,
    /// Their gradients, f32.
    pub grads: usize,
    /// Their optimizer state.
    pub optimizer: usize,
}

impl Breakdown {
    /// Weights only: what a loaded model with its adapters holds.
    pub fn weights(&self) -> usize {
        self.base + self.fixed_frozen + self.params
    }

    /// Everything training holds (without activations).
    pub fn total(&self) -> usize {
        self.weights() + self.grads + self.optimizer
    }
}

/// The frozen embedding tables (word, position, token type) of the load the fixed part was counted
/// from: their element count and storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    pub elems: usize,
    pub loaded: EmbeddingStorage,
}

impl Tables {
    /// Bytes of the tables stored as `s`.
    pub fn bytes(&self, s: EmbeddingStorage) -> usize {
        self.elems * s.bytes()
    }
}

/// The memory model of a model under search.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryModel {
    /// Blocksize of the quantized tiers.
    pub blocksize: usize,
    /// Double quantization of their absmax.
    pub double_quant: bool,
    pub optim: OptimBytes,
    /// Bytes of the frozen tensors outside the searched linears (embeddings, norms, biases, ...).
    pub fixed_frozen_bytes: usize,
    /// Element counts of the trainable tensors outside the adapters (the classifier head).
    pub fixed_trainable: Vec<usize>,
    /// The embedding tables inside `fixed_frozen_bytes` (as loaded); needed when the search
    /// chooses their storage (`None`: a candidate with an embedding gene is counted as loaded).
    #[serde(default)]
    pub tables: Option<Tables>,
}

impl MemoryModel {
    /// The quantization options of the quantized tiers.
    pub fn quantize_options(&self) -> QuantizeOptions {
        QuantizeOptions {
            blocksize: self.blocksize,
            double_quant: self.double_quant,
            ..Default::default()
        }
    }

    /// Base bytes of one linear in `tier`.
    pub fn base_bytes(&self, l: &LinearShape, tier: Tier) -> usize {
        tier.storage_bytes(l.numel(), &self.quantize_options())
    }

    /// (params, grads, optimizer) bytes of trainable tensors of these element counts.
    fn trainable(&self, numels: impl IntoIterator<Item = usize>) -> (usize, usize, usize) {
        numels.into_iter().fold((0, 0, 0), |(p, g, o), n| {
            (p + 4 * n, g + 4 * n, o + self.optim.state_bytes(n))
        })
    }

    /// The element counts of a rank-`r` LoRA adapter on `l` (`A`, `B`); none for rank 0.
    pub fn adapter_numels(l: &LinearShape, r: usize) -> [usize; 2] {
        [r * l.in_features, l.out_features * r]
    }

    /// Bytes of one unit under (tier, rank): its bases, adapter parameters, gradients and state.
    pub fn unit_bytes(&self, modules: &[LinearShape], tier: Tier, rank: usize) -> usize {
        let base: usize = modules.iter().map(|l| self.base_bytes(l, tier)).sum();
        let (p, g, o) = self.trainable(
            modules
                .iter()
                .flat_map(|l| Self::adapter_numels(l, rank))
                .filter(|&n| n > 0),
        );
        base + p + g + o
    }

    /// The frozen bytes outside the searched linears with the tables stored as `s` (as loaded when
    /// `s` is `None` or the tables are unknown).
    pub fn fixed_frozen(&self, s: Option<EmbeddingStorage>) -> usize {
        match (self.tables, s) {
            (Some(t), Some(s)) => self.fixed_frozen_bytes.saturating_sub(t.bytes(t.loaded)) + t.bytes(s),
            _ => self.fixed_frozen_bytes,
        }
    }

    /// Bytes of gene `g` under `c`: for a unit, [`Self::unit_bytes`]; for the embedding gene, the
    /// tables' bytes in that storage (0 when the tables are unknown).
    pub fn gene_bytes(&self, space: &SearchSpace, g: usize, c: Choice) -> usize {
        match space.embedding_gene() {
            Some(e) if e == g => match (self.tables, space.embeddings.get(c.bits as usize)) {
                (Some(t), Some(&s)) => t.bytes(s),
                _ => 0,
            },
            _ => self.unit_bytes(&space.units[g].modules, space.tier(c), space.rank(c)),
        }
    }

    /// The configuration's bytes by part.
    pub fn breakdown(&self, space: &SearchSpace, cand: &Candidate) -> Breakdown {
        let mut b = Breakdown {
            fixed_frozen: self.fixed_frozen(space.embedding_of(cand)),
            ..Default::default()
        };
        let mut numels: Vec<usize> = self.fixed_trainable.clone();
        for (u, &c) in space.units.iter().zip(&cand.0) {
            let (tier, r) = (space.tier(c), space.rank(c));
            for l in &u.modules {
                b.base += self.base_bytes(l, tier);
                numels.extend(Self::adapter_numels(l, r).into_iter().filter(|&n| n > 0));
            }
        }
        let (p, g, o) = self.trainable(numels);
        b.params = p;
        b.grads = g;
        b.optimizer = o;
        b
    }

    /// Total training bytes of a configuration (what the budget constrains).
    pub fn total(&self, space: &SearchSpace, cand: &Candidate) -> usize {
        self.breakdown(space, cand).total()
    }
}

/// The searchable linears of a sequence classifier (every backbone linear, pooler included) and the
/// memory model around them. Call it on a freshly loaded model (no adapter yet: its trainable
/// parameters are the head's); the frozen bytes outside the linears' base weights are counted from
/// the model as loaded, so any load (dense or quantized) gives the same fixed part.
pub fn for_seq_cls(
    model: &crate::models::BertForSequenceClassification,
    store: &crate::autograd::ParamStore,
    optim: OptimBytes,
    blocksize: usize,
    double_quant: bool,
) -> crate::error::Result<(Vec<LinearShape>, MemoryModel)> {
    let bert = model.bert();
    let mut linears = Vec::new();
    let mut base = 0;
    for s in bert.linears() {
        let b = s.base();
        base += b.size_in_bytes();
        linears.push(LinearShape {
            name: s.name().to_string(),
            in_features: b.in_features(),
            out_features: b.out_features(),
        });
    }
    let c = bert.config();
    let tables = EmbeddingStorage::of_dtype(bert.embedding_dtype()).map(|loaded| Tables {
        elems: (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size,
        loaded,
    });
    let fixed_trainable = model
        .param_ids()
        .iter()
        .map(|&id| store.get(id).map(|t| t.numel()))
        .collect::<crate::error::Result<Vec<usize>>>()?;
    Ok((
        linears,
        MemoryModel {
            blocksize,
            double_quant,
            optim,
            fixed_frozen_bytes: bert.frozen_bytes() - base,
            fixed_trainable,
            tables,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qr_adaptor::{Granularity, units};

    #[test]
    fn eight_bit_state_follows_bitsandbytes_sizes() {
        assert_eq!(OptimBytes::AdamW.state_bytes(100), 800);
        assert_eq!(OptimBytes::AdamW8bit.state_bytes(4095), 8 * 4095);
        assert_eq!(OptimBytes::AdamW8bit.state_bytes(4096), 2 * 4096 + 8 * 16);
        assert_eq!(OptimBytes::AdamW8bit.state_bytes(4097), 2 * 4097 + 8 * 17);
    }

    #[test]
    fn breakdown_adds_up_by_hand() {
        let l = LinearShape {
            name: "a.0.q".into(),
            in_features: 64,
            out_features: 32,
        };
        let space = SearchSpace::new(
            units(std::slice::from_ref(&l), Granularity::Layer),
            vec![Tier::Bits4, Tier::Bits16],
            vec![0, 2],
        )
        .unwrap();
        let m = MemoryModel {
            blocksize: 64,
            double_quant: false,
            optim: OptimBytes::AdamW,
            fixed_frozen_bytes: 1000,
            fixed_trainable: vec![10],
            tables: None,
        };
        // 16-bit, rank 2: 2 B x 2048 weights; adapter 2x64 + 32x2 = 192 params: 4 + 4 + 8 bytes each.
        let b = m.breakdown(&space, &space.uniform(1, 1));
        assert_eq!(b.base, 4096);
        assert_eq!(b.params, 4 * (192 + 10));
        assert_eq!(b.total(), 1000 + 4096 + 16 * 202);
        // 4-bit, rank 0: 1024 code bytes + 32 blocks x 4 bytes.
        let b = m.breakdown(&space, &space.uniform(0, 0));
        assert_eq!(b.base, 1024 + 128);
        assert_eq!(b.total(), 1000 + 1152 + 16 * 10);
        assert_eq!(
            m.unit_bytes(&space.units[0].modules, Tier::Bits16, 2),
            4096 + 16 * 192
        );
    }
}
