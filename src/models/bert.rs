//! BERT (transformers' `models/bert/modeling_bert.py`): `BertModel` (embeddings, post-LayerNorm encoder
//! layers, tanh pooler) and `BertForSequenceClassification` (pooler → dropout → classifier), on the
//! autograd tape.
//!
//! Every linear is a [`LinearSlot`] under transformers' module name (`bert.encoder.layer.0.attention.self.query`,
//! `bert.pooler.dense`), so a PEFT config's `target_modules`, `rank_pattern` and `alpha_pattern` select the
//! same modules as in PEFT. Embedding tables and LayerNorm affines are frozen constants; the classifier is
//! trained fully (PEFT's `modules_to_save` for SEQ_CLS) and lives in the [`ParamStore`] under the key PEFT
//! saves it as (`base_model.model.classifier.weight` / `.bias`).
//!
//! Training forward: `Some(step seed)` turns on hidden, attention, classifier and adapter dropout, each
//! mask a hash of the step seed, the layer and the call site (so a recomputation reproduces it); `None` is
//! evaluation. [`BertModel::set_gradient_checkpointing`] keeps only each layer's input on the tape and
//! recomputes the layer in backward.

use super::adapt::{SavedModules, backbone_adapter_methods, task_adapter_methods};
use super::config::BertConfig;
use super::linear::{LinearSlot, TrainedLinear};
use super::loader::{Checkpoint, MappedTable, ModelLoadOptions, frozen_linear};
use super::tokenizer::BertBatch;
use crate::adapters::vblora::VbLoraBank;
use crate::attention::AttentionConfig;
use crate::autograd::{Activation, Backward, Grads, ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// The PEFT key prefix of every saved tensor.
const PEFT_PREFIX: &str = "base_model.model.";

/// A frozen LayerNorm affine.
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(ckpt: &Checkpoint, name: &str, h: usize, opts: &ModelLoadOptions) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: ckpt.backbone(&format!("{name}.weight"), &[h], opts.dtype, opts.device)?,
            bias: ckpt.backbone(&format!("{name}.bias"), &[h], opts.dtype, opts.device)?,
        })
    }
}

/// Per-layer constants.
#[derive(Clone, Copy, Debug)]
struct LayerSettings {
    heads: usize,
    head_dim: usize,
    eps: f32,
    act: Activation,
    hidden_dropout: f32,
    attn_dropout: f32,
}

/// One encoder layer (`BertLayer`).
#[derive(Clone, Debug)]
pub struct BertLayer {
    index: usize,
    query: LinearSlot,
    key: LinearSlot,
    value: LinearSlot,
    attn_out: LinearSlot,
    attn_ln: LayerNorm,
    intermediate: LinearSlot,
    output: LinearSlot,
    out_ln: LayerNorm,
    s: LayerSettings,
}

/// A dropout seed for `(step, layer, site)` (SplitMix64 finalizer of the mixed words).
fn site_seed(step: u64, layer: usize, site: u64) -> u64 {
    let mut z = step
        ^ (layer as u64).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ site.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn maybe_dropout(tape: &mut Tape, x: Var, p: f32, seed: Option<u64>) -> Result<Var> {
    match seed {
        Some(s) if p > 0.0 => tape.dropout(x, p, s),
        _ => Ok(x),
    }
}

/// The shape of one forward call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
}

/// How the token rows of one forward pass are laid out: the padded batch (`batch*seq` rows), or packed
/// (only the real tokens, plus each sequence's first token even where it is masked). Linears, LayerNorm,
/// GELU and dropout are per token, so packing skips the padding's work without changing any real
/// token's value; attention alone sees the padded layout (gathered in and out). The idea is the
/// "remove padding" of FasterTransformer / `BetterTransformer`'s nested tensors.
#[derive(Clone, Debug)]
struct Rows {
    mask: Vec<u8>,
    d: Dims,
    packing: Option<Packing>,
}

#[derive(Clone, Debug)]
struct Packing {
    /// The padded row (`b*seq + t`) of each packed row, increasing.
    keep: Vec<u32>,
    /// The packed row each padded row reads when attention needs the padded layout. A dropped (padding)
    /// row reads its sequence's first row: as a key it is masked, and its query output is never read.
    unpack: Vec<u32>,
    /// The packed row of each sequence's first token.
    cls: Vec<u32>,
}

impl Rows {
    /// The padded layout of `b`, packed when `pack` and the batch has padding.
    fn new(b: &BertBatch, pack: bool) -> Result<Rows> {
        let d = Dims {
            batch: b.batch,
            seq: b.seq,
        };
        let n = b.batch * b.seq;
        if n > u32::MAX as usize {
            return Err(Error::invalid(format!("{n} tokens exceed u32 row indices")));
        }
        let keep: Vec<u32> = (0..n)
            .filter(|&r| r % b.seq == 0 || b.attention_mask[r] != 0)
            .map(|r| r as u32)
            .collect();
        let packing = (pack && keep.len() < n).then(|| {
            let (mut unpack, mut cls) = (Vec::with_capacity(n), Vec::with_capacity(b.batch));
            let mut next = 0u32;
            for r in 0..n {
                if r % b.seq == 0 {
                    cls.push(next);
                }
                if keep.get(next as usize) == Some(&(r as u32)) {
                    unpack.push(next);
                    next += 1;
                } else {
                    unpack.push(cls[r / b.seq]);
                }
            }
            Packing { keep, unpack, cls }
        });
        Ok(Rows {
            mask: b.attention_mask.clone(),
            d,
            packing,
        })
    }

    /// The row of each sequence's first token in this layout.
    fn cls_rows(&self) -> Vec<u32> {
        match &self.packing {
            Some(p) => p.cls.clone(),
            None => (0..self.d.batch).map(|b| (b * self.d.seq) as u32).collect(),
        }
    }

    /// `x` in the padded layout.
    fn unpack(&self, tape: &mut Tape, x: Var) -> Result<Var> {
        match &self.packing {
            Some(p) => tape.gather_rows(x, &p.unpack),
            None => Ok(x),
        }
    }

    /// Padded-layout `x` in this layout.
    fn pack(&self, tape: &mut Tape, x: Var) -> Result<Var> {
        match &self.packing {
            Some(p) => tape.gather_rows(x, &p.keep),
            None => Ok(x),
        }
    }
}

impl BertLayer {
    fn slots(&self) -> [&LinearSlot; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }

    fn slots_mut(&mut self) -> [&mut LinearSlot; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// `x` (rows in `r`'s layout) → the layer output. `cls_only`: queries, and everything after
    /// attention, only for each sequence's first token (the output is `[batch, hidden]`), which is all a
    /// CLS-pooled classifier reads of the last layer.
    fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        r: &Rows,
        seed: Option<u64>,
        cls_only: bool,
    ) -> Result<Var> {
        let s = &self.s;
        let site = |k: u64| seed.map(|st| site_seed(st, self.index, k));
        let xq = if cls_only {
            tape.gather_rows(x, &r.cls_rows())?
        } else {
            x
        };
        let q = self.query.forward_t(tape, store, xq, seed)?;
        let k = self.key.forward_t(tape, store, x, seed)?;
        let v = self.value.forward_t(tape, store, x, seed)?;
        let (k, v) = (r.unpack(tape, k)?, r.unpack(tape, v)?);
        let q = if cls_only { q } else { r.unpack(tape, q)? };
        let mut cfg = AttentionConfig::new(r.d.batch, r.d.seq, s.heads, s.head_dim);
        if cls_only {
            cfg.seq_q = 1;
        }
        cfg.dropout = site(0)
            .filter(|_| s.attn_dropout > 0.0)
            .map(|sd| (s.attn_dropout, sd));
        let ctx = tape.attention(q, k, v, Some(&r.mask), &cfg)?;
        let ctx = if cls_only { ctx } else { r.pack(tape, ctx)? };
        let a = self.attn_out.forward_t(tape, store, ctx, seed)?;
        let a = maybe_dropout(tape, a, s.hidden_dropout, site(1))?;
        let h1 = tape.add(a, xq)?;
        let h1 = tape.layer_norm(h1, &self.attn_ln.weight, &self.attn_ln.bias, s.eps)?;
        let i = self.intermediate.forward_t(tape, store, h1, seed)?;
        let i = tape.activation(i, s.act)?;
        let o = self.output.forward_t(tape, store, i, seed)?;
        let o = maybe_dropout(tape, o, s.hidden_dropout, site(2))?;
        let h2 = tape.add(o, h1)?;
        tape.layer_norm(h2, &self.out_ln.weight, &self.out_ln.bias, s.eps)
    }
}

/// The word-embedding table: in memory, or (an f32 checkpoint on the CPU) left in the mapped file, where
/// a lookup reads only the rows it needs (see [`MappedTable`]).
#[derive(Clone, Debug)]
enum WordTable {
    Loaded(Tensor),
    Mapped(MappedTable),
}

impl WordTable {
    /// Bytes of the table as stored (a mapped table's pages are resident only where rows were read).
    fn size_in_bytes(&self) -> usize {
        match self {
            WordTable::Loaded(t) => t.size_in_bytes(),
            WordTable::Mapped(m) => m.size_in_bytes(),
        }
    }

    /// The dtype rows are stored in (a mapped table is an f32 checkpoint read in place).
    fn dtype(&self) -> DType {
        match self {
            WordTable::Loaded(t) => t.dtype(),
            WordTable::Mapped(_) => DType::F32,
        }
    }

    /// The table stored in `dtype`: a mapped table stays mapped for f32 and is read whole otherwise.
    fn to_dtype(&self, dtype: DType) -> Result<WordTable> {
        Ok(match self {
            WordTable::Loaded(t) => WordTable::Loaded(t.to_dtype(dtype)?),
            WordTable::Mapped(m) if dtype == DType::F32 => WordTable::Mapped(m.clone()),
            WordTable::Mapped(m) => {
                let all: Vec<u32> = (0..m.shape()[0] as u32).collect();
                WordTable::Loaded(m.gather(&all)?.to_dtype(dtype)?)
            }
        })
    }
}

/// `BertModel`: embeddings, encoder, optional pooler.
#[derive(Clone, Debug)]
pub struct BertModel {
    config: BertConfig,
    /// The module-name prefix (`"bert"` inside `BertForSequenceClassification`, `""` for a bare model).
    prefix: String,
    word: WordTable,
    position: Tensor,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Arc<BertLayer>>,
    pooler: Option<LinearSlot>,
    bank: Option<VbLoraBank>,
    gradient_checkpointing: bool,
    opts: ModelLoadOptions,
}

impl BertModel {
    /// Loads the backbone from `ckpt` (names with or without `bert.`), validating every shape against
    /// `config`. `prefix` is the module-name prefix the model's linears get (`"bert"` as in
    /// `BertForSequenceClassification`, or `""`). Linears selected by `opts.quantize` are quantized.
    pub fn load(
        ckpt: &Checkpoint,
        config: &BertConfig,
        prefix: &str,
        with_pooler: bool,
        opts: &ModelLoadOptions,
    ) -> Result<BertModel> {
        config.validate()?;
        let c = config;
        let h = c.hidden_size;
        let (dt, dev) = opts.float_activations("BERT")?;
        let linear = |module: &str, out, inp| frozen_linear(ckpt, prefix, module, out, inp, true, opts);
        let s = LayerSettings {
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            eps: c.layer_norm_eps,
            act: c.hidden_act,
            hidden_dropout: c.hidden_dropout_prob,
            attn_dropout: c.attention_probs_dropout_prob,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = format!("encoder.layer.{i}");
            layers.push(Arc::new(BertLayer {
                index: i,
                query: linear(&format!("{l}.attention.self.query"), h, h)?,
                key: linear(&format!("{l}.attention.self.key"), h, h)?,
                value: linear(&format!("{l}.attention.self.value"), h, h)?,
                attn_out: linear(&format!("{l}.attention.output.dense"), h, h)?,
                attn_ln: LayerNorm::load(ckpt, &format!("{l}.attention.output.LayerNorm"), h, opts)?,
                intermediate: linear(&format!("{l}.intermediate.dense"), c.intermediate_size, h)?,
                output: linear(&format!("{l}.output.dense"), h, c.intermediate_size)?,
                out_ln: LayerNorm::load(ckpt, &format!("{l}.output.LayerNorm"), h, opts)?,
                s,
            }));
        }
        Ok(BertModel {
            config: c.clone(),
            prefix: prefix.to_string(),
            word: {
                let (name, shape) = ("embeddings.word_embeddings.weight", [c.vocab_size, h]);
                match ckpt.backbone_mapped(name, &shape, dt, dev)? {
                    Some(m) => WordTable::Mapped(m),
                    None => WordTable::Loaded(ckpt.backbone(name, &shape, dt, dev)?),
                }
            },
            position: ckpt.backbone(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, h],
                dt,
                dev,
            )?,
            token_type: ckpt.backbone(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, h],
                dt,
                dev,
            )?,
            emb_ln: LayerNorm::load(ckpt, "embeddings.LayerNorm", h, opts)?,
            layers,
            pooler: if with_pooler {
                Some(linear("pooler.dense", h, h)?)
            } else {
                None
            },
            bank: None,
            gradient_checkpointing: false,
            opts: opts.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The module-name prefix of the linears (`"bert"` inside `BertForSequenceClassification`, `""`
    /// for a bare `BertModel`).
    pub fn module_prefix(&self) -> &str {
        &self.prefix
    }

    /// Recompute each encoder layer in backward instead of keeping its activations (off by default).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// Every linear slot, in module order (encoder layers, then the pooler).
    pub fn linears(&self) -> Vec<&LinearSlot> {
        let mut v: Vec<&LinearSlot> = self.layers.iter().flat_map(|l| l.slots()).collect();
        v.extend(self.pooler.as_ref());
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut LinearSlot> {
        let mut v: Vec<&mut LinearSlot> = self
            .layers
            .iter_mut()
            .flat_map(|l| Arc::make_mut(l).slots_mut())
            .collect();
        v.extend(self.pooler.as_mut());
        v
    }

    /// Bytes of the frozen weights (embeddings, LayerNorms, linears as stored: 4-bit or dense, biases).
    pub fn frozen_bytes(&self) -> usize {
        let mut n =
            self.word.size_in_bytes() + self.position.size_in_bytes() + self.token_type.size_in_bytes();
        n += 2 * self.emb_ln.weight.size_in_bytes();
        for l in &self.layers {
            n += 2 * (l.attn_ln.weight.size_in_bytes() + l.out_ln.weight.size_in_bytes());
        }
        for s in self.linears() {
            n += s.base().size_in_bytes() + s.bias().map_or(0, Tensor::size_in_bytes);
        }
        n
    }

    /// Bytes of the VB-LoRA bank in `store` when it is frozen (a trainable bank counts as trainable).
    fn bank_bytes(&self, store: &ParamStore) -> Result<usize> {
        match self.bank.map(|b| b.id()) {
            Some(id) if !store.is_trainable(id) => Ok(store.get(id)?.size_in_bytes()),
            _ => Ok(0),
        }
    }

    fn check_batch(&self, b: &BertBatch) -> Result<()> {
        b.validate()?;
        if b.seq > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                b.seq, self.config.max_position_embeddings
            )));
        }
        if let Some(&t) = b
            .token_type_ids
            .iter()
            .find(|&&t| t as usize >= self.config.type_vocab_size)
        {
            return Err(Error::invalid(format!(
                "token type {t} >= type_vocab_size {}",
                self.config.type_vocab_size
            )));
        }
        Ok(())
    }

    /// Stores the frozen embedding tables (word, position, token type) in `dtype`, e.g. bf16 under f32
    /// activations (half the bytes; QR-Adaptor's `--embeddings bf16`). Rows are gathered in `dtype` and
    /// cast to the activation dtype, so only the stored values are rounded.
    pub fn set_embedding_dtype(&mut self, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::invalid(format!(
                "embedding tables must be stored in a float dtype, got {dtype}"
            )));
        }
        self.word = self.word.to_dtype(dtype)?;
        for t in [&mut self.position, &mut self.token_type] {
            *t = t.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// The dtype the embedding tables are stored in.
    pub fn embedding_dtype(&self) -> DType {
        self.word.dtype()
    }

    /// Rows `ids` of a frozen embedding table in the activation dtype (a constant on the tape).
    fn embedding_rows(&self, tape: &mut Tape, table: &Tensor, ids: &[u32]) -> Result<Var> {
        if table.dtype() == self.opts.dtype {
            return tape.embedding(table, ids);
        }
        Ok(tape.leaf(crate::nn::embedding(table, ids)?.to_dtype(self.opts.dtype)?))
    }

    /// Records the embeddings of the rows of `r`: `LayerNorm(word + token_type + position)` then dropout.
    fn embed(&self, tape: &mut Tape, b: &BertBatch, r: &Rows, seed: Option<u64>) -> Result<Var> {
        let (ids, types, positions): (Vec<u32>, Vec<u32>, Vec<u32>) = match &r.packing {
            Some(p) => {
                let at = |v: &[u32]| p.keep.iter().map(|&i| v[i as usize]).collect::<Vec<u32>>();
                let pos = p.keep.iter().map(|&i| i % b.seq as u32).collect();
                (at(&b.input_ids), at(&b.token_type_ids), pos)
            }
            None => (
                b.input_ids.clone(),
                b.token_type_ids.clone(),
                (0..b.batch).flat_map(|_| 0..b.seq as u32).collect(),
            ),
        };
        let w = match &self.word {
            WordTable::Loaded(t) => self.embedding_rows(tape, t, &ids)?,
            WordTable::Mapped(m) => tape.leaf(m.gather(&ids)?),
        };
        let t = self.embedding_rows(tape, &self.token_type, &types)?;
        let p = self.embedding_rows(tape, &self.position, &positions)?;
        let x = tape.add(w, t)?;
        let x = tape.add(x, p)?;
        let x = tape.layer_norm(
            x,
            &self.emb_ln.weight,
            &self.emb_ln.bias,
            self.config.layer_norm_eps,
        )?;
        maybe_dropout(
            tape,
            x,
            self.config.hidden_dropout_prob,
            seed.map(|s| site_seed(s, usize::MAX, 3)),
        )
    }

    /// The last hidden state `[batch*seq, hidden]` on `tape`. `seed`: `Some(step seed)` for training
    /// (dropout), `None` for evaluation.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &BertBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        self.check_batch(b)?;
        self.encode(tape, store, b, &Arc::new(Rows::new(b, false)?), seed, false)
    }

    /// The last hidden state of each sequence's first token (`[CLS]`), `[batch, hidden]`: the rows of
    /// [`BertModel::forward_t`] that [`BertModel::pool_t`] reads, computed without the padding (only
    /// real tokens go through the linears) and with the last layer for `[CLS]` queries only. The same
    /// values as `forward_t`'s rows `b*seq` in evaluation; in training the dropout masks differ (they
    /// are drawn over the packed rows).
    pub fn forward_cls_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &BertBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        self.check_batch(b)?;
        if self.layers.is_empty() {
            let h = self.forward_t(tape, store, b, seed)?;
            return tape.cls_pool(h, b.batch, b.seq);
        }
        let rows = Arc::new(Rows::new(b, true)?);
        self.encode(tape, store, b, &rows, seed, true)
    }

    /// [`BertModel::forward_cls_t`] in evaluation, keeping one layer's activations at a time: each
    /// layer runs on its own tape, dropped before the next (an evaluation batch holds no graph).
    fn cls_eval(&self, store: &ParamStore, b: &BertBatch) -> Result<Tensor> {
        self.check_batch(b)?;
        let rows = Rows::new(b, true)?;
        let mut tape = Tape::new();
        let mut x = self.embed(&mut tape, b, &rows, None)?;
        let n = self.layers.len();
        if n == 0 {
            x = tape.gather_rows(x, &rows.cls_rows())?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let v = tape.value(x)?.clone();
            tape = Tape::new();
            let xi = tape.leaf(v);
            x = layer.forward_t(&mut tape, store, xi, &rows, None, i + 1 == n)?;
        }
        Ok(tape.value(x)?.clone())
    }

    fn encode(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &BertBatch,
        rows: &Arc<Rows>,
        seed: Option<u64>,
        cls_last: bool,
    ) -> Result<Var> {
        let mut x = self.embed(tape, b, rows, seed)?;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            let cls_only = cls_last && i + 1 == n;
            x = if self.gradient_checkpointing {
                let shared = self.bank.map(|b| b.id());
                checkpointed(tape, store, layer, shared, x, rows, seed, cls_only)?
            } else {
                layer.forward_t(tape, store, x, rows, seed, cls_only)?
            };
        }
        Ok(x)
    }

    /// The pooler output `tanh(dense(hidden[CLS]))` `[batch, hidden]` from the last hidden state.
    pub fn pool_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        hidden: Var,
        b: &BertBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        if self.pooler.is_none() {
            return Err(Error::invalid("this BertModel was loaded without a pooler"));
        }
        let cls = tape.cls_pool(hidden, b.batch, b.seq)?;
        self.pool_cls_t(tape, store, cls, seed)
    }

    /// The pooler output `tanh(dense(cls))` from the `[CLS]` rows `[batch, hidden]` (see
    /// [`BertModel::forward_cls_t`]).
    pub fn pool_cls_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        cls: Var,
        seed: Option<u64>,
    ) -> Result<Var> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| Error::invalid("this BertModel was loaded without a pooler"))?;
        let y = pooler.forward_t(tape, store, cls, seed)?;
        tape.tanh(y)
    }
}

/// Records `layer` so that its inner activations are not kept: the forward runs on a private tape, and
/// the backward runs it again (same dropout masks, from the same seed) and backpropagates through it.
#[allow(clippy::too_many_arguments)]
fn checkpointed(
    tape: &mut Tape,
    store: &ParamStore,
    layer: &Arc<BertLayer>,
    shared: Option<ParamId>,
    x: Var,
    rows: &Arc<Rows>,
    seed: Option<u64>,
    cls_only: bool,
) -> Result<Var> {
    let out = {
        let mut inner = Tape::new();
        let xi = inner.leaf(tape.value(x)?.clone());
        let y = layer.forward_t(&mut inner, store, xi, rows, seed, cls_only)?;
        inner.value(y)?.clone()
    };
    let mut inputs = vec![x];
    // The parameters this layer reads: its adapters' and the shared VB-LoRA bank.
    let own: Vec<ParamId> = layer
        .slots()
        .iter()
        .flat_map(|s| s.param_ids())
        .chain(shared)
        .collect();
    for &id in &own {
        inputs.push(tape.param(store, id)?);
    }
    tape.record(
        &inputs,
        out,
        Box::new(CheckpointOp {
            layer: Arc::clone(layer),
            store: snapshot(store)?,
            params: own,
            rows: Arc::clone(rows),
            seed,
            cls_only,
        }),
    )
}

/// A copy of `store` with the same ids, names, values (shared) and trainable flags.
fn snapshot(store: &ParamStore) -> Result<ParamStore> {
    let mut s = ParamStore::new();
    for (id, name, value) in store.iter() {
        let nid = s.insert(name, value.clone())?;
        debug_assert_eq!(nid, id);
        s.set_trainable(nid, store.is_trainable(id))?;
    }
    Ok(s)
}

struct CheckpointOp {
    layer: Arc<BertLayer>,
    store: ParamStore,
    params: Vec<ParamId>,
    rows: Arc<Rows>,
    seed: Option<u64>,
    cls_only: bool,
}

/// The name the checkpointed layer's input gets in the recomputation store (not a valid module key).
const CHECKPOINT_INPUT: &str = "\u{0}checkpoint.input";

impl Backward for CheckpointOp {
    fn backward(&self, g: &Tensor, inputs: &[&Tensor], _out: &Tensor, needs: &[bool]) -> Grads {
        let x = inputs
            .first()
            .ok_or_else(|| Error::invalid("checkpoint: no input"))?;
        let mut store = snapshot(&self.store)?;
        let xid = store.insert(CHECKPOINT_INPUT, (*x).clone())?;
        let mut tape = Tape::new();
        let xv = tape.param(&store, xid)?;
        let y = self
            .layer
            .forward_t(&mut tape, &store, xv, &self.rows, self.seed, self.cls_only)?;
        let mut grads = tape.backward_with(y, g.clone())?;
        let mut out = Vec::with_capacity(inputs.len());
        out.push(
            grads
                .remove(xid)
                .filter(|_| needs.first().copied().unwrap_or(false)),
        );
        for (i, id) in self.params.iter().enumerate() {
            out.push(
                grads
                    .remove(*id)
                    .filter(|_| needs.get(i + 1).copied().unwrap_or(false)),
            );
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "checkpointed_bert_layer"
    }
}

/// The bytes of one training step's memory, by kind ([`BertForSequenceClassification::memory_report`]).
/// The process's resident set adds the allocator's slack, the tokenizer, the data and the runtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Frozen weights as stored: embedding tables, LayerNorm affines, base linears (4-bit codes and
    /// their quantization state, or dense) and biases.
    pub weights: usize,
    /// Trainable parameters (adapters, a VB-LoRA bank, the classifier), as the store holds them.
    pub trainable: usize,
    /// Their gradients (f32, one per trainable element).
    pub gradients: usize,
    /// AdamW's first and second moments (f32, two per trainable element). An 8-bit optimizer's state
    /// is smaller: use its own count (`Optimizer::total_state_bytes`) after a step.
    pub optimizer_state: usize,
    /// The values one training forward keeps on the tape for backward, parameters excluded.
    pub activations: usize,
}

impl MemoryReport {
    /// The sum of all kinds.
    pub fn total(&self) -> usize {
        self.weights + self.trainable + self.gradients + self.optimizer_state + self.activations
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: usize| b as f64 / 1e6;
        write!(
            f,
            "weights {:.1} MB, trainable {:.2} MB, gradients {:.2} MB, optimizer state {:.2} MB, activations {:.1} MB (total {:.1} MB)",
            mb(self.weights),
            mb(self.trainable),
            mb(self.gradients),
            mb(self.optimizer_state),
            mb(self.activations),
            mb(self.total())
        )
    }
}

/// `BertForSequenceClassification`: BERT, pooler, dropout, classifier `[num_labels, hidden]`.
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    bert: BertModel,
    classifier: TrainedLinear,
}

impl BertForSequenceClassification {
    /// Loads BERT (module prefix `bert`) and the classifier: from the checkpoint if it has
    /// `classifier.weight` / `.bias` (shapes checked), else initialized as transformers does (weight
    /// normal(0, initializer_range) from `seed`, bias 0). The classifier's parameters go into `store`.
    pub fn load(
        ckpt: &Checkpoint,
        config: &BertConfig,
        opts: &ModelLoadOptions,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<BertForSequenceClassification> {
        let bert = BertModel::load(ckpt, config, "bert", true, opts)?;
        let (n, h) = (config.num_labels, config.hidden_size);
        let (w, b) = if ckpt.names().any(|k| k == "classifier.weight") {
            (
                ckpt.load_as("classifier.weight", &[n, h], DType::F32, opts.device)?,
                ckpt.load_as("classifier.bias", &[n], DType::F32, opts.device)?,
            )
        } else {
            (
                Tensor::randn(&[n, h], config.initializer_range, seed, DType::F32, opts.device)?,
                Tensor::zeros(&[n], DType::F32, opts.device)?,
            )
        };
        let classifier = TrainedLinear::new("classifier", &format!("{PEFT_PREFIX}classifier"), w, b, store)?;
        Ok(BertForSequenceClassification { bert, classifier })
    }

    /// The backbone.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// The backbone, mutable (gradient checkpointing, adapters).
    pub fn bert_mut(&mut self) -> &mut BertModel {
        &mut self.bert
    }

    /// The classifier (trained fully).
    pub fn classifier(&self) -> &TrainedLinear {
        &self.classifier
    }

    /// Every trainable parameter: adapters, the VB-LoRA bank, the classifier.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut v = self.bert.param_ids();
        v.extend(self.classifier.param_ids());
        v
    }

    /// Logits `[batch, num_labels]` on `tape`.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &BertBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        let cls = self.bert.forward_cls_t(tape, store, b, seed)?;
        let pooled = self.bert.pool_cls_t(tape, store, cls, seed)?;
        let pooled = maybe_dropout(
            tape,
            pooled,
            self.bert.config.classifier_dropout_prob(),
            seed.map(|s| site_seed(s, usize::MAX, 4)),
        )?;
        self.classifier.forward_t(tape, store, pooled)
    }

    /// One training step: forward with dropout (masks from `seed`), mean cross-entropy against `labels`
    /// (`< num_labels`, one per sequence), backward, optimizer update of every trainable parameter.
    /// Returns the loss before the update.
    pub fn train_step(
        &self,
        store: &mut ParamStore,
        opt: &mut crate::optim::AdamW,
        b: &BertBatch,
        labels: &[u32],
        seed: u64,
    ) -> Result<f32> {
        super::train_step(store, opt, |tape, store| {
            let logits = self.forward_t(tape, store, b, Some(seed))?;
            tape.cross_entropy(logits, labels)
        })
    }

    /// Where the memory of a training step goes, in bytes (see [`MemoryReport`]): frozen weights as
    /// stored, trainable parameters, their gradients, AdamW's state, and the activations one training
    /// forward of `b` keeps on the tape (measured by running it).
    pub fn memory_report(&self, store: &ParamStore, b: &BertBatch) -> Result<MemoryReport> {
        let mut trainable = 0;
        let mut elems = 0;
        for id in self.param_ids() {
            if store.is_trainable(id) {
                let t = store.get(id)?;
                trainable += t.size_in_bytes();
                elems += t.numel();
            }
        }
        let activations = {
            let mut tape = Tape::new();
            self.forward_t(&mut tape, store, b, Some(0))?;
            tape.value_bytes()
        };
        Ok(MemoryReport {
            weights: self.bert.frozen_bytes() + self.bert.bank_bytes(store)?,
            trainable,
            gradients: elems * DType::F32.size_in_bytes(),
            optimizer_state: 2 * elems * DType::F32.size_in_bytes(),
            activations,
        })
    }

    /// Logits in evaluation (no dropout), as an f32 `[batch, num_labels]` tensor.
    pub fn logits(&self, store: &ParamStore, b: &BertBatch) -> Result<Tensor> {
        let cls = self.bert.cls_eval(store, b)?;
        let mut tape = Tape::new();
        let c = tape.leaf(cls);
        let pooled = self.bert.pool_cls_t(&mut tape, store, c, None)?;
        let y = self.classifier.forward_t(&mut tape, store, pooled)?;
        tape.value(y)?.to_dtype(DType::F32)
    }

    /// The classifier, trained fully (PEFT's `modules_to_save`).
    fn saved_modules(&self) -> SavedModules {
        let [w, b] = self.classifier.param_ids();
        SavedModules {
            model: "BertForSequenceClassification",
            module: Some("classifier"),
            params: vec![("classifier.weight", w), ("classifier.bias", b)],
        }
    }
}

backbone_adapter_methods!(BertModel);
task_adapter_methods!(BertForSequenceClassification, bert);
