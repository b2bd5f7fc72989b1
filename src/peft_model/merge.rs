//! Merging PEFT adapters into base weights: the per-layer math ([`merge_lora`], [`lora_delta`]) and the
//! file-level driver behind `peftk merge` ([`merge_into_file`]).
//!
//! # Pluggable methods
//! The driver knows nothing about any method's math. For each adapted module it looks up a
//! [`MergeMethod`] by [`AdapterMethod`] in a [`MergeRegistry`] and hands it the base weight (dequantized,
//! f32, in the checkpoint's stored layout); the method returns the merged weight (and optionally a bias
//! delta). [`MergeRegistry::new`] has LoRA, DoRA, WaveFT (dense ΔW from the spectrum) and VB-LoRA (B·A
//! composed from the bank, full or top-k logits); other methods plug in with [`MergeRegistry::register`]
//! without touching the driver. A method with no implementation is reported before anything is written.
//!
//! # Semantics (PEFT's `merge_and_unload`)
//! * LoRA: `W + s·B·A` (`W + s·(B·A)ᵀ` for `fan_in_fan_out` / GPT-2 `Conv1D`, and for embeddings), computed
//!   in f32 (PEFT also upcasts fp16/bf16 on the CPU) and rounded once to the output dtype. With `lora_bias`,
//!   `bias + s·lora_B.bias` (PEFT's dense layers scale it; its bnb 4-bit layer adds it unscaled, which
//!   disagrees with its own forward — we follow the forward).
//! * DoRA: `W' = (m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A)`, one norm per output feature.
//! * WaveFT: `W + ΔW`, `ΔW = scaling · IDWT2(scatter(spectrum))` (ΔWᵀ with `fan_in_fan_out`).
//! * VB-LoRA: `W + B·A` (`(B·A)ᵀ` with `fan_in_fan_out`), no scaling.
//! * Trained biases (`bias="all"` / `"<method>_only"`) and `modules_to_save` copies replace the base
//!   tensors they stand for (cast to the base tensor's dtype).
//!
//! # Files
//! Every check (keys, shapes, dtypes, method support, 4-bit support) runs before the output is opened.
//! The output is streamed into a temp file in the target directory, one tensor at a time (peak memory:
//! one layer, plus the mmapped base), then fsynced and renamed, so a failure at any point leaves no
//! output. Tensors that are not merged are copied byte for byte, and the base's `__metadata__` is kept.
//!
//! # bitsandbytes 4-bit bases
//! A module whose base weight is stored in the bitsandbytes layout (`<m>.weight` u8 plus
//! `<m>.weight.absmax`, `.quant_map`, `[.nested_absmax, .nested_quant_map]`,
//! `.quant_state.bitsandbytes__nf4|fp4`) is dequantized, merged, and written dense (its quant-state tensors
//! dropped) or, with `requantize`, re-quantized with the same quant-state settings. The dequantize /
//! quantize calls go through the private `fourbit` module below ([`crate::quant::io::load_quantized`],
//! [`crate::quant::QuantizedTensor::dequantize`] / `quantize`, [`crate::quant::io::to_safetensors_entries`]).
//! Re-quantizing is lossy (one more NF4/FP4 rounding of the merged weight), exactly like PEFT's merge into
//! a `Linear4bit`.

use crate::adapters::vblora::VbLoraLayer;
use crate::adapters::waveft::{WaveFtConfig, WaveFtLayer};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::peft::{
    AdapterMethod, AdapterModule, ExtraKind, LayerKind, Part, PeftAdapter, VBLORA_BANK_KEY,
};
use crate::io::{
    SafetensorsFile, TensorBytes, TensorSpec, from_st_dtype, to_st_dtype, write_safetensors_streaming,
};
use crate::tensor::{DType, Tensor};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

// =============================================================================================== math

/// The LoRA update `s·B·A`, f32, in the base weight's stored layout: `[out, in]`, or `[in, out]` when
/// `transposed` (`fan_in_fan_out`, and always for embeddings, where A is `[r, vocab]` and B `[dim, r]`).
/// `a`: `[r, in]`, `b`: `[out, r]`, any float dtype (upcast to f32 first, as PEFT does on the CPU).
///
/// Cost: `out·in·r` multiply-adds; the result is `out·in·4` bytes.
pub fn lora_delta(a: &Tensor, b: &Tensor, scaling: f32, transposed: bool) -> Result<Tensor> {
    lora_product(a, b, transposed)?.scale(scaling)
}

/// `B·A` (or `(B·A)ᵀ`), f32.
fn lora_product(a: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    let op = "lora_delta";
    let (r, _) = a.dims2(op)?;
    let (_, rb) = b.dims2(op)?;
    if r != rb {
        return Err(Error::shape(
            op,
            format!(
                "lora_A {:?} and lora_B {:?} disagree on the rank",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    // (B·A)ᵀ = Aᵀ·Bᵀ: the transposed product comes straight out of the GEMM, no copy.
    if transposed {
        a.matmul_t(&b, true, true)
    } else {
        b.matmul(&a)
    }
}

/// `W + s·B·A` for a dense base weight `[out, in]` (`[in, out]` with `fan_in_fan_out`), computed in f32.
/// Returns f32; cast with [`Tensor::to_dtype`] to store it (one rounding).
///
/// Bytes: the base is read once and the `out·in` f32 product written once and read once (the scaled add
/// is a single axpy pass, rounding `s·(B·A)` and then the sum, like PEFT's `W += (B @ A) * s`).
pub fn merge_lora(
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
    fan_in_fan_out: bool,
) -> Result<Tensor> {
    let ba = lora_product(a, b, fan_in_fan_out)?;
    if base.shape() != ba.shape() {
        return Err(Error::shape(
            "merge_lora",
            format!(
                "base weight {:?} does not fit lora_A {:?} / lora_B {:?}{}",
                base.shape(),
                a.shape(),
                b.shape(),
                if fan_in_fan_out {
                    " (fan_in_fan_out: base stored [in, out])"
                } else {
                    ""
                }
            ),
        ));
    }
    let mut w = base.to_dtype(DType::F32)?;
    w.add_scaled_(&ba, scaling)?;
    Ok(w)
}

/// DoRA merge: `(m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A)`, one norm and one magnitude per output feature.
/// Shapes as in [`merge_lora`]; `magnitude` is `[out]`. Returns f32.
pub fn merge_dora(
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    magnitude: &Tensor,
    scaling: f32,
    fan_in_fan_out: bool,
) -> Result<Tensor> {
    let op = "merge_dora";
    let w = merge_lora(base, a, b, scaling, fan_in_fan_out)?;
    let (rows, cols) = w.dims2(op)?;
    let out = if fan_in_fan_out { cols } else { rows };
    if magnitude.shape() != [out] {
        return Err(Error::shape(
            op,
            format!(
                "magnitude {:?} does not match {out} output features",
                magnitude.shape()
            ),
        ));
    }
    // Norms over `in` for each output feature: rows of [out, in]; columns of the [in, out] layout.
    let norms = if fan_in_fan_out {
        w.t()?.row_norms()?
    } else {
        w.row_norms()?
    };
    let (m, n) = (magnitude.to_vec_f32()?, norms.to_vec::<f32>()?);
    let factor: Vec<f32> = m.iter().zip(&n).map(|(m, n)| m / n).collect();
    let mut v = w.to_vec::<f32>()?;
    if fan_in_fan_out {
        for row in v.chunks_exact_mut(cols) {
            row.iter_mut().zip(&factor).for_each(|(x, f)| *x *= f);
        }
    } else {
        for (row, f) in v.chunks_exact_mut(cols).zip(&factor) {
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
    Tensor::from_vec(v, &[rows, cols], w.device())
}

// =============================================================================================== methods

/// How one adapter method merges into a base weight. Implement it for a new method and register it in a
/// [`MergeRegistry`]; the driver does the rest (files, dtypes, 4-bit bases, validation order).
pub trait MergeMethod: Send + Sync {
    /// Checks that a base weight stored with `base_shape` fits `module`. Called for every module before
    /// anything is computed or written. The default compares with [`AdapterModule::base_weight_shape`]
    /// when the adapter file determines it.
    fn check(&self, _adapter: &PeftAdapter, module: &AdapterModule, base_shape: &[usize]) -> Result<()> {
        match module.base_weight_shape() {
            Some(want) if base_shape != want => Err(Error::shape(
                "merge",
                format!(
                    "module {:?}: base weight is {base_shape:?}, the adapter needs {want:?} ({})",
                    module.name,
                    match (module.layer, module.fan_in_fan_out) {
                        (LayerKind::Embedding, _) => "[vocab, dim]",
                        (_, true) => "[in, out], fan_in_fan_out",
                        _ => "[out, in]",
                    }
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The merged weight: f32, same shape as `weight` (the base weight, f32, stored layout).
    fn merge(&self, adapter: &PeftAdapter, module: &AdapterModule, weight: &Tensor) -> Result<Tensor>;

    /// A term added to the module's base bias (f32 `[out]`), if the method has one.
    fn bias_delta(&self, _adapter: &PeftAdapter, _module: &AdapterModule) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// LoRA (linear and embedding layers).
pub struct LoraMerge;

impl MergeMethod for LoraMerge {
    fn merge(&self, adapter: &PeftAdapter, module: &AdapterModule, weight: &Tensor) -> Result<Tensor> {
        let (pa, pb) = lora_parts(module);
        let transposed = module.fan_in_fan_out || module.layer == LayerKind::Embedding;
        merge_lora(
            weight,
            adapter.module_tensor(&module.name, pa)?,
            adapter.module_tensor(&module.name, pb)?,
            module.scaling as f32,
            transposed,
        )
    }

    fn bias_delta(&self, adapter: &PeftAdapter, module: &AdapterModule) -> Result<Option<Tensor>> {
        if !module.lora_bias {
            return Ok(None);
        }
        let b = adapter.module_tensor(&module.name, Part::LoraBBias)?;
        Ok(Some(b.to_dtype(DType::F32)?.scale(module.scaling as f32)?))
    }
}

/// DoRA on linear layers.
pub struct DoraMerge;

impl MergeMethod for DoraMerge {
    fn merge(&self, adapter: &PeftAdapter, module: &AdapterModule, weight: &Tensor) -> Result<Tensor> {
        if module.layer == LayerKind::Embedding {
            return Err(Error::invalid(format!(
                "module {:?}: merging DoRA on an embedding is not implemented",
                module.name
            )));
        }
        merge_dora(
            weight,
            adapter.module_tensor(&module.name, Part::LoraA)?,
            adapter.module_tensor(&module.name, Part::LoraB)?,
            adapter.module_tensor(&module.name, Part::Magnitude)?,
            module.scaling as f32,
            module.fan_in_fan_out,
        )
    }
}

/// WaveFT: `W + ΔW` with the dense `ΔW = scaling · IDWT2(scatter(spectrum))` of any wavelet family PEFT
/// can build (or the plain scatter without IDWT), computed in f64 and rounded once
/// ([`crate::adapters::waveft::WaveFtLayer::delta_weight`]). The coefficient positions come from
/// `random_loc_seed` and the base weight's shape, as PEFT regenerates them. `fan_in_fan_out` (GPT-2
/// `Conv1D`, weight `[in, out]`) adds `ΔWᵀ`, as PEFT does.
pub struct WaveFtMerge;

impl WaveFtMerge {
    /// The layer geometry of `module` on a base weight stored with `base_shape`.
    fn layer(
        adapter: &PeftAdapter,
        module: &AdapterModule,
        base_shape: &[usize],
        device: Device,
    ) -> Result<WaveFtLayer> {
        let c = adapter
            .config
            .waveft()
            .ok_or_else(|| Error::invalid("WaveFT merge on an adapter whose config is not WaveFT"))?;
        let (out, inp) = out_in(module, base_shape)?;
        let n = module
            .n_frequency
            .ok_or_else(|| Error::invalid(format!("module {:?}: no WaveFT spectrum", module.name)))?;
        let cfg = WaveFtConfig {
            n_frequency: n,
            ..c.into()
        };
        WaveFtLayer::new(out, inp, &cfg, device).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("module {:?}: {m}", module.name)),
            e => e,
        })
    }
}

impl MergeMethod for WaveFtMerge {
    fn check(&self, adapter: &PeftAdapter, module: &AdapterModule, base_shape: &[usize]) -> Result<()> {
        if module.layer != LayerKind::Linear {
            return Err(Error::invalid(format!(
                "module {:?}: WaveFT merges into linear layers only",
                module.name
            )));
        }
        let c = adapter
            .config
            .waveft()
            .ok_or_else(|| Error::invalid("WaveFT merge on an adapter whose config is not WaveFT"))?;
        let (out, inp) = out_in(module, base_shape)?;
        let cfg = WaveFtConfig {
            n_frequency: module.n_frequency.unwrap_or(0),
            ..c.into()
        };
        cfg.validate(out, inp).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("module {:?}: {m}", module.name)),
            e => e,
        })
    }

    fn merge(&self, adapter: &PeftAdapter, module: &AdapterModule, weight: &Tensor) -> Result<Tensor> {
        let layer = Self::layer(adapter, module, weight.shape(), weight.device())?;
        let spectrum = layer.from_spectrum(adapter.module_tensor(&module.name, Part::WaveFtSpectrum)?)?;
        let delta = layer.delta_weight(&spectrum)?;
        let delta = if module.fan_in_fan_out { delta.t()? } else { delta };
        let mut w = weight.to_dtype(DType::F32)?;
        w.add_scaled_(&delta, 1.0)?;
        Ok(w)
    }
}

/// VB-LoRA: `W + B·A` with A and B composed from the shared bank and the module's logits, stored in full
/// or in PEFT's `save_only_topk_weights` form (rebuilt as PEFT does on load,
/// [`crate::adapters::vblora::vblora_expand_topk`]). `fan_in_fan_out` adds `(B·A)ᵀ`.
pub struct VbLoraMerge;

impl VbLoraMerge {
    /// `(bank, logits_A, logits_B)`, f32, on the bank's device.
    fn tensors(
        adapter: &PeftAdapter,
        module: &AdapterModule,
        num_vectors: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let bank = adapter
            .tensors
            .get(VBLORA_BANK_KEY)
            .ok_or_else(|| Error::invalid(format!("VB-LoRA adapter without {VBLORA_BANK_KEY:?}")))?
            .to_dtype(DType::F32)?;
        let logits = |ab: &str| -> Result<Tensor> {
            super::vblora_logits(adapter, module, ab, num_vectors)?
                .to_dtype(DType::F32)?
                .to_device(bank.device())
        };
        let (la, lb) = (logits("A")?, logits("B")?);
        Ok((bank, la, lb))
    }
}

impl MergeMethod for VbLoraMerge {
    fn merge(&self, adapter: &PeftAdapter, module: &AdapterModule, weight: &Tensor) -> Result<Tensor> {
        let c = adapter
            .config
            .vblora()
            .ok_or_else(|| Error::invalid("VB-LoRA merge on an adapter whose config is not VB-LoRA"))?;
        let (out, inp) = out_in(module, weight.shape())?;
        let layer = VbLoraLayer::new(out, inp, &c.into())?;
        let (bank, la, lb) = Self::tensors(adapter, module, c.num_vectors)?;
        let delta = layer.delta_weight(&bank, &la, &lb)?;
        let delta = if module.fan_in_fan_out { delta.t()? } else { delta };
        let mut w = weight.to_dtype(DType::F32)?;
        w.add_scaled_(&delta, 1.0)?;
        Ok(w)
    }
}

/// `(out, in)` of a linear module whose base weight is stored with `shape` (`[in, out]` with
/// `fan_in_fan_out`).
fn out_in(module: &AdapterModule, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [a, b] if module.fan_in_fan_out => Ok((*b, *a)),
        [a, b] => Ok((*a, *b)),
        s => Err(Error::shape(
            "merge",
            format!("module {:?}: base weight {s:?} is not 2-D", module.name),
        )),
    }
}

fn lora_parts(module: &AdapterModule) -> (Part, Part) {
    match module.layer {
        LayerKind::Embedding => (Part::EmbeddingA, Part::EmbeddingB),
        LayerKind::Linear => (Part::LoraA, Part::LoraB),
    }
}

/// The merge implementation of each method.
#[derive(Clone)]
pub struct MergeRegistry {
    methods: BTreeMap<AdapterMethod, Arc<dyn MergeMethod>>,
}

impl Default for MergeRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MergeRegistry {
    /// LoRA, DoRA, WaveFT and VB-LoRA.
    pub fn new() -> MergeRegistry {
        let mut r = MergeRegistry::empty();
        r.register(AdapterMethod::Lora, Arc::new(LoraMerge));
        r.register(AdapterMethod::Dora, Arc::new(DoraMerge));
        r.register(AdapterMethod::WaveFt, Arc::new(WaveFtMerge));
        r.register(AdapterMethod::VbLora, Arc::new(VbLoraMerge));
        r
    }

    /// No methods.
    pub fn empty() -> MergeRegistry {
        MergeRegistry {
            methods: BTreeMap::new(),
        }
    }

    /// Sets (or replaces) the implementation for `method`.
    pub fn register(&mut self, method: AdapterMethod, imp: Arc<dyn MergeMethod>) {
        self.methods.insert(method, imp);
    }

    /// The implementation for `method`.
    pub fn get(&self, method: AdapterMethod) -> Result<&dyn MergeMethod> {
        self.methods.get(&method).map(|m| m.as_ref()).ok_or_else(|| {
            Error::invalid(format!(
                "merging {method} adapters is not implemented yet (available: {})",
                self.methods
                    .keys()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }
}

// =============================================================================================== driver

/// Options of [`merge_into_file`].
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Dtype of the merged weights (default: the base weight's dtype; for a 4-bit base, the dtype recorded
    /// in its quant state). Tensors that are not merged keep their bytes.
    pub dtype: Option<DType>,
    /// Re-quantize merged weights whose base was 4-bit, with the same quant-state settings.
    pub requantize: bool,
    /// Where the merge math runs.
    pub device: Device,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            dtype: None,
            requantize: false,
            device: Device::Cpu,
        }
    }
}

/// What [`merge_into_file`] did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// Modules whose weight was merged.
    pub merged: Vec<String>,
    /// Base tensors replaced by adapter copies (trained biases, `modules_to_save`) or updated biases.
    pub replaced: Vec<String>,
    /// Base tensors copied unchanged.
    pub copied: usize,
    /// Base tensors dropped (quant-state tensors of 4-bit weights written dense).
    pub dropped: Vec<String>,
    /// Size of the output file.
    pub bytes_written: u64,
}

/// Where a base module's weight lives in the checkpoint.
#[derive(Clone, Debug)]
enum BaseWeight {
    Dense {
        name: String,
        dtype: DType,
        shape: Vec<usize>,
    },
    FourBit {
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        aux: Vec<String>,
    },
}

impl BaseWeight {
    fn shape(&self) -> &[usize] {
        match self {
            BaseWeight::Dense { shape, .. } | BaseWeight::FourBit { shape, .. } => shape,
        }
    }
    fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense { dtype, .. } | BaseWeight::FourBit { dtype, .. } => *dtype,
        }
    }
}

/// How each output tensor is produced.
enum Source {
    /// Raw bytes of the base tensor of that name.
    Copy,
    /// Merged weight of module `modules[i]`, written in `dtype`.
    Merged { module: usize, dtype: DType },
    /// Bytes computed while planning (replaced tensors, biases, re-quantized weights).
    Ready(TensorBytes<'static>),
}

/// Merges `adapter` into the safetensors checkpoint `base`, writing `out` (see the module docs). Fails,
/// writing nothing, if a module is missing from the base, a shape does not fit, a method has no merge
/// implementation, a merged value is not finite, or the output cannot be written.
pub fn merge_into_file(
    base: impl AsRef<Path>,
    adapter: &PeftAdapter,
    out: impl AsRef<Path>,
    opts: &MergeOptions,
    registry: &MergeRegistry,
) -> Result<MergeReport> {
    let (base, out) = (base.as_ref(), out.as_ref());
    if crate::io::output::same_file(base, out) {
        return Err(Error::invalid(
            "the output path must differ from the base checkpoint",
        ));
    }
    if let Some(d) = opts.dtype
        && !d.is_float()
    {
        return Err(Error::invalid(format!(
            "merged weights need a float dtype, got {d}"
        )));
    }
    let adapter: Cow<'_, PeftAdapter> = match adapter.tensors.values().next() {
        Some(t) if t.device() != opts.device => Cow::Owned(PeftAdapter {
            config: adapter.config.clone(),
            tensors: adapter
                .tensors
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_device(opts.device)?)))
                .collect::<Result<_>>()?,
        }),
        _ => Cow::Borrowed(adapter),
    };
    let adapter = adapter.as_ref();
    let file = SafetensorsFile::open(base)?;
    let layout = adapter.layout()?;
    let mut report = MergeReport::default();

    // ---- plan: every check happens here, before the output exists.
    let mut bases = Vec::with_capacity(layout.modules.len());
    for m in &layout.modules {
        let imp = registry.get(m.method)?;
        let bw = find_base_weight(&file, &m.name)?;
        imp.check(adapter, m, bw.shape())?;
        if matches!(bw, BaseWeight::FourBit { .. }) {
            fourbit::available()?;
        }
        bases.push(bw);
    }
    if opts.requantize && !bases.iter().any(|b| matches!(b, BaseWeight::FourBit { .. })) {
        return Err(Error::invalid(
            "--requantize needs a bitsandbytes 4-bit base; none of the merged weights is quantized",
        ));
    }

    let mut sources: BTreeMap<String, Source> =
        file.names().iter().map(|n| (n.clone(), Source::Copy)).collect();
    let mut claimed: HashMap<String, String> = HashMap::new(); // base tensor -> who replaces it
    let mut claim = |name: &str, by: &str| -> Result<()> {
        if let Some(prev) = claimed.insert(name.to_string(), by.to_string()) {
            return Err(Error::invalid(format!(
                "base tensor {name:?} is written by both {prev} and {by}"
            )));
        }
        Ok(())
    };

    // Replacements (trained biases, modules_to_save), before bias deltas so that those apply on top.
    let mut replacement: BTreeMap<String, &Tensor> = BTreeMap::new();
    for e in &layout.extras {
        if !matches!(e.kind, ExtraKind::Bias | ExtraKind::ModulesToSave) {
            continue;
        }
        let t = &adapter.tensors[&e.key];
        let (dtype, shape, _) = file.raw(&e.base_name).map_err(|_| {
            Error::format(
                base.display().to_string(),
                format!(
                    "adapter tensor {:?} replaces {:?}, which the base does not have",
                    e.key, e.base_name
                ),
            )
        })?;
        if shape != t.shape() {
            return Err(Error::shape(
                "merge",
                format!(
                    "adapter tensor {:?} is {:?} but base {:?} is {shape:?}",
                    e.key,
                    t.shape(),
                    e.base_name
                ),
            ));
        }
        if from_st_dtype(dtype).is_none_or(|d| d.is_float() != t.dtype().is_float()) {
            return Err(Error::format(
                base.display().to_string(),
                format!(
                    "base tensor {:?} has dtype {dtype:?}, which cannot take {}",
                    e.base_name,
                    t.dtype()
                ),
            ));
        }
        // `bias="all"` saves a modules_to_save bias twice (`x.bias`, `x.modules_to_save.bias`); both are
        // the same parameter, the first one wins.
        replacement.entry(e.base_name.clone()).or_insert(t);
    }
    let mut bias_delta: BTreeMap<String, Tensor> = BTreeMap::new();
    for m in &layout.modules {
        if let Some(d) = registry.get(m.method)?.bias_delta(adapter, m)? {
            let name = format!("{}.bias", m.name);
            if !file.contains(&name) && !replacement.contains_key(&name) {
                return Err(Error::format(
                    base.display().to_string(),
                    format!(
                        "module {:?} has a trained lora_B.bias but the base has no {name:?} to merge it into",
                        m.name
                    ),
                ));
            }
            bias_delta.insert(name, d);
        }
    }
    let mut updated: Vec<String> = replacement.keys().chain(bias_delta.keys()).cloned().collect();
    updated.sort();
    updated.dedup();
    for name in updated {
        let (st, shape, _) = file.raw(&name)?;
        let dtype = from_st_dtype(st)
            .filter(|d| d.is_float())
            .ok_or_else(|| Error::format(base.display().to_string(), format!("{name:?} has dtype {st:?}")))?;
        let mut v = match replacement.get(&name) {
            Some(t) => t.to_dtype(DType::F32)?,
            None => file.load(&name, opts.device)?.to_dtype(DType::F32)?,
        };
        if let Some(d) = bias_delta.get(&name) {
            if d.shape() != shape {
                return Err(Error::shape(
                    "merge",
                    format!("bias delta {:?} does not fit base {name:?} {shape:?}", d.shape()),
                ));
            }
            v = v.add(d)?;
        }
        let t = v.to_dtype(dtype)?;
        check_finite(&t, &name)?;
        claim(&name, "an adapter bias / modules_to_save tensor")?;
        sources.insert(name.clone(), Source::Ready(TensorBytes::from_tensor(&t)?));
        report.replaced.push(name);
    }

    for (i, (m, bw)) in layout.modules.iter().zip(&bases).enumerate() {
        let dtype = opts.dtype.unwrap_or(bw.dtype());
        match bw {
            BaseWeight::Dense { name, .. } => {
                claim(name, &format!("module {:?}", m.name))?;
                sources.insert(name.clone(), Source::Merged { module: i, dtype });
            }
            BaseWeight::FourBit { name, aux, .. } => {
                claim(name, &format!("module {:?}", m.name))?;
                if opts.requantize {
                    // Quantized outputs are small (1/8 of f32) and their quant-state sizes are only known
                    // after quantizing, so they are computed now.
                    let merged = merge_module(&file, adapter, m, bw, registry, opts.device)?;
                    for a in aux {
                        sources.remove(a);
                    }
                    for (k, t) in fourbit::requantize(&file, name, &merged, dtype)? {
                        sources.insert(k, Source::Ready(t));
                    }
                } else {
                    for a in aux {
                        sources.remove(a);
                        report.dropped.push(a.clone());
                    }
                    sources.insert(name.clone(), Source::Merged { module: i, dtype });
                }
            }
        }
        report.merged.push(m.name.clone());
    }

    // ---- write: stream tensor by tensor into a temp file, then rename.
    let mut entries = Vec::with_capacity(sources.len());
    for (name, src) in &sources {
        let (dtype, shape) = match src {
            Source::Copy => {
                let (d, s, _) = file.raw(name)?;
                report.copied += 1;
                (d, s)
            }
            Source::Merged { module, dtype } => (to_st_dtype(*dtype), bases[*module].shape().to_vec()),
            Source::Ready(t) => (t.dtype, t.shape.clone()),
        };
        entries.push(TensorSpec {
            name: name.clone(),
            dtype,
            shape,
        });
    }
    let metadata = file.metadata().cloned();
    report.bytes_written = write_safetensors_streaming(out, entries, metadata, |e| {
        let name = &e.name;
        Ok(match &sources[name] {
            Source::Copy => Cow::Borrowed(file.raw(name)?.2),
            Source::Ready(t) => Cow::Borrowed(&t.data[..]),
            Source::Merged { module, dtype } => {
                let m = &layout.modules[*module];
                let merged = merge_module(&file, adapter, m, &bases[*module], registry, opts.device)?;
                let bytes = merged.to_dtype(*dtype)?.to_bytes()?;
                check_finite_bytes(&bytes, *dtype, name)?;
                Cow::Owned(bytes)
            }
        })
    })?;
    Ok(report)
}

fn check_finite(t: &Tensor, name: &str) -> Result<()> {
    check_finite_bytes(&t.to_bytes()?, t.dtype(), name)
}

/// PEFT's `safe_merge` check, on the little-endian bytes about to be written (no extra copy).
fn check_finite_bytes(bytes: &[u8], dtype: DType, name: &str) -> Result<()> {
    let first_bad = |it: &mut dyn Iterator<Item = f32>| it.enumerate().find(|(_, v)| !v.is_finite());
    let bad = match dtype {
        DType::F32 => first_bad(
            &mut bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        DType::F16 => first_bad(
            &mut bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::BF16 => first_bad(
            &mut bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => None,
    };
    match bad {
        Some((index, value)) => Err(Error::NonFinite {
            tensor: format!("{name} (merged; the adapter seems broken, or the output dtype overflows)"),
            index,
            value,
        }),
        None => Ok(()),
    }
}

fn merge_module(
    file: &SafetensorsFile,
    adapter: &PeftAdapter,
    m: &AdapterModule,
    bw: &BaseWeight,
    registry: &MergeRegistry,
    device: Device,
) -> Result<Tensor> {
    let w = match bw {
        BaseWeight::Dense { name, .. } => file.load(name, device)?.to_dtype(DType::F32)?,
        BaseWeight::FourBit { name, .. } => fourbit::dequantize(file, name, device)?,
    };
    let merged = registry.get(m.method)?.merge(adapter, m, &w)?;
    if merged.shape() != w.shape() || merged.dtype() != DType::F32 {
        return Err(Error::shape(
            "merge",
            format!(
                "module {:?}: the {} merge returned {:?} {}, expected f32 {:?}",
                m.name,
                m.method,
                merged.shape(),
                merged.dtype(),
                w.shape()
            ),
        ));
    }
    Ok(merged)
}

fn find_base_weight(file: &SafetensorsFile, module: &str) -> Result<BaseWeight> {
    let name = crate::io::peft::base_weight_name(module);
    let ctx = || file.path().display().to_string();
    for qt in ["nf4", "fp4"] {
        let qs = format!("{name}.quant_state.bitsandbytes__{qt}");
        if file.contains(&qs) {
            let (shape, dtype) = fourbit::shape_and_dtype(file, &qs)?;
            let prefix = format!("{name}.");
            let aux = file
                .names()
                .iter()
                .filter(|n| n.starts_with(&prefix))
                .cloned()
                .collect();
            return Ok(BaseWeight::FourBit {
                name,
                dtype,
                shape,
                aux,
            });
        }
    }
    if !file.contains(&name) {
        let hint = file
            .names()
            .iter()
            .find(|n| n.ends_with(&format!(".{name}")) || name.ends_with(&format!(".{n}")))
            .map(|n| format!(" (the base has {n:?}: different module prefix?)"))
            .unwrap_or_default();
        return Err(Error::format(
            ctx(),
            format!("the adapter has module {module:?} but the base has no tensor {name:?}{hint}"),
        ));
    }
    let (st, shape, _) = file.raw(&name)?;
    let dtype = from_st_dtype(st).filter(|d| d.is_float()).ok_or_else(|| {
        Error::format(
            ctx(),
            format!("base weight {name:?} has dtype {st:?}, expected a float dtype"),
        )
    })?;
    if shape.len() != 2 {
        return Err(Error::format(
            ctx(),
            format!("base weight {name:?} is {shape:?}; only 2-D (linear / embedding) weights can be merged"),
        ));
    }
    Ok(BaseWeight::Dense { name, dtype, shape })
}

// =============================================================================================== 4-bit

/// The bitsandbytes 4-bit side of the driver, on top of [`crate::quant`].
mod fourbit {
    use super::*;
    use crate::quant::io::{load_quantized, to_safetensors_entries};
    use crate::quant::{QuantizeOptions, QuantizedTensor};

    /// Every 4-bit layout the quant module reads can be merged.
    pub(super) fn available() -> Result<()> {
        Ok(())
    }

    /// The dequantized weight `name` (f32, original shape) from its bnb state-dict tensors, decoded on
    /// `device` exactly as bitsandbytes' `dequantize_4bit` (`code[nibble] * absmax` in f32).
    pub(super) fn dequantize(file: &SafetensorsFile, name: &str, device: Device) -> Result<Tensor> {
        load_quantized(file, name, device)?.dequantize(DType::F32)
    }

    /// `merged` quantized with the quant-state settings of `name` (quant type, blocksize, double quant),
    /// from `merged` rounded to `dtype` first (the dtype the new quant state records, as bitsandbytes
    /// quantizes a weight of that dtype): every state-dict tensor of the new weight (`name`,
    /// `name.absmax`, ...), replacing the old ones. The packed data is written as u8 `[(n+1)/2, 1]`
    /// whatever `quant_storage` the base used (bitsandbytes reads both).
    pub(super) fn requantize(
        file: &SafetensorsFile,
        name: &str,
        merged: &Tensor,
        dtype: DType,
    ) -> Result<Vec<(String, TensorBytes<'static>)>> {
        let old = load_quantized(file, name, Device::Cpu)?;
        let st = old.state();
        let opts = QuantizeOptions {
            quant_type: st.quant_type,
            blocksize: st.blocksize,
            double_quant: st.is_double(),
            allow_non_finite: false,
            name: name.to_string(),
        };
        let q = QuantizedTensor::quantize(&merged.to_dtype(dtype)?, &opts)?;
        to_safetensors_entries(&q, name)
    }

    /// Original shape and dtype from the quant-state JSON (`{"shape": [..], "dtype": "bfloat16", ..}`).
    pub(super) fn shape_and_dtype(file: &SafetensorsFile, qs_key: &str) -> Result<(Vec<usize>, DType)> {
        let (_, _, bytes) = file.raw(qs_key)?;
        let bad = |msg: String| file.err(format!("{qs_key}: {msg}"));
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("quant state is not JSON: {e}")))?;
        let shape = v["shape"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("quant state has no integer `shape` list".into()))?;
        if shape.len() != 2 {
            return Err(bad(format!("4-bit weight has shape {shape:?}, expected 2-D")));
        }
        let dtype = v["dtype"]
            .as_str()
            .ok_or_else(|| bad("quant state has no `dtype`".into()))
            .and_then(|s| DType::from_torch_name(s).map_err(|e| bad(e.to_string())))?;
        Ok((shape, dtype))
    }
}
