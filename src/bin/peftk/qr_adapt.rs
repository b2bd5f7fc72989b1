//! `peftk qr-adapt`: the QR-Adaptor search (per-layer base bit-width and adapter rank under a memory
//! budget, scored by fine-tuning on the task) on a BERT sequence classifier, then a full fine-tune of
//! the chosen configuration. Also the `--method qr-adaptor` hook of `peftk finetune`.
//!
//! Writes to `--out`: `qr_adaptor.json` (the chosen bits and ranks), `search.jsonl` (every
//! evaluation; a rerun with the same arguments resumes from it), `pareto.svg` / `pareto.png`,
//! `search_summary.json`, and the final fine-tune's output as `peftk finetune` writes it (`adapter/`
//! with `adapter_config.json` carrying `rank_pattern` / `alpha_pattern`, `metrics.jsonl`,
//! `summary.json`, `checkpoint/`).

use crate::finetune::{self, Method, Quant, Recipe};
use crate::qr_adapt_eval::{Budget, TaskEvaluator};
use clap::Args as ClapArgs;
use peft_kernels::autograd::ParamStore;
use peft_kernels::io::peft::AdapterConfig;
use peft_kernels::kbit::Tier;
use peft_kernels::models::{BertForSequenceClassification, BertTokenizer, ModelLoadOptions};
use peft_kernels::qr_adaptor::memory::{self, OptimBytes};
use peft_kernels::qr_adaptor::search::{self, SearchConfig};
use peft_kernels::qr_adaptor::{CONFIG_FILE, EmbeddingStorage, Granularity, QrConfig, SearchSpace, units};
use peft_kernels::{Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

const MIB: f64 = 1024.0 * 1024.0;

/// `peftk qr-adapt`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Memory budget in MiB (base weights + adapters + gradients + optimizer state + the fixed
    /// embeddings, norms and head; no activations). Default: what uniform NF4 (double-quantized) with
    /// LoRA rank --r on every linear takes.
    #[arg(long)]
    pub budget_mb: Option<f64>,
    /// Base bit-widths to choose from (2, 3, 4, 8, 16).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,8,16")]
    pub bits: Vec<Tier>,
    /// Adapter ranks to choose from (0 = no adapter on that linear).
    #[arg(long, value_delimiter = ',', default_value = "0,4,8,16")]
    pub ranks: Vec<usize>,
    /// Search unit: every transformer block (default) or every linear (layer). Per block is the
    /// default because the search scores candidates on a few hundred validation examples (a standard
    /// error near 0.015 in accuracy): 8 genes are ranked reliably by a few dozen such scores, the 38
    /// of per-linear granularity on MiniLM are not (docs/qr_adaptor.md).
    #[arg(long, default_value = "block")]
    pub granularity: Granularity,
    #[arg(long, default_value_t = 8)]
    pub population: usize,
    #[arg(long, default_value_t = 3)]
    pub generations: usize,
    /// Stop Phase II after this many generations without hypervolume growth (0: never).
    #[arg(long, default_value_t = 2)]
    pub patience: usize,
    /// Run Phase III (Gaussian-process expected improvement) for --phase3-iters evaluations.
    #[arg(long)]
    pub phase3: bool,
    #[arg(long, default_value_t = 4)]
    pub phase3_iters: usize,
    /// Configurations re-scored with the longer (high-fidelity) fine-tune at the end; the Spearman
    /// correlation of their low- and high-fidelity scores is logged (rank stability).
    #[arg(long, default_value_t = 4)]
    pub high_fidelity: usize,
    /// Low fidelity: training examples and epochs of each candidate's fine-tune (the demo: 1024 x 1
    /// is 64 steps, past the steep start of the learning curve; 256 x 1 scored near chance).
    #[arg(long, default_value_t = 1024)]
    pub low_examples: usize,
    #[arg(long, default_value_t = 1)]
    pub low_epochs: usize,
    /// High fidelity: training examples and epochs (the demo: all 1,800 of the search's training
    /// split, 113 steps).
    #[arg(long, default_value_t = 2048)]
    pub high_examples: usize,
    #[arg(long, default_value_t = 1)]
    pub high_epochs: usize,
    /// Fraction of the training data held out to score candidates (the test set is never used by
    /// the search; the demo: 400 of 2,000 examples).
    #[arg(long, default_value_t = 0.2)]
    pub val_split: f64,
    /// Calibration examples for the sensitivity phase.
    #[arg(long, default_value_t = 64)]
    pub calib: usize,
    /// A fixed storage of the frozen word/position/token-type embeddings for every configuration,
    /// the references included: f32 (as loaded) or bf16 (half the bytes; counted by the memory
    /// model). Giving it turns --search-embeddings off.
    #[arg(long, conflicts_with = "search_embeddings")]
    pub embeddings: Option<EmbeddingStorage>,
    /// Search the embedding tables' storage (f32 or bf16) as one more gene of every configuration,
    /// with the linears' bits and ranks; the uniform-QLoRA references keep them as loaded (f32).
    /// `--search-embeddings false`: f32 for every configuration.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub search_embeddings: bool,
    /// Search only: no final fine-tune of the chosen configuration.
    #[arg(long)]
    pub no_final: bool,
    /// Output directory.
    #[arg(long, default_value = "peftk-qr")]
    pub out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// The training recipe of the candidates' fine-tunes and of the final one (its --epochs, --limit
    /// and --test apply to the final run; --r and --alpha give the reference QLoRA and alpha/r).
    #[command(flatten)]
    pub recipe: Recipe,
}

fn inv(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The `qr_adaptor.json` of a `peftk finetune` run: `--qr-config` with `--method qr-adaptor`, else
/// `None`.
pub fn run_config(a: &finetune::Args) -> Result<Option<QrConfig>> {
    if a.method != Method::QrAdaptor {
        return Ok(None);
    }
    let path = a
        .qr_config
        .as_ref()
        .ok_or_else(|| inv("--method qr-adaptor needs --qr-config FILE (a qr_adaptor.json)"))?;
    QrConfig::load(path).map(Some)
}

/// The storage `peftk eval` / `predict` load an adapter's base in: `--qr-config FILE`, else the
/// `qr_adaptor.json` that `peftk finetune --method qr-adaptor` saves beside the adapter, else `None`
/// (uniform `--quantize`).
pub fn adapter_config(adapter: &Path, explicit: Option<&Path>) -> Result<Option<QrConfig>> {
    match explicit {
        Some(p) => QrConfig::load(p).map(Some),
        None if adapter.join(CONFIG_FILE).is_file() => QrConfig::load(adapter).map(Some),
        None => Ok(None),
    }
}

/// The load options of a base stored as `qc` says: every linear in its tier (`quant` picks NF4 or FP4
/// for the 4-bit tier; `none` means NF4).
pub fn load_opts(qc: &QrConfig, quant: Quant) -> ModelLoadOptions {
    let quant = if quant == Quant::None { Quant::Nf4 } else { quant };
    let mut opts = finetune::load_opts(quant, qc.double_quant);
    if let Some(q) = opts.quantize.as_mut() {
        q.options.blocksize = qc.blocksize;
        q.tiers = qc.tiers();
    }
    opts
}

/// What the load options cannot carry, applied to a model loaded with [`load_opts`]: the storage of
/// the frozen embedding tables.
pub fn apply_to_model(qc: &QrConfig, m: &mut BertForSequenceClassification) -> Result<()> {
    apply_embeddings(qc.embeddings, m)
}

fn apply_embeddings(e: EmbeddingStorage, m: &mut BertForSequenceClassification) -> Result<()> {
    match e.dtype() {
        Some(dt) => m.bert_mut().set_embedding_dtype(dt),
        None => Ok(()),
    }
}

/// `peftk finetune --method qr-adaptor --qr-config FILE`: the load options (every linear in its tier)
/// and the LoRA config (`rank_pattern` / `alpha_pattern`; `None` when every rank is 0) of the file.
pub fn finetune_setup(a: &finetune::Args) -> Result<(ModelLoadOptions, Option<AdapterConfig>)> {
    let qc = run_config(a)?.ok_or_else(|| inv("finetune_setup needs --method qr-adaptor"))?;
    let opts = load_opts(&qc, a.quantize);
    let config = qc.adapter_config(a.recipe.dropout)?.map(|mut c| {
        c.task_type = Some("SEQ_CLS".into());
        c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
        c
    });
    Ok((opts, config))
}

/// The finetune arguments of a run of `recipe` with `method`.
fn finetune_args(recipe: Recipe, out: PathBuf) -> finetune::Args {
    finetune::Args {
        method: Method::QrAdaptor,
        quantize: Quant::Nf4,
        double_quant: true,
        recipe,
        out,
        resume: None,
        stop_after_steps: None,
        quiet: true,
        task: "seq-cls".into(),
        qr_config: None,
        compute_dtype: "f32".into(),
    }
}

pub fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let r = &a.recipe;
    finetune::check_device(&r.device)?;
    if !(a.val_split > 0.0 && a.val_split < 1.0) {
        return Err(inv("--val-split must be in (0, 1)"));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let mdir = finetune::model_dir(&r.model)?;
    // The search's data: the training files with a held-out validation split (the demo's training
    // files when none are given); never the test set.
    let mut search_recipe = r.clone();
    if search_recipe.data.is_empty() {
        let d = finetune::demo_dir()?.join("sentiment");
        search_recipe.data = vec![d.join("imdb.json"), d.join("yelp.json")];
    }
    search_recipe.test = None;
    search_recipe.split = Some(a.val_split);
    let (train, _val) = finetune::load_data(&search_recipe)?;
    let tok = BertTokenizer::from_file(mdir.join("tokenizer.json"))?;

    // The model's linears and the memory model, from a dense load.
    let optim = match r.optim {
        finetune::OptimArg::Adamw => OptimBytes::AdamW,
        finetune::OptimArg::Adamw8bit => OptimBytes::AdamW8bit,
    };
    let (blocksize, dq) = (64, true);
    // The tables' storage: fixed (--embeddings, or f32 with --search-embeddings false) or searched
    // (the fixed part is counted from the f32 load, each candidate's tables from its gene).
    let search_emb = a.embeddings.is_none() && a.search_embeddings;
    let fixed_emb = a.embeddings.unwrap_or_default();
    let (linears, mm) = {
        let mut store = ParamStore::new();
        let mut m = finetune::load_classifier(
            &mdir,
            &ModelLoadOptions::default(),
            &mut store,
            r.seed,
            train.label_map.len(),
        )?;
        apply_embeddings(fixed_emb, &mut m)?;
        memory::for_seq_cls(&m, &store, optim, blocksize, dq)?
    };
    let space = SearchSpace::new(units(&linears, a.granularity), a.bits.clone(), a.ranks.clone())?
        .with_embeddings(if search_emb {
            vec![EmbeddingStorage::Bf16, EmbeddingStorage::F32]
        } else {
            Vec::new()
        });
    let reference_ranks: Vec<usize> = [r.r / 2, r.r, 2 * r.r]
        .into_iter()
        .filter(|x| *x > 0 && space.ranks.contains(x))
        .collect();
    let four = space.bits.iter().position(|&t| t == Tier::Bits4);
    let references: Vec<_> = match four {
        Some(b) => reference_ranks
            .iter()
            .map(|x| space.uniform(b, space.ranks.iter().position(|y| y == x).unwrap_or(0)))
            .collect(),
        None => Vec::new(),
    };
    let qlora = four
        .zip(space.ranks.iter().position(|&x| x == r.r))
        .map(|(b, k)| space.uniform(b, k));
    // Seeds: every bit-width uniformly at rank --r, the tables at their cheapest storage, each
    // repaired into the budget by the search.
    let seeds: Vec<_> = match space.ranks.iter().position(|&x| x == r.r) {
        Some(k) => (0..space.bits.len())
            .rev()
            .map(|b| {
                let mut c = space.uniform(b, k);
                if let Some(g) = space.embedding_gene() {
                    c.0[g].bits = 0;
                }
                c
            })
            .collect(),
        None => Vec::new(),
    };
    let budget_bytes = match (a.budget_mb, &qlora) {
        (Some(mb), _) if mb > 0.0 && mb.is_finite() => (mb * MIB) as usize,
        (Some(mb), _) => return Err(inv(format!("--budget-mb {mb}: must be positive"))),
        (None, Some(q)) => mm.total(&space, q),
        (None, None) => {
            return Err(inv(
                "without --budget-mb the budget is uniform 4-bit at rank --r: put 4 in --bits and --r in --ranks",
            ));
        }
    };
    let cfg = SearchConfig {
        population: a.population,
        generations: a.generations,
        seed: r.seed,
        budget_bytes,
        high_fidelity: a.high_fidelity,
        patience: a.patience,
        phase3: if a.phase3 { a.phase3_iters } else { 0 },
        references: references.clone(),
        seeds,
        evaluator: format!(
            "seq-cls low {}x{} high {}x{} val-split {} calib {} embeddings {}",
            a.low_examples,
            a.low_epochs,
            a.high_examples,
            a.high_epochs,
            a.val_split,
            a.calib,
            if search_emb {
                "searched".to_string()
            } else {
                format!("{fixed_emb:?}")
            },
        ),
    };
    let mut search_template = finetune_args(search_recipe, a.out.join("work"));
    search_template.recipe.epochs = a.low_epochs;
    let mut ev = TaskEvaluator::new(
        search_template,
        Budget {
            examples: a.low_examples,
            epochs: a.low_epochs,
        },
        Budget {
            examples: a.high_examples,
            epochs: a.high_epochs,
        },
        a.granularity,
        blocksize,
        dq,
        mdir.clone(),
        a.out.join("work"),
        a.quiet,
    );
    ev.embeddings = fixed_emb;
    ev.set_calibration(&tok, &train, a.calib, r.data_args.max_len)?;
    ev.note(&format!(
        "qr-adapt: {} units x bits {:?} x ranks {:?}; budget {:.2} MiB (lowest {:.2}, highest {:.2})",
        space.units.len(),
        space.bits.iter().map(|t| t.bits()).collect::<Vec<_>>(),
        space.ranks,
        budget_bytes as f64 / MIB,
        mm.total(&space, &peft_kernels::qr_adaptor::repair::lowest(&space)) as f64 / MIB,
        mm.total(&space, &space.uniform(usize::MAX, usize::MAX)) as f64 / MIB,
    ));
    let res = search::run(&space, &mm, &cfg, &mut ev, &a.out.join(search::LOG_FILE))?;
    let search_s = t0.elapsed().as_secs_f64();
    let mut qc = QrConfig::from_candidate(
        &space,
        &res.best.candidate,
        a.granularity,
        r.alpha / r.r.max(1) as f64,
        &mm.quantize_options(),
        budget_bytes,
        res.best.memory,
    )?;
    qc.score = Some(res.best.high.unwrap_or(res.best.low));
    if !search_emb {
        qc.embeddings = fixed_emb;
    }
    qc.save(&a.out)?;
    crate::qr_adapt_plot::write(&a.out, &space, &mm, &res, &references, budget_bytes)?;
    let mut summary = json!({
        "budget_bytes": budget_bytes,
        "chosen": {"memory_bytes": res.best.memory, "low": res.best.low, "high": res.best.high,
                   "embeddings": qc.embeddings,
                   "breakdown": mm.breakdown(&space, &res.best.candidate),
                   "config": space.describe(&res.best.candidate)},
        "references": references.iter().map(|c| {
            let e = res.evaluated.iter().find(|e| &e.candidate == c);
            json!({"config": space.describe(c).first(), "memory_bytes": mm.total(&space, c),
                   "low": e.map(|e| e.low)})
        }).collect::<Vec<_>>(),
        "evaluated": res.evaluated.len(),
        "front": res.front.len(),
        "generations_run": res.generations_run,
        "rank_stability": res.rank_stability,
        "hypervolume": res.hypervolume,
        "sensitivity": res.sensitivity,
        "search_s": search_s,
    });
    ev.finish();
    if !a.no_final {
        ev.note("qr-adapt: final fine-tune of the chosen configuration");
        let mut fa = finetune_args(r.clone(), a.out.clone());
        fa.qr_config = Some(a.out.join(peft_kernels::qr_adaptor::CONFIG_FILE));
        fa.quiet = a.quiet;
        let s = finetune::train(&fa, None)?;
        let line = serde_json::to_string(&s).map_err(|e| inv(e.to_string()))?;
        peft_kernels::io::atomic_write(a.out.join(finetune::SUMMARY_FILE), line.as_bytes())?;
        summary["final"] = serde_json::to_value(&s).map_err(|e| inv(e.to_string()))?;
    }
    summary["total_s"] = json!(t0.elapsed().as_secs_f64());
    let text = serde_json::to_string_pretty(&summary).map_err(|e| inv(e.to_string()))?;
    peft_kernels::io::atomic_write(a.out.join("search_summary.json"), text.as_bytes())?;
    println!(
        "{}",
        serde_json::to_string(&summary).map_err(|e| inv(e.to_string()))?
    );
    Ok(())
}
