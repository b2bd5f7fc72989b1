//! The Llama family of decoders (transformers' `models/llama/modeling_llama.py`, and Mistral and Qwen2,
//! which differ only in biases and defaults): `LlamaModel` (token embedding, pre-RMSNorm decoder layers
//! with rotary causal grouped-query attention and the SiLU-gated MLP, final RMSNorm) and
//! `LlamaForCausalLM` (plus the `lm_head`, tied to the embedding with `tie_word_embeddings`), on the
//! autograd tape.
//!
//! Every projection is a [`LinearSlot`] under transformers' module name
//! (`model.layers.0.self_attn.q_proj` ... `model.layers.0.mlp.down_proj`), so PEFT's `target_modules`,
//! `rank_pattern` and `alpha_pattern` select the same modules as in PEFT. The embedding, the norms and
//! the `lm_head` are frozen.
//!
//! Positions are `0..seq` in every row, as transformers computes them when no `position_ids` are given
//! (also for left padding); padded keys are masked. A query row with no visible key (a left pad) outputs 0;
//! its logits are meaningless, as in transformers.

pub mod config;
pub mod seq_cls;
pub mod tokenizer;

pub use config::{LlamaArch, LlamaConfig};
pub use seq_cls::LlamaForSequenceClassification;
pub use tokenizer::CausalLmTokenizer;

use super::adapt::{SavedModules, backbone_adapter_methods, task_adapter_methods};
use super::linear::LinearSlot;
use super::loader::{Checkpoint, ModelLoadOptions, frozen_linear};
use super::tokenizer::BertBatch;
use crate::adapters::vblora::VbLoraBank;
use crate::attention::AttentionConfig;
use crate::autograd::{Gradients, ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::nn::RopeConfig;
use crate::qmatmul::BaseWeight;
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// A padded batch of token ids (`input_ids`, `attention_mask`; `token_type_ids` are ignored).
pub type TokenBatch = BertBatch;

/// Per-layer constants.
#[derive(Clone, Copy, Debug)]
struct LayerSettings {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope: RopeConfig,
    attn_dropout: f32,
}

/// One decoder layer (`LlamaDecoderLayer`).
#[derive(Clone, Debug)]
pub struct LlamaLayer {
    index: usize,
    q: LinearSlot,
    k: LinearSlot,
    v: LinearSlot,
    o: LinearSlot,
    gate: LinearSlot,
    up: LinearSlot,
    down: LinearSlot,
    input_norm: Tensor,
    post_norm: Tensor,
    s: LayerSettings,
}

impl LlamaLayer {
    fn slots(&self) -> [&LinearSlot; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn slots_mut(&mut self) -> [&mut LinearSlot; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// `x [batch*seq, hidden]` → the layer output.
    #[allow(clippy::too_many_arguments)]
    fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        x: Var,
        mask: &[u8],
        positions: &[u32],
        (batch, seq): (usize, usize),
        seed: Option<u64>,
    ) -> Result<Var> {
        let s = &self.s;
        let h = tape.rms_norm(x, &self.input_norm, s.eps)?;
        let q = self.q.forward_t(tape, store, h, seed)?;
        let k = self.k.forward_t(tape, store, h, seed)?;
        let v = self.v.forward_t(tape, store, h, seed)?;
        let q = tape.rope(q, positions, &s.rope)?;
        let k = tape.rope(k, positions, &s.rope)?;
        let mut cfg = AttentionConfig::new(batch, seq, s.heads, s.head_dim);
        cfg.num_kv_heads = s.kv_heads;
        cfg.causal = true;
        cfg.dropout = seed
            .filter(|_| s.attn_dropout > 0.0)
            .map(|st| (s.attn_dropout, layer_seed(st, self.index)));
        let a = tape.attention(q, k, v, Some(mask), &cfg)?;
        let a = self.o.forward_t(tape, store, a, seed)?;
        let x = tape.add(x, a)?;
        let h = tape.rms_norm(x, &self.post_norm, s.eps)?;
        let g = self.gate.forward_t(tape, store, h, seed)?;
        let u = self.up.forward_t(tape, store, h, seed)?;
        let m = tape.silu_mul(g, u)?;
        let d = self.down.forward_t(tape, store, m, seed)?;
        tape.add(x, d)
    }
}

/// The attention-dropout seed of a layer in one step (SplitMix64 finalizer).
fn layer_seed(step: u64, layer: usize) -> u64 {
    let mut z = step ^ (layer as u64).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `LlamaModel` (also Mistral's and Qwen2's): embedding, decoder layers, final norm.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    config: LlamaConfig,
    prefix: String,
    embed: Tensor,
    layers: Vec<Arc<LlamaLayer>>,
    norm: Tensor,
    bank: Option<VbLoraBank>,
    opts: ModelLoadOptions,
    gradient_checkpointing: bool,
}

impl LlamaModel {
    /// Loads the decoder from `ckpt` (names with or without `model.`), every shape validated against
    /// `config`. `prefix` is the module-name prefix of the linears (`"model"` inside `LlamaForCausalLM`,
    /// `""` for a bare model). Linears selected by `opts.quantize` are quantized; 4-bit checkpoints stay
    /// 4-bit.
    pub fn load(
        ckpt: &Checkpoint,
        config: &LlamaConfig,
        prefix: &str,
        opts: &ModelLoadOptions,
    ) -> Result<LlamaModel> {
        config.validate()?;
        let c = config;
        let h = c.hidden_size;
        let (dt, dev) = opts.float_activations("Llama")?;
        let linear = |module: &str, out, inp, bias| frozen_linear(ckpt, prefix, module, out, inp, bias, opts);
        let s = LayerSettings {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
            rope: c.rope(),
            attn_dropout: c.attention_dropout,
        };
        let (qw, kvw, im) = (c.q_width(), c.kv_width(), c.intermediate_size);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = format!("layers.{i}");
            layers.push(Arc::new(LlamaLayer {
                index: i,
                q: linear(&format!("{l}.self_attn.q_proj"), qw, h, c.qkv_bias)?,
                k: linear(&format!("{l}.self_attn.k_proj"), kvw, h, c.qkv_bias)?,
                v: linear(&format!("{l}.self_attn.v_proj"), kvw, h, c.qkv_bias)?,
                o: linear(&format!("{l}.self_attn.o_proj"), h, qw, c.o_bias)?,
                gate: linear(&format!("{l}.mlp.gate_proj"), im, h, c.mlp_bias)?,
                up: linear(&format!("{l}.mlp.up_proj"), im, h, c.mlp_bias)?,
                down: linear(&format!("{l}.mlp.down_proj"), h, im, c.mlp_bias)?,
                input_norm: ckpt.backbone(&format!("{l}.input_layernorm.weight"), &[h], dt, dev)?,
                post_norm: ckpt.backbone(&format!("{l}.post_attention_layernorm.weight"), &[h], dt, dev)?,
                s,
            }));
        }
        Ok(LlamaModel {
            config: c.clone(),
            prefix: prefix.to_string(),
            embed: ckpt.backbone("embed_tokens.weight", &[c.vocab_size, h], dt, dev)?,
            layers,
            norm: ckpt.backbone("norm.weight", &[h], dt, dev)?,
            bank: None,
            opts: opts.clone(),
            gradient_checkpointing: false,
        })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Gradient checkpointing (off by default): each decoder layer keeps only its input on the tape
    /// and runs again in backward, so a training step holds one layer's activations instead of all of
    /// them. Gradients are the same.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The module-name prefix of the linears (`"model"` inside `LlamaForCausalLM`).
    pub fn module_prefix(&self) -> &str {
        &self.prefix
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed
    }

    /// Every linear slot, in module order.
    pub fn linears(&self) -> Vec<&LinearSlot> {
        self.layers.iter().flat_map(|l| l.slots()).collect()
    }

    fn linears_mut(&mut self) -> Vec<&mut LinearSlot> {
        self.layers
            .iter_mut()
            .flat_map(|l| Arc::make_mut(l).slots_mut())
            .collect()
    }

    /// Bytes of the frozen weights (embedding, norms, linears as stored: 4-bit or dense, biases).
    pub fn frozen_bytes(&self) -> usize {
        let mut n = self.embed.size_in_bytes() + self.norm.size_in_bytes();
        for l in &self.layers {
            n += l.input_norm.size_in_bytes() + l.post_norm.size_in_bytes();
        }
        for s in self.linears() {
            n += s.base().size_in_bytes() + s.bias().map_or(0, Tensor::size_in_bytes);
        }
        n
    }

    fn check_batch(&self, b: &TokenBatch) -> Result<()> {
        b.validate()?;
        if let Some(&t) = b
            .input_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {t} >= vocab_size {}",
                self.config.vocab_size
            )));
        }
        if let Some(w) = self.config.sliding_window
            && b.seq > w
        {
            return Err(Error::invalid(format!(
                "sequence length {} exceeds the sliding window {w} (sliding-window attention is not implemented)",
                b.seq
            )));
        }
        Ok(())
    }

    /// The last hidden state (after the final norm) `[batch*seq, hidden]` on `tape`. `seed`: `Some(step
    /// seed)` for training (adapter and attention dropout), `None` for evaluation.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &TokenBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        self.check_batch(b)?;
        let positions: Arc<[u32]> = (0..b.batch).flat_map(|_| 0..b.seq as u32).collect();
        let mask: Arc<[u8]> = b.attention_mask.as_slice().into();
        let dims = (b.batch, b.seq);
        let mut x = tape.embedding(&self.embed, &b.input_ids)?;
        for layer in &self.layers {
            x = if self.gradient_checkpointing {
                let params = layer
                    .slots()
                    .iter()
                    .flat_map(|s| s.param_ids())
                    .chain(self.bank.map(|b| b.id()))
                    .collect();
                let (l, m, p) = (Arc::clone(layer), Arc::clone(&mask), Arc::clone(&positions));
                let f: Arc<super::checkpoint::LayerFn> =
                    Arc::new(move |t, s, x| l.forward_t(t, s, x, &m, &p, dims, seed));
                super::checkpoint::checkpointed(tape, store, params, x, f)?
            } else {
                layer.forward_t(tape, store, x, &mask, &positions, dims, seed)?
            };
        }
        tape.rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }
}

/// `LlamaForCausalLM` (and `MistralForCausalLM`, `Qwen2ForCausalLM`): the decoder and the frozen
/// `lm_head` `[vocab, hidden]` (the embedding table itself with `tie_word_embeddings`).
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    model: LlamaModel,
    lm_head: LinearSlot,
}

impl LlamaForCausalLM {
    /// Loads the decoder (module prefix `model`) and the `lm_head` from `ckpt`.
    pub fn load(
        ckpt: &Checkpoint,
        config: &LlamaConfig,
        opts: &ModelLoadOptions,
    ) -> Result<LlamaForCausalLM> {
        let model = LlamaModel::load(ckpt, config, "model", opts)?;
        let head = if config.tie_word_embeddings {
            model.embed.clone()
        } else {
            ckpt.load_as(
                "lm_head.weight",
                &[config.vocab_size, config.hidden_size],
                opts.dtype,
                opts.device,
            )?
        };
        Ok(LlamaForCausalLM {
            model,
            lm_head: LinearSlot::frozen("lm_head", BaseWeight::Dense(head), None, opts.algo),
        })
    }

    /// The decoder.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The decoder, mutable (adapters).
    pub fn model_mut(&mut self) -> &mut LlamaModel {
        &mut self.model
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    /// Every trainable parameter.
    pub fn param_ids(&self) -> Vec<ParamId> {
        self.model.param_ids()
    }

    /// Logits `[batch*seq, vocab]` on `tape`.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &TokenBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        let h = self.model.forward_t(tape, store, b, seed)?;
        self.lm_head.forward_t(tape, store, h, None)
    }

    /// Logits in evaluation, as an f32 `[batch*seq, vocab]` tensor.
    pub fn logits(&self, store: &ParamStore, b: &TokenBatch) -> Result<Tensor> {
        let mut tape = Tape::new();
        let y = self.forward_t(&mut tape, store, b, None)?;
        tape.value(y)?.to_dtype(DType::F32)
    }

    /// The mean next-token NLL of the batch (see [`crate::autograd::decoder::causal_lm_targets`]) and the
    /// number of tokens it averages, in evaluation.
    pub fn loss(&self, store: &ParamStore, b: &TokenBatch, loss_mask: Option<&[u8]>) -> Result<(f32, usize)> {
        let t = crate::autograd::decoder::causal_lm_targets(
            &b.input_ids,
            &b.attention_mask,
            b.batch,
            b.seq,
            loss_mask,
        )?;
        let n = t
            .iter()
            .filter(|&&x| x != crate::autograd::decoder::IGNORE)
            .count();
        let mut tape = Tape::new();
        let loss = self.loss_t(&mut tape, store, b, loss_mask, None)?;
        Ok((tape.value(loss)?.to_scalar()?, n))
    }

    /// One training step: forward (adapter dropout from `seed`), the shifted causal-LM loss, backward,
    /// optimizer update of every trainable parameter. Returns the loss before the update.
    pub fn train_step(
        &self,
        store: &mut ParamStore,
        opt: &mut crate::optim::AdamW,
        b: &TokenBatch,
        loss_mask: Option<&[u8]>,
        seed: u64,
    ) -> Result<f32> {
        let (loss, grads) = self.loss_and_grads(store, b, loss_mask, seed)?;
        opt.step(store, &grads)?;
        Ok(loss)
    }

    /// Forward (adapter and attention dropout from `seed`), the shifted causal-LM loss and backward:
    /// the loss and the gradient of every trainable parameter (for an optimizer step or gradient
    /// accumulation). The tape is dropped before it returns.
    pub fn loss_and_grads(
        &self,
        store: &ParamStore,
        b: &TokenBatch,
        loss_mask: Option<&[u8]>,
        seed: u64,
    ) -> Result<(f32, Gradients)> {
        let mut tape = Tape::new();
        let loss = self.loss_t(&mut tape, store, b, loss_mask, Some(seed))?;
        Ok((tape.value(loss)?.to_scalar()?, tape.backward(loss)?))
    }

    /// The shifted causal-LM loss (see [`crate::autograd::decoder::causal_lm_targets`]) on `tape`,
    /// what a training step backpropagates. `seed`: `Some(step seed)` for training dropout.
    ///
    /// The logits are materialized: the fused, chunked [`Tape::lm_head_causal_lm_loss`] keeps them
    /// out of memory but measured slower at issue 16's shape (its 32-row chunks of the 32000-wide
    /// product run the GEMM far below its large-M rate), so it is not the default.
    pub fn loss_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &TokenBatch,
        loss_mask: Option<&[u8]>,
        seed: Option<u64>,
    ) -> Result<Var> {
        let h = self.model.forward_t(tape, store, b, seed)?;
        let (ids, mask) = (&b.input_ids, &b.attention_mask);
        let logits = self.lm_head.forward_t(tape, store, h, None)?;
        tape.causal_lm_loss(logits, ids, mask, b.batch, b.seq, loss_mask)
    }

    /// No module is trained fully.
    fn saved_modules(&self) -> SavedModules {
        SavedModules {
            model: "LlamaForCausalLM",
            module: None,
            params: Vec::new(),
        }
    }
}

backbone_adapter_methods!(LlamaModel);
task_adapter_methods!(LlamaForCausalLM, model);
