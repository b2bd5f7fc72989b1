//! `LlamaForSequenceClassification` (and Mistral's and Qwen2's): the decoder, the hidden state of each
//! sequence's last non-pad token (transformers: the rightmost position whose id is not
//! `pad_token_id`, so left and right padding both work), and the bias-free `score` head
//! `[num_labels, hidden]`, trained fully (PEFT's `modules_to_save` for SEQ_CLS) under the key PEFT
//! saves it as (`base_model.model.score.weight`).

use super::{LlamaConfig, LlamaModel, TokenBatch};
use crate::autograd::ops::binary;
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::models::adapt::{SavedModules, task_adapter_methods};
use crate::models::loader::{Checkpoint, ModelLoadOptions};
use crate::qmatmul::{Algo, BaseWeight, linear_backward_input, linear_forward};
use crate::tensor::{DType, Tensor};

/// The store key of the score head.
const SCORE_KEY: &str = "base_model.model.score.weight";

/// `LlamaForSequenceClassification`.
#[derive(Clone, Debug)]
pub struct LlamaForSequenceClassification {
    model: LlamaModel,
    score: ParamId,
}

/// The row of each sequence's last token whose id is not `pad` (the last row with no pad id given,
/// which transformers allows only for one sequence).
pub fn last_token_rows(b: &TokenBatch, pad: Option<u32>) -> Result<Vec<u32>> {
    b.validate()?;
    let Some(pad) = pad else {
        if b.batch > 1 {
            return Err(Error::invalid(
                "no pad_token_id in the config: batches of more than one sequence cannot be classified",
            ));
        }
        return Ok(vec![(b.seq - 1) as u32]);
    };
    (0..b.batch)
        .map(|i| {
            let row = &b.input_ids[i * b.seq..(i + 1) * b.seq];
            // transformers: argmax of `arange(seq) * (ids != pad)`, 0 when the row is all padding.
            let last = row.iter().rposition(|&t| t != pad).unwrap_or(0);
            u32::try_from(i * b.seq + last).map_err(|_| Error::invalid("batch too large"))
        })
        .collect()
}

impl LlamaForSequenceClassification {
    /// Loads the decoder (module prefix `model`) and the score head: from the checkpoint if it has
    /// `score.weight` (shape checked), else initialized as transformers does (normal(0,
    /// initializer_range) from `seed`). The head goes into `store`.
    pub fn load(
        ckpt: &Checkpoint,
        config: &LlamaConfig,
        opts: &ModelLoadOptions,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<LlamaForSequenceClassification> {
        let model = LlamaModel::load(ckpt, config, "model", opts)?;
        let shape = [config.num_labels, config.hidden_size];
        let w = if ckpt.names().any(|k| k == "score.weight") {
            ckpt.load_as("score.weight", &shape, DType::F32, opts.device)?
        } else {
            Tensor::randn(&shape, config.initializer_range, seed, DType::F32, opts.device)?
        };
        let score = store.insert(SCORE_KEY, w)?;
        Ok(LlamaForSequenceClassification { model, score })
    }

    /// The decoder.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The decoder, mutable.
    pub fn model_mut(&mut self) -> &mut LlamaModel {
        &mut self.model
    }

    /// The score head's parameter.
    pub fn score_id(&self) -> ParamId {
        self.score
    }

    /// Every trainable parameter: adapters, the VB-LoRA bank, the score head.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut v = self.model.param_ids();
        v.push(self.score);
        v
    }

    /// Logits `[batch, num_labels]` on `tape`.
    pub fn forward_t(
        &self,
        tape: &mut Tape,
        store: &ParamStore,
        b: &TokenBatch,
        seed: Option<u64>,
    ) -> Result<Var> {
        let rows = last_token_rows(b, self.model.config().pad_token_id)?;
        let h = self.model.forward_t(tape, store, b, seed)?;
        let last = tape.gather_rows(h, &rows)?;
        let w = tape.param(store, self.score)?;
        let dt = tape.value(last)?.dtype();
        let wt = tape.value(w)?.to_dtype(dt)?;
        let y = linear_forward(tape.value(last)?, &BaseWeight::Dense(wt), None, None, Algo::Auto)?;
        // dx = dy·W, dW = dyᵀ·x (f32).
        let back = binary(
            "score",
            |g, _, w| linear_backward_input(g, &BaseWeight::Dense(w.to_dtype(g.dtype())?), None, Algo::Auto),
            |g, x, _| {
                g.to_dtype(DType::F32)?
                    .matmul_t(&x.to_dtype(DType::F32)?, true, false)
            },
        );
        tape.record(&[last, w], y, back)
    }

    /// Logits in evaluation, as an f32 `[batch, num_labels]` tensor.
    pub fn logits(&self, store: &ParamStore, b: &TokenBatch) -> Result<Tensor> {
        let mut tape = Tape::new();
        let y = self.forward_t(&mut tape, store, b, None)?;
        tape.value(y)?.to_dtype(DType::F32)
    }

    /// One training step: forward (adapter dropout from `seed`), mean cross-entropy against `labels`,
    /// backward, optimizer update. Returns the loss before the update.
    pub fn train_step(
        &self,
        store: &mut ParamStore,
        opt: &mut crate::optim::AdamW,
        b: &TokenBatch,
        labels: &[u32],
        seed: u64,
    ) -> Result<f32> {
        crate::models::train_step(store, opt, |tape, store| {
            let logits = self.forward_t(tape, store, b, Some(seed))?;
            tape.cross_entropy(logits, labels)
        })
    }

    /// The score head, trained fully (PEFT's `modules_to_save`).
    fn saved_modules(&self) -> SavedModules {
        SavedModules {
            model: "LlamaForSequenceClassification",
            module: Some("score"),
            params: vec![("score.weight", self.score)],
        }
    }
}

task_adapter_methods!(LlamaForSequenceClassification, model);
