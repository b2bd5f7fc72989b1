//! The [`Evaluator`] of `peftk qr-adapt` on a BERT sequence classifier: candidates are scored by
//! `peftk finetune`'s own training loop ([`crate::finetune::train()`], method `qr-adaptor`) on a subset
//! of the training data, scored on a held-out split of it (never on the test set); Phase I measures
//! per-unit sensitivity on a few calibration batches.
//!
//! * Fidelity: the base model with every unit at the highest bit-width is the reference; for each unit,
//!   the model with only that unit at the lowest bit-width. The signal is the relative squared change
//!   of the pooled `[CLS]` representation (what the classifier reads) over the calibration batches,
//!   `Σ‖p_u − p_ref‖² / Σ‖p_ref‖²`: the classifier head is not trained yet, so a task loss through it
//!   would measure a random projection; the representation change is the loss increase of any head
//!   that fits the reference to first order.
//! * Plasticity: the gradient norm of fresh rank-`r_max` LoRA adapters on every unit (the `B` factors;
//!   `A`'s gradient is zero while `B = 0`) under the task loss, summed over the calibration batches.

use crate::finetune::{self, Args as FinetuneArgs};
use indicatif::{ProgressBar, ProgressStyle};
use peft_kernels::Result;
use peft_kernels::autograd::{ParamStore, Tape};
use peft_kernels::data::Dataset;
use peft_kernels::kbit::Tier;
use peft_kernels::models::{BertBatch, BertForSequenceClassification, BertTokenizer, ModelLoadOptions};
use peft_kernels::qr_adaptor::search::{Evaluator, Fidelity};
use peft_kernels::qr_adaptor::{Candidate, EmbeddingStorage, Granularity, QrConfig, SearchSpace};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Training length of one fidelity.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Training examples.
    pub examples: usize,
    pub epochs: usize,
}

/// Scores candidates by fine-tuning them.
pub struct TaskEvaluator {
    /// The run template: method qr-adaptor, the search's recipe (data, `--split` for validation).
    pub template: FinetuneArgs,
    pub low: Budget,
    pub high: Budget,
    pub granularity: Granularity,
    pub alpha_over_r: f64,
    pub blocksize: usize,
    pub double_quant: bool,
    /// Calibration examples for Phase I.
    pub calib: Vec<BertBatch>,
    pub calib_labels: Vec<Vec<u32>>,
    pub model_dir: PathBuf,
    pub work: PathBuf,
    pub stop: Arc<AtomicBool>,
    pub quiet: bool,
    /// Storage of the frozen embeddings in every load (sensitivity and candidates) unless the
    /// search chooses it per candidate.
    pub embeddings: EmbeddingStorage,
    bar: Option<(String, ProgressBar)>,
}

impl TaskEvaluator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        template: FinetuneArgs,
        low: Budget,
        high: Budget,
        granularity: Granularity,
        blocksize: usize,
        double_quant: bool,
        model_dir: PathBuf,
        work: PathBuf,
        quiet: bool,
    ) -> Self {
        let alpha_over_r = template.recipe.alpha / template.recipe.r.max(1) as f64;
        TaskEvaluator {
            template,
            low,
            high,
            granularity,
            alpha_over_r,
            blocksize,
            double_quant,
            calib: Vec::new(),
            calib_labels: Vec::new(),
            model_dir,
            work,
            stop: Arc::new(AtomicBool::new(false)),
            quiet,
            embeddings: EmbeddingStorage::F32,
            bar: None,
        }
    }

    /// Calibration batches of 16 from the first `n` examples of `train`.
    pub fn set_calibration(
        &mut self,
        tok: &BertTokenizer,
        train: &Dataset,
        n: usize,
        max_len: usize,
    ) -> Result<()> {
        let n = n.min(train.len());
        for start in (0..n).step_by(16) {
            let end = (start + 16).min(n);
            self.calib
                .push(tok.encode_batch(&train.texts[start..end], max_len)?);
            self.calib_labels.push(train.labels[start..end].to_vec());
        }
        Ok(())
    }

    fn load(
        &self,
        tiers: BTreeMap<String, Tier>,
        store: &mut ParamStore,
    ) -> Result<BertForSequenceClassification> {
        let mut opts: ModelLoadOptions = finetune::load_opts(finetune::Quant::Nf4, self.double_quant);
        if let Some(q) = opts.quantize.as_mut() {
            q.options.blocksize = self.blocksize;
            q.tiers = tiers;
        }
        let mut m = peft_kernels::models::from_pretrained_seq_cls(
            &self.model_dir,
            &opts,
            store,
            self.template.recipe.seed,
        )?;
        if let Some(dt) = self.embeddings.dtype() {
            m.bert_mut().set_embedding_dtype(dt)?;
        }
        Ok(m)
    }

    /// Pooled `[CLS]` outputs of the calibration batches (evaluation mode), concatenated.
    fn pooled(&self, m: &BertForSequenceClassification, store: &ParamStore) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for b in &self.calib {
            let mut tape = Tape::new();
            let cls = m.bert().forward_cls_t(&mut tape, store, b, None)?;
            let p = m.bert().pool_cls_t(&mut tape, store, cls, None)?;
            out.extend(tape.value(p)?.to_vec_f32()?);
        }
        Ok(out)
    }

    /// The relative squared change `Σ‖p − p_ref‖² / Σ‖p_ref‖²` of the pooled outputs of `m`.
    fn pooled_change(
        &self,
        m: &BertForSequenceClassification,
        store: &ParamStore,
        p_ref: &[f32],
        norm: f64,
    ) -> Result<f64> {
        let p = self.pooled(m, store)?;
        let d: f64 = p
            .iter()
            .zip(p_ref)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        Ok(d / norm)
    }

    fn tiers_all(space: &SearchSpace, tier: Tier) -> BTreeMap<String, Tier> {
        space
            .units
            .iter()
            .flat_map(|u| u.modules.iter().map(move |m| (m.name.clone(), tier)))
            .collect()
    }

    fn set_bar(&mut self, phase: &str, done: usize, total: usize) {
        if self.quiet {
            return;
        }
        let same = self.bar.as_ref().is_some_and(|(p, _)| p == phase);
        if !same {
            if let Some((_, b)) = self.bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>14} {bar:30} {pos}/{len} ETA {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(phase.to_string());
            self.bar = Some((phase.to_string(), b));
        }
        if let Some((_, b)) = &self.bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }

    /// Prints a line above the progress bar (or to stderr).
    pub fn note(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some((_, b)) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Ends the progress bar.
    pub fn finish(&mut self) {
        if let Some((_, b)) = self.bar.take() {
            b.finish();
        }
    }

    /// The finetune run of `qc` for `budget` in `self.work`.
    pub fn run_config(&self, qc: &QrConfig, budget: Option<Budget>) -> Result<finetune::RunSummary> {
        std::fs::create_dir_all(&self.work).map_err(|e| peft_kernels::Error::Io {
            path: self.work.clone(),
            source: e,
        })?;
        qc.save(&self.work)?;
        let mut a = self.template.clone();
        a.qr_config = Some(self.work.join(peft_kernels::qr_adaptor::CONFIG_FILE));
        a.out = self.work.join("run");
        if let Some(b) = budget {
            a.recipe.limit = Some(b.examples);
            a.recipe.epochs = b.epochs;
        }
        finetune::train(&a, Some(self.stop.clone()))
    }
}

impl Evaluator for TaskEvaluator {
    fn sensitivity(&mut self, space: &SearchSpace) -> Result<(Vec<f64>, Vec<f64>)> {
        let (lo, hi) = (space.bits[0], space.bits[space.bits.len() - 1]);
        let n = space.units.len();
        let mut store = ParamStore::new();
        let reference = self.load(Self::tiers_all(space, hi), &mut store)?;
        let p_ref = self.pooled(&reference, &store)?;
        let norm: f64 = p_ref.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().max(1e-30);
        // Plasticity on the reference base: fresh adapters of the largest rank on every unit.
        let r_max = space.ranks[space.ranks.len() - 1].max(1);
        let mut plasticity = vec![0.0; n];
        {
            let mut store = ParamStore::new();
            let mut m = self.load(Self::tiers_all(space, hi), &mut store)?;
            let mut qc = QrConfig::from_candidate(
                space,
                &space.uniform(space.bits.len() - 1, space.ranks.len() - 1),
                self.granularity,
                self.alpha_over_r,
                &Default::default(),
                0,
                0,
            )?;
            for u in &mut qc.units {
                u.rank = r_max;
            }
            let mut c = qc.adapter_config(0.0)?.ok_or_else(|| {
                peft_kernels::Error::InvalidArgument("no adapter for the plasticity signal".into())
            })?;
            c.task_type = Some("SEQ_CLS".into());
            c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
            m.init_adapter(&c, &mut store, self.template.recipe.seed.wrapping_add(1))?;
            let mut sq: BTreeMap<String, f64> = BTreeMap::new();
            for (b, labels) in self.calib.iter().zip(&self.calib_labels) {
                let mut tape = Tape::new();
                let logits = m.forward_t(&mut tape, &store, b, None)?;
                let loss = tape.cross_entropy(logits, labels)?;
                let grads = tape.backward(loss)?;
                for (id, g) in grads.iter() {
                    let name = store.name(id)?.to_string();
                    let s: f64 = g.to_vec_f32()?.iter().map(|&x| (x as f64).powi(2)).sum();
                    *sq.entry(name).or_default() += s;
                }
            }
            for (u, unit) in space.units.iter().enumerate() {
                let mut s = 0.0;
                for module in &unit.modules {
                    let prefix = format!("base_model.model.{}.lora_", module.name);
                    s += sq
                        .iter()
                        .filter(|(k, _)| k.starts_with(&prefix))
                        .map(|(_, v)| v)
                        .sum::<f64>();
                }
                plasticity[u] = s.sqrt();
            }
        }
        let mut fidelity = vec![0.0; n];
        if lo != hi {
            for (u, unit) in space.units.iter().enumerate() {
                self.set_bar("sensitivity", u, n);
                let mut tiers = Self::tiers_all(space, hi);
                for m in &unit.modules {
                    tiers.insert(m.name.clone(), lo);
                }
                let mut store = ParamStore::new();
                let m = self.load(tiers, &mut store)?;
                fidelity[u] = self.pooled_change(&m, &store, &p_ref, norm)?;
            }
        }
        // The embedding gene: every linear at the highest bit-width, only the tables at the
        // cheapest storage (the reference holds them as loaded).
        if space.embedding_gene().is_some() {
            let mut store = ParamStore::new();
            let mut m = self.load(Self::tiers_all(space, hi), &mut store)?;
            if let Some(dt) = space.embeddings[0].dtype() {
                m.bert_mut().set_embedding_dtype(dt)?;
            }
            fidelity.push(self.pooled_change(&m, &store, &p_ref, norm)?);
            plasticity.push(0.0);
        }
        self.set_bar("sensitivity", n, n);
        Ok((fidelity, plasticity))
    }

    fn evaluate(&mut self, space: &SearchSpace, cand: &Candidate, fidelity: Fidelity) -> Result<f64> {
        let qc = QrConfig::from_candidate(
            space,
            cand,
            self.granularity,
            self.alpha_over_r,
            &peft_kernels::quant::QuantizeOptions {
                blocksize: self.blocksize,
                double_quant: self.double_quant,
                ..Default::default()
            },
            0,
            0,
        )?;
        // A searched storage comes with the candidate; otherwise the fixed one.
        let qc = QrConfig {
            embeddings: space.embedding_of(cand).unwrap_or(self.embeddings),
            ..qc
        };
        let budget = match fidelity {
            Fidelity::Low => self.low,
            Fidelity::High => self.high,
        };
        let s = self.run_config(&qc, Some(budget))?;
        Ok(s.accuracy)
    }

    fn progress(&mut self, phase: &str, done: usize, total: usize) {
        self.set_bar(phase, done, total);
    }
}
