//! Tape ops of decoder-only language models (Llama, Mistral, Qwen2): the SiLU-gated MLP product and
//! the shifted causal-LM cross-entropy.
//!
//! Both are built from device-generic tensor ops (elementwise product, SiLU and its derivative, the
//! cross-entropy with an ignore index), so they run wherever those run (CPU and CUDA).

use super::ops::{self, Activation};
use super::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

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

/// Rows of logits one chunk of [`Tape::lm_head_causal_lm_loss`] holds (about 4 MiB of f32 logits).
const HEAD_CHUNK_ELEMS: usize = 1 << 20;

/// Backward of the fused LM-head loss: the input gradient for a unit loss gradient was computed in
/// the forward; scale it by the loss gradient.
struct LmHeadLossBackward {
    dh: Tensor,
}

impl Backward for LmHeadLossBackward {
    fn backward(
        &self,
        g: &Tensor,
        _inputs: &[&Tensor],
        _out: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        if !needs.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let g = g.to_device(crate::device::Device::Cpu)?.to_vec_f32()?;
        let &[g] = g.as_slice() else {
            return Err(Error::shape(
                "lm_head_causal_lm_loss",
                "loss gradient must be [1]",
            ));
        };
        Ok(vec![Some(self.dh.scale(g)?)])
    }

    fn name(&self) -> &'static str {
        "lm_head_causal_lm_loss"
    }
}

impl Tape {
    /// [`Tape::causal_lm_loss`] of the logits `h · weightᵀ` of a frozen LM head (`h [batch·seq,
    /// hidden]`, `weight [vocab, hidden]`), without keeping the logits: only the rows that count are
    /// multiplied, a few rows at a time (about 4 MiB of logits per chunk), and when `h` needs a
    /// gradient each chunk's `dh = (softmax − onehot) · weight / count` is computed right away, so the
    /// `[rows, vocab]` logits and their gradient never exist whole. The loss equals
    /// `causal_lm_loss(h·Wᵀ)` (its sum is accumulated in f64 per chunk).
    ///
    /// A CPU fast path: f32 `h` and `weight` on the CPU, an error otherwise (other devices and dtypes
    /// compute the logits and use [`Tape::causal_lm_loss`]). Not yet `LlamaForCausalLM`'s default: see
    /// `LlamaForCausalLM::loss_t`.
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_causal_lm_loss(
        &mut self,
        h: Var,
        weight: &Tensor,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        seq: usize,
        loss_mask: Option<&[u8]>,
    ) -> Result<Var> {
        let op = "lm_head_causal_lm_loss";
        let hv = self.value(h)?;
        let fused = hv.device().is_cpu()
            && weight.device().is_cpu()
            && hv.dtype() == crate::tensor::DType::F32
            && weight.dtype() == crate::tensor::DType::F32;
        if !fused {
            return Err(Error::invalid(format!(
                "{op}: CPU f32 only (got {:?} {} h, {:?} {} weight); elsewhere compute the logits and \
                 use causal_lm_loss",
                hv.device(),
                hv.dtype(),
                weight.device(),
                weight.dtype()
            )));
        }
        let (n, hidden) = match hv.shape() {
            [n, k] => (*n, *k),
            s => return Err(Error::shape(op, format!("h must be [rows, hidden], got {s:?}"))),
        };
        let vocab = match weight.shape() {
            [v, k] if *k == hidden && *v > 0 => *v,
            s => {
                return Err(Error::shape(
                    op,
                    format!("weight must be [vocab, {hidden}], got {s:?}"),
                ));
            }
        };
        let targets = causal_lm_targets(ids, mask, batch, seq, loss_mask)?;
        if targets.len() != n {
            return Err(Error::shape(
                op,
                format!("{} targets for {n} rows", targets.len()),
            ));
        }
        if let Some(&t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= vocab) {
            return Err(Error::invalid(format!("{op}: target {t} >= vocab {vocab}")));
        }
        let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != IGNORE).collect();
        let need_grad = self.requires_grad(h);
        let hd = hv.cpu_data::<f32>(op)?;
        let mut dh = if need_grad {
            vec![0f32; n * hidden]
        } else {
            Vec::new()
        };
        let chunk = (HEAD_CHUNK_ELEMS / vocab).max(1);
        let mut sum = 0f64;
        for part in rows.chunks(chunk) {
            let mut xs = Vec::with_capacity(part.len() * hidden);
            for &r in part {
                xs.extend_from_slice(&hd[r * hidden..(r + 1) * hidden]);
            }
            let xs = Tensor::from_vec(xs, &[part.len(), hidden], crate::device::Device::Cpu)?;
            let logits = xs.matmul_t(weight, false, true)?;
            let t: Vec<u32> = part.iter().map(|&r| targets[r]).collect();
            let (mean, saved) = ops::cross_entropy_forward(&logits, &t, None)?;
            sum += mean.to_scalar()? as f64 * part.len() as f64;
            if need_grad {
                // d(sum over this chunk / total)/dlogits = (softmax − onehot) / total.
                let g = Tensor::from_vec(
                    vec![(part.len() as f64 / rows.len() as f64) as f32],
                    &[1],
                    crate::device::Device::Cpu,
                )?;
                let dl = ops::cross_entropy_backward(&logits, &saved, &g)?;
                drop(logits);
                let dx = dl.matmul(weight)?;
                let dx = dx.cpu_data::<f32>(op)?;
                for (j, &r) in part.iter().enumerate() {
                    dh[r * hidden..(r + 1) * hidden].copy_from_slice(&dx[j * hidden..(j + 1) * hidden]);
                }
            }
        }
        let loss = if rows.is_empty() {
            0.0
        } else {
            sum / rows.len() as f64
        };
        let loss = Tensor::from_vec(vec![loss as f32], &[1], crate::device::Device::Cpu)?;
        if !need_grad || rows.is_empty() {
            return Ok(self.leaf(loss));
        }
        let dh = Tensor::from_vec(dh, &[n, hidden], crate::device::Device::Cpu)?;
        self.record(&[h], loss, Box::new(LmHeadLossBackward { dh }))
    }
}
