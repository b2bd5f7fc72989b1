//! `LlamaForSequenceClassification` (and Mistral's and Qwen2's): the decoder, the hidden state of each
//! sequence's last non-pad token (transformers: the rightmost position whose id is not
//! `pad_token_id`, so left and right padding both work), and the bias-free `score` head
//! `[num_labels, hidden]`, trained fully (PEFT's `modules_to_save` for SEQ_CLS) under the key PEFT
//! saves it as (`base_model.model.score.weight`).

use super::{LlamaConfig, LlamaModel, TokenBatch};
use crate::autograd::{Backward, ParamId, ParamStore, Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::peft::{AdapterConfig, ExtraKind, PeftAdapter};
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
        tape.record(&[last, w], y, Box::new(ScoreBackward))
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
        let (loss, grads) = {
            let mut tape = Tape::new();
            let logits = self.forward_t(&mut tape, store, b, Some(seed))?;
            let loss = tape.cross_entropy(logits, labels)?;
            (tape.value(loss)?.to_scalar()?, tape.backward(loss)?)
        };
        opt.step(store, &grads)?;
        Ok(loss)
    }

    /// Attaches fresh adapters; the config's `modules_to_save` must name `score` (PEFT's SEQ_CLS
    /// default `["classifier", "score"]`), which is always trained.
    pub fn init_adapter(
        &mut self,
        config: &AdapterConfig,
        store: &mut ParamStore,
        seed: u64,
    ) -> Result<Vec<String>> {
        check_modules_to_save(config)?;
        self.model.init_adapter(config, store, seed)
    }

    /// Loads a PEFT SEQ_CLS adapter directory: its layers and the trained score head
    /// (`base_model.model.score.weight`), which replaces the current one.
    pub fn load_adapter(
        &mut self,
        dir: impl AsRef<std::path::Path>,
        store: &mut ParamStore,
    ) -> Result<PeftAdapter> {
        let dev = store.get(self.score)?.device();
        let adapter = PeftAdapter::load(dir, dev)?;
        check_modules_to_save(&adapter.config)?;
        let layout = adapter.layout()?;
        let e = layout
            .extras
            .iter()
            .find(|e| e.kind == ExtraKind::ModulesToSave && e.base_name == "score.weight")
            .ok_or_else(|| {
                Error::invalid("the adapter lists score in modules_to_save but does not store score.weight")
            })?;
        let t = adapter.tensors[&e.key].to_device(dev)?.to_dtype(DType::F32)?;
        if t.shape() != store.get(self.score)?.shape() {
            return Err(Error::shape(
                "load_adapter",
                format!(
                    "{:?} is {:?}, the score head is {:?}",
                    e.key,
                    t.shape(),
                    store.get(self.score)?.shape()
                ),
            ));
        }
        self.model.attach_adapter(&adapter, store)?;
        store.set(self.score, t)?;
        Ok(adapter)
    }

    /// The adapter in PEFT's file form: the adapter parameters plus `base_model.model.score.weight`.
    pub fn to_peft(&self, config: &AdapterConfig, store: &ParamStore) -> Result<PeftAdapter> {
        check_modules_to_save(config)?;
        let mut a = crate::peft_model::load::adapter_from_store(config, store)?;
        a.tensors.insert(
            SCORE_KEY.to_string(),
            store.get(self.score)?.to_device(Device::Cpu)?,
        );
        a.layout()?;
        Ok(a)
    }

    /// Writes the adapter directory that `PeftModel.from_pretrained(LlamaForSequenceClassification,
    /// dir)` loads.
    pub fn save_adapter(
        &self,
        config: &AdapterConfig,
        store: &ParamStore,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        self.to_peft(config, store)?.save(dir)
    }
}

fn check_modules_to_save(config: &AdapterConfig) -> Result<()> {
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| m.iter().any(|n| n == "score"))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            "a LlamaForSequenceClassification adapter must list \"score\" in modules_to_save (PEFT's SEQ_CLS \
             task_type adds it)",
        ))
    }
}

/// Backward of `x·Wᵀ` with a trained `W`: `dx = dy·W`, `dW = dyᵀ·x` (f32).
struct ScoreBackward;

impl Backward for ScoreBackward {
    fn backward(
        &self,
        g: &Tensor,
        inputs: &[&Tensor],
        _out: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let [x, w] = inputs else {
            return Err(Error::invalid("score: expected inputs [x, W]"));
        };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let dx = need(0)
            .then(|| linear_backward_input(g, &BaseWeight::Dense(w.to_dtype(g.dtype())?), None, Algo::Auto))
            .transpose()?;
        let dw = need(1)
            .then(|| {
                g.to_dtype(DType::F32)?
                    .matmul_t(&x.to_dtype(DType::F32)?, true, false)
            })
            .transpose()?;
        Ok(vec![dx, dw])
    }

    fn name(&self) -> &'static str {
        "score"
    }
}
