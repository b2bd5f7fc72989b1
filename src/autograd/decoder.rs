//! Tape ops of decoder-only language models (Llama, Mistral, Qwen2): the SiLU-gated MLP product and
//! the shifted causal-LM cross-entropy.
//!
//! Both are built from device-generic tensor ops (elementwise product, SiLU and its derivative, the
//! cross-entropy with an ignore index), so they run wherever those run (CPU and CUDA).

use super::ops::{self, Activation};
use super::{Tape, Var};
use crate::error::{Error, Result};

/// The target id that [`causal_lm_targets`] gives a position that does not count.
pub const IGNORE: u32 = u32::MAX;

/// The targets of the shifted causal-LM loss over a padded batch (`ids`, `mask` `[batch·seq]`,
/// sequence-major): position `t` predicts token `t+1` when both are real (`mask` 1) and token `t+1` is
/// not excluded by `loss_mask` (0 = do not train on this token, e.g. a prompt); every other position
/// (the last of each row, padding, the first real token after left padding) gets [`IGNORE`].
///
/// With right padding this is transformers' `ForCausalLMLoss` with `labels = input_ids` and padding
/// labelled -100. With left padding transformers would also score the first real token from a pad
/// position; here it is left out (its only context is padding).
pub fn causal_lm_targets(
    ids: &[u32],
    mask: &[u8],
    batch: usize,
    seq: usize,
    loss_mask: Option<&[u8]>,
) -> Result<Vec<u32>> {
    let n = batch
        .checked_mul(seq)
        .ok_or_else(|| Error::invalid("causal_lm_targets: batch * seq overflows"))?;
    if ids.len() != n || mask.len() != n || loss_mask.is_some_and(|m| m.len() != n) {
        return Err(Error::shape(
            "causal_lm_targets",
            format!(
                "ids {}, mask {}, loss_mask {:?} for batch {batch} x seq {seq}",
                ids.len(),
                mask.len(),
                loss_mask.map(<[u8]>::len)
            ),
        ));
    }
    let mut t = vec![IGNORE; n];
    for b in 0..batch {
        for i in 0..seq.saturating_sub(1) {
            let (cur, next) = (b * seq + i, b * seq + i + 1);
            let counted = loss_mask.is_none_or(|m| m[next] != 0);
            if mask[cur] != 0 && mask[next] != 0 && counted {
                t[cur] = ids[next];
            }
        }
    }
    Ok(t)
}

impl Tape {
    /// `silu(gate) · up` elementwise (the SiLU-gated MLP of Llama: `down_proj(act(gate_proj(x)) *
    /// up_proj(x))`), same shape, dtype and device; gradients to both inputs. In f16/bf16 the SiLU is
    /// rounded to the dtype before the product, as torch does.
    pub fn silu_mul(&mut self, gate: Var, up: Var) -> Result<Var> {
        let y = ops::activation(self.value(gate)?, Activation::Silu)?.mul(self.value(up)?)?;
        // dgate = silu'(gate)·(dy·up), dup = dy·silu(gate).
        let back = ops::binary(
            "silu_mul",
            |dy, g, u| ops::activation_backward(g, &dy.mul(u)?, Activation::Silu),
            |dy, g, _| dy.mul(&ops::activation(g, Activation::Silu)?),
        );
        self.record(&[gate, up], y, back)
    }

    /// The shifted causal-LM loss: mean next-token cross-entropy of `logits [batch·seq, vocab]` over
    /// the positions [`causal_lm_targets`] counts (`ids`, `mask` and the optional `loss_mask` are
    /// `[batch·seq]`). An f32 `[1]` loss; 0 with no gradient when nothing counts.
    pub fn causal_lm_loss(
        &mut self,
        logits: Var,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        seq: usize,
        loss_mask: Option<&[u8]>,
    ) -> Result<Var> {
        let targets = causal_lm_targets(ids, mask, batch, seq, loss_mask)?;
        self.cross_entropy_ignore(logits, &targets, IGNORE)
    }
}
