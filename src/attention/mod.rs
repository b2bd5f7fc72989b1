//! Scaled dot-product attention (`softmax(scale·Q·Kᵀ + mask)·V`) over token-major activations, forward
//! and backward, on the tape and tape-free.
//!
//! **Layout.** `q` is `[batch*seq_q, num_heads*head_dim]`, `k` and `v` are `[batch*seq_k,
//! num_kv_heads*head_dim]`, exactly what the q/k/v linears produce: head `h` of token `t` is columns
//! `h*head_dim..(h+1)*head_dim` of row `t`. No head is ever copied out: the CPU path hands strided views
//! to the `gemm` crate, the CUDA kernels index the same layout. The output has `q`'s shape.
//!
//! **Masks.** `key_mask` (optional, `[batch*seq_k]`, host bytes) masks out keys whose byte is 0
//! (padding); any other value keeps the key. `causal` lets query `i` see key `j` iff
//! `j <= i + (seq_k - seq_q)` (bottom-right aligned, FlashAttention-2's convention; identical to torch
//! `scaled_dot_product_attention(is_causal=True)` when `seq_q == seq_k`). A query row whose keys are all
//! masked outputs **0** (torch would give NaN; BERT never reads padded query rows), and gets no gradient.
//!
//! **Grouped-query heads.** `num_heads % num_kv_heads == 0`; query head `h` reads kv head
//! `h / (num_heads / num_kv_heads)` (transformers' `repeat_kv`), without copying K/V per query head.
//!
//! **Dropout** on the attention probabilities (`dropout: Some((p, seed))`, as in BERT's
//! `attention_probs_dropout_prob`): probability `(b, h, i, j)` is kept iff
//! `dropout_hash(seed, ((b*H + h)*seq_q + i)*seq_k + j) >= p·2³²` and then scaled by `1/(1-p)`; the mask
//! is regenerated in backward, never stored.
//!
//! **What backward keeps** (FlashAttention, Dao et al. 2022, §3.1): the output and the log-sum-exp of
//! every score row (`[batch*num_heads*seq_q]` f32, `+inf` for a fully masked row), not the
//! `seq_q×seq_k` probabilities: memory is O(seq) per row and P is recomputed as `exp(S - lse)`. Backward
//! is `dP = dO·Vᵀ`, `D = rowsum(dO∘O)`, `dS = P∘(dP∘M - D)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`,
//! `dV = (P∘M)ᵀ·dO` (`M` the scaled dropout mask; `D` absorbs it since `Σⱼ Pᵢⱼ Mᵢⱼ dPᵢⱼ = dOᵢ·Oᵢ`).
//!
//! f16/bf16 inputs are computed with f32 scores, softmax and accumulation, and rounded once at the end.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use crate::autograd::ops::record_fn;
use crate::autograd::{Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

const OP: &str = "attention";

/// Shapes and options of one attention call (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query tokens per sequence.
    pub seq_q: usize,
    /// Key/value tokens per sequence.
    pub seq_k: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (`num_heads % num_kv_heads == 0`; equal to `num_heads` without GQA).
    pub num_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Causal mask, bottom-right aligned.
    pub causal: bool,
    /// Dropout on the attention probabilities: `(p, seed)`, `p` in `[0, 1)`.
    pub dropout: Option<(f32, u64)>,
}

impl AttentionConfig {
    /// Self-attention without GQA, causal mask or dropout, scale `1/sqrt(head_dim)`.
    pub fn new(batch: usize, seq: usize, num_heads: usize, head_dim: usize) -> Self {
        AttentionConfig {
            batch,
            seq_q: seq,
            seq_k: seq,
            num_heads,
            num_kv_heads: num_heads,
            head_dim,
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
            dropout: None,
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// The dropout `(p, seed)` if it drops anything (`p > 0`).
    pub(crate) fn active_dropout(&self) -> Option<(f32, u64)> {
        self.dropout.filter(|&(p, _)| p > 0.0)
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err(Error::invalid(format!(
                "attention: num_heads {}, num_kv_heads {} and head_dim {} must be positive",
                self.num_heads, self.num_kv_heads, self.head_dim
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::invalid(format!(
                "attention: num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(format!(
                "attention: scale {} is not finite",
                self.scale
            )));
        }
        if let Some((p, _)) = self.dropout
            && !(0.0..1.0).contains(&p)
        {
            return Err(Error::invalid(format!(
                "attention: dropout probability {p} is not in [0, 1)"
            )));
        }
        let too_big = [
            self.batch.checked_mul(self.seq_q),
            self.batch.checked_mul(self.seq_k),
            self.num_heads.checked_mul(self.head_dim),
            self.batch
                .checked_mul(self.num_heads)
                .and_then(|x| x.checked_mul(self.seq_q))
                .and_then(|x| x.checked_mul(self.seq_k)),
        ]
        .iter()
        .any(|x| x.is_none_or(|x| x > i64::MAX as usize));
        if too_big {
            return Err(Error::invalid("attention: sizes overflow"));
        }
        Ok(())
    }

    /// Checks `q`, `k`, `v` (and the mask) against the config; returns the common dtype and device.
    fn check_inputs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: Option<&[u8]>,
    ) -> Result<(DType, Device)> {
        self.validate()?;
        let dev = q.check_same_device(k, OP)?;
        q.check_same_device(v, OP)?;
        let dtype = q.check_same_dtype(k, OP)?;
        q.check_same_dtype(v, OP)?;
        dtype.expect_float(OP)?;
        self.expect_shape(q, self.batch * self.seq_q, self.num_heads, "q")?;
        self.expect_shape(k, self.batch * self.seq_k, self.num_kv_heads, "k")?;
        self.expect_shape(v, self.batch * self.seq_k, self.num_kv_heads, "v")?;
        if let Some(m) = key_mask
            && m.len() != self.batch * self.seq_k
        {
            return Err(Error::shape(
                OP,
                format!(
                    "key_mask has {} entries, expected batch*seq_k = {}",
                    m.len(),
                    self.batch * self.seq_k
                ),
            ));
        }
        Ok((dtype, dev))
    }

    fn expect_shape(&self, t: &Tensor, rows: usize, heads: usize, what: &str) -> Result<()> {
        let want = [rows, heads * self.head_dim];
        if t.shape() != want {
            return Err(Error::shape(
                OP,
                format!("{what} is {:?}, expected {want:?} for {self:?}", t.shape()),
            ));
        }
        Ok(())
    }

    /// Elements of the saved log-sum-exp: one per (batch, query head, query token).
    pub fn lse_len(&self) -> usize {
        self.batch * self.num_heads * self.seq_q
    }
}

/// Attention forward without a tape: `(output [batch*seq_q, num_heads*head_dim] in q's dtype, lse
/// [batch*num_heads*seq_q] f32)`. `lse` is what [`attention_backward`] needs besides the inputs and the
/// output.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
) -> Result<(Tensor, Tensor)> {
    let (dtype, dev) = cfg.check_inputs(q, k, v, key_mask)?;
    match (q.storage(), dev) {
        (Storage::Cpu(_), _) => cpu::forward(q, k, v, key_mask, cfg, dtype),
        #[cfg(feature = "cuda")]
        (Storage::Cuda(_), Device::Cuda(ordinal)) => cuda::forward(q, k, v, key_mask, cfg, dtype, ordinal),
        #[cfg(feature = "cuda")]
        _ => Err(Error::device(OP, "storage and device disagree")),
    }
}

/// What the backends' backward reads besides the output gradient: the inputs and the forward's
/// `output` and `lse`, as [`attention_backward`] checked them.
#[derive(Clone, Copy)]
pub(crate) struct Saved<'a> {
    pub(crate) q: &'a Tensor,
    pub(crate) k: &'a Tensor,
    pub(crate) v: &'a Tensor,
    pub(crate) output: &'a Tensor,
    pub(crate) lse: &'a Tensor,
}

/// Attention backward without a tape: `(dq, dk, dv)` in the inputs' dtype, from the inputs, the
/// forward's `output` and `lse`, and the output gradient `grad_out` (same shape as the output).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    output: &Tensor,
    lse: &Tensor,
    grad_out: &Tensor,
    key_mask: Option<&[u8]>,
    cfg: &AttentionConfig,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dtype, dev) = cfg.check_inputs(q, k, v, key_mask)?;
    q.check_same_shape(output, OP)?;
    q.check_same_shape(grad_out, OP)?;
    q.check_same_device(output, OP)?;
    q.check_same_device(grad_out, OP)?;
    q.check_same_device(lse, OP)?;
    if output.dtype() != dtype {
        return Err(Error::dtype(OP, dtype.as_str(), output.dtype()));
    }
    lse.expect_dtype(DType::F32, OP)?;
    if lse.numel() != cfg.lse_len() {
        return Err(Error::shape(
            OP,
            format!(
                "lse has {} elements, expected batch*num_heads*seq_q = {}",
                lse.numel(),
                cfg.lse_len()
            ),
        ));
    }
    // The gradient may come in another float dtype (the tape allows it): compute in the inputs' dtype.
    let grad_out = if grad_out.dtype() == dtype {
        grad_out.clone()
    } else {
        grad_out.to_dtype(dtype)?
    };
    let saved = Saved { q, k, v, output, lse };
    match (q.storage(), dev) {
        (Storage::Cpu(_), _) => cpu::backward(saved, &grad_out, key_mask, cfg, dtype),
        #[cfg(feature = "cuda")]
        (Storage::Cuda(_), Device::Cuda(ordinal)) => {
            cuda::backward(saved, &grad_out, key_mask, cfg, dtype, ordinal)
        }
        #[cfg(feature = "cuda")]
        _ => Err(Error::device(OP, "storage and device disagree")),
    }
}

impl Tape {
    /// Scaled dot-product attention of token-major `q [batch*seq_q, num_heads*head_dim]` and `k`, `v`
    /// `[batch*seq_k, num_kv_heads*head_dim]` (as the linears produce them) to `[batch*seq_q,
    /// num_heads*head_dim]`, with an optional key padding mask `[batch*seq_k]` (0 = padding). Gradients
    /// flow to q, k and v. See the [module docs](crate::attention) for masks, GQA, dropout and what is
    /// saved for backward.
    pub fn attention(
        &mut self,
        q: Var,
        k: Var,
        v: Var,
        key_mask: Option<&[u8]>,
        cfg: &AttentionConfig,
    ) -> Result<Var> {
        let (out, lse) = attention_forward(self.value(q)?, self.value(k)?, self.value(v)?, key_mask, cfg)?;
        // The record keeps the config, the mask and the log-sum-exp (the inputs and the output are the
        // tape's values).
        let (cfg, key_mask) = (cfg.clone(), key_mask.map(<[u8]>::to_vec));
        let back = move |g: &Tensor, inputs: &[&Tensor], output: &Tensor, needs: &[bool]| {
            let [q, k, v] = inputs else {
                return Err(Error::invalid("attention backward: expected 3 inputs"));
            };
            let (dq, dk, dv) = attention_backward(q, k, v, output, &lse, g, key_mask.as_deref(), &cfg)?;
            let pick = |t: Tensor, i: usize| needs.get(i).copied().unwrap_or(false).then_some(t);
            Ok(vec![pick(dq, 0), pick(dk, 1), pick(dv, 2)])
        };
        self.record(&[q, k, v], out, record_fn("attention", back))
    }
}
