//! Reading a Hugging Face checkpoint directory: `model.safetensors` or a sharded
//! `model.safetensors.index.json` (every shard memory-mapped), tensor names with or without the
//! architecture prefix (`bert.`), f32/bf16/f16 storage, buffers skipped, bitsandbytes 4-bit weights
//! (transformers' `load_in_4bit` layout, see [`crate::quant::io`]) and quantization on load.
//!
//! Every tensor is checked against the shape the config implies; a missing or misshapen tensor is a
//! named [`Error::Format`], never a panic.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::io::peft::TargetModules;
use crate::kbit::{KBitTensor, Tier};
use crate::models::LinearSlot;
use crate::qmatmul::BaseWeight;
use crate::quant::io::{QUANT_STATE_SUFFIX, load_quantized};
use crate::quant::{QuantizeOptions, QuantizedTensor};
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which linears to quantize while loading, and how (bitsandbytes layout, see [`QuantizedTensor`]).
#[derive(Clone, Debug)]
pub struct QuantizeOnLoad {
    /// PEFT-style selection over the module names transformers uses (`bert.encoder.layer.0.attention.self.query`):
    /// a list matches a full name or a `.`-suffix (`["query", "dense"]`), a regex must match the full name,
    /// `AllLinear` takes every linear of the backbone. Classification heads are never quantized (as
    /// transformers' `llm_int8_skip_modules`).
    pub targets: TargetModules,
    /// NF4 / FP4, blocksize, double quantization.
    pub options: QuantizeOptions,
    /// Per-module storage tiers by full module name (QR-Adaptor's bit-widths); a module named here is
    /// stored in its tier whether or not `targets` selects it ([`Tier::Bits4`] uses `options`, the
    /// other quantized tiers its blocksize and double quantization). Empty by default.
    pub tiers: BTreeMap<String, Tier>,
}

impl QuantizeOnLoad {
    /// NF4 with double quantization, blocksize 64 (QLoRA's recipe) on every backbone linear.
    pub fn nf4_dq_all_linear() -> QuantizeOnLoad {
        QuantizeOnLoad {
            targets: TargetModules::AllLinear,
            options: QuantizeOptions::default(),
            tiers: BTreeMap::new(),
        }
    }

    /// The storage tier of module `name`: its entry in `tiers`, else [`Tier::Bits4`] when `targets`
    /// selects it, else `None` (kept as stored).
    pub fn tier_for(&self, name: &str) -> Option<Tier> {
        self.tiers
            .get(name)
            .copied()
            .or_else(|| self.selects(name).then_some(Tier::Bits4))
    }

    /// Whether module `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        match &self.targets {
            TargetModules::AllLinear => true,
            TargetModules::Regex(r) => r.is_full_match(name),
            TargetModules::Names(names) => names.iter().any(|n| {
                name == n
                    || (name.len() > n.len()
                        && name.ends_with(n.as_str())
                        && name.as_bytes()[name.len() - n.len() - 1] == b'.')
            }),
        }
    }
}

/// How [`super::from_pretrained`] places the model.
#[derive(Clone, Debug)]
pub struct ModelLoadOptions {
    /// Where every tensor goes.
    pub device: Device,
    /// The activation dtype (f32/bf16/f16): embedding tables, LayerNorm affines, dense weights and biases
    /// are cast to it. Default f32.
    pub dtype: DType,
    /// Linears to quantize on load (`None`: keep them as stored; 4-bit checkpoints stay 4-bit).
    pub quantize: Option<QuantizeOnLoad>,
    /// The base matmul implementation of every 4-bit linear.
    pub algo: crate::qmatmul::Algo,
}

impl Default for ModelLoadOptions {
    fn default() -> Self {
        ModelLoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            quantize: None,
            algo: crate::qmatmul::Algo::Auto,
        }
    }
}

impl ModelLoadOptions {
    /// `(dtype, device)`, the dtype checked to be a float one (`model` names the architecture in the
    /// error): what a model's `load` builds its activations in.
    pub(crate) fn float_activations(&self, model: &str) -> Result<(DType, Device)> {
        if !self.dtype.is_float() {
            return Err(Error::invalid(format!(
                "{model} activations must be a float dtype, got {}",
                self.dtype
            )));
        }
        Ok((self.dtype, self.device))
    }
}

/// The tensors of a checkpoint directory: one file or the shards of an index, by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
    /// The architecture prefix the names carry (`"bert."`) or `""`.
    prefix: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.index.len())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`
    /// (`{"weight_map": {tensor: file}}`). `prefix` is the architecture prefix (`"bert"`): names are looked
    /// up both with and without it.
    pub fn open(dir: impl AsRef<Path>, prefix: &str) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for n in f.names() {
                index.insert(n.clone(), 0);
            }
            files.push(f);
        } else if index_path.exists() {
            let ctx = index_path.display().to_string();
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&ctx, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&ctx, "no \"weight_map\" object"))?;
            let mut shard_of: BTreeMap<String, usize> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| Error::format(&ctx, format!("weight_map[{tensor:?}] is not a string")))?;
                // Shards live next to the index: no paths that leave the directory.
                if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
                    return Err(Error::format(
                        &ctx,
                        format!("shard name {file:?} is not a plain file name"),
                    ));
                }
                let i = match shard_of.get(file) {
                    Some(&i) => i,
                    None => {
                        files.push(SafetensorsFile::open(dir.join(file))?);
                        shard_of.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[i].contains(tensor) {
                    return Err(Error::format(
                        &ctx,
                        format!("the index puts {tensor:?} in {file:?}, which has no such tensor"),
                    ));
                }
                index.insert(tensor.clone(), i);
            }
        } else {
            return Err(Error::format(
                dir.display().to_string(),
                "no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)",
            ));
        }
        let p = format!("{prefix}.");
        let prefix = if !prefix.is_empty() && index.keys().any(|k| k.starts_with(&p)) {
            p
        } else {
            String::new()
        };
        Ok(Checkpoint {
            dir,
            files,
            index,
            prefix,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The architecture prefix the stored names carry (`"bert."`), or `""`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every stored tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The stored name of backbone tensor `name` (given without prefix), if present.
    pub fn backbone_name(&self, name: &str) -> Option<String> {
        let with = format!("{}{name}", self.prefix);
        if self.index.contains_key(&with) {
            Some(with)
        } else if self.index.contains_key(name) {
            Some(name.to_string())
        } else {
            None
        }
    }

    /// The file holding stored tensor `stored`.
    fn file(&self, stored: &str) -> Result<&SafetensorsFile> {
        self.index
            .get(stored)
            .map(|&i| &self.files[i])
            .ok_or_else(|| self.missing(stored, None))
    }

    fn missing(&self, name: &str, shape: Option<&[usize]>) -> Error {
        Error::format(
            self.dir.display().to_string(),
            match shape {
                Some(s) => format!("missing tensor {name:?} (expected shape {s:?})"),
                None => format!("missing tensor {name:?}"),
            },
        )
    }

    /// Whether the stored tensor `stored` is a bitsandbytes 4-bit weight.
    pub fn is_4bit(&self, stored: &str) -> bool {
        ["nf4", "fp4"].iter().any(|qt| {
            self.index
                .contains_key(&format!("{stored}{QUANT_STATE_SUFFIX}{qt}"))
        })
    }

    /// Loads stored tensor `stored` as a float tensor of `shape` in `dtype` on `device`.
    pub fn load_as(&self, stored: &str, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let f = self.file(stored)?;
        let (_, got, _) = f.raw(stored)?;
        if got != shape {
            return Err(Error::format(
                self.dir.display().to_string(),
                format!("tensor {stored:?} has shape {got:?}, the config needs {shape:?}"),
            ));
        }
        let t = f.load(stored, device)?;
        if !t.dtype().is_float() {
            return Err(Error::format(
                self.dir.display().to_string(),
                format!("tensor {stored:?} is {}, expected a float tensor", t.dtype()),
            ));
        }
        t.to_dtype(dtype)
    }

    /// Loads backbone tensor `name` (without prefix) of `shape`; missing is an error.
    pub fn backbone(&self, name: &str, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let stored = self
            .backbone_name(name)
            .ok_or_else(|| self.missing(&format!("{}{name}", self.prefix), Some(shape)))?;
        self.load_as(&stored, shape, dtype, device)
    }

    /// Backbone table `name` (without prefix) of `shape` left in the memory-mapped file as a
    /// [`MappedTable`] when it is stored as f32, is wanted as f32 on the CPU, and its bytes are aligned
    /// for f32 on a little-endian host; `Ok(None)` otherwise (load it with [`Checkpoint::backbone`]).
    /// Missing or misshapen is an error, as there.
    pub fn backbone_mapped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Option<MappedTable>> {
        let stored = self
            .backbone_name(name)
            .ok_or_else(|| self.missing(&format!("{}{name}", self.prefix), Some(shape)))?;
        let f = self.file(&stored)?;
        let (st, got, bytes) = f.raw(&stored)?;
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        if got != shape {
            return Err(Error::format(
                self.dir.display().to_string(),
                format!("tensor {stored:?} has shape {got:?}, the config needs {shape:?}"),
            ));
        }
        let aligned = bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok();
        if dtype != DType::F32
            || !device.is_cpu()
            || st != safetensors::Dtype::F32
            || !aligned
            || cfg!(target_endian = "big")
        {
            return Ok(None);
        }
        // A second map of the same file, owned by the table (the checkpoint's maps go when loading ends).
        let file = Arc::new(SafetensorsFile::open(f.path())?);
        Ok(Some(MappedTable {
            file,
            name: stored,
            rows,
            cols,
        }))
    }

    /// A linear layer's weight `[out, in]` and bias `[out]` by stored module name: a 4-bit weight stays
    /// 4-bit (its quant-state shape must be `[out, in]`); a dense one is cast to `opts.dtype`, or stored in
    /// the tier `quantize` gives.
    pub fn linear(
        &self,
        stored_module: &str,
        out: usize,
        inp: usize,
        quantize: Option<(Tier, &QuantizeOptions)>,
        opts: &ModelLoadOptions,
    ) -> Result<(BaseWeight, Tensor)> {
        let base = self.linear_weight(stored_module, out, inp, quantize, opts)?;
        let bias = self.load_as(&format!("{stored_module}.bias"), &[out], opts.dtype, opts.device)?;
        Ok((base, bias))
    }

    /// A linear layer's weight `[out, in]` alone (layers without bias), as [`Checkpoint::linear`] loads it.
    pub fn linear_weight(
        &self,
        stored_module: &str,
        out: usize,
        inp: usize,
        quantize: Option<(Tier, &QuantizeOptions)>,
        opts: &ModelLoadOptions,
    ) -> Result<BaseWeight> {
        let wname = format!("{stored_module}.weight");
        let ctx = || self.dir.display().to_string();
        let base = if self.is_4bit(&wname) {
            let q = load_quantized(self.file(&wname)?, &wname, opts.device)?;
            if q.shape() != [out, inp] {
                return Err(Error::format(
                    ctx(),
                    format!(
                        "4-bit tensor {wname:?} has shape {:?}, the config needs {:?}",
                        q.shape(),
                        [out, inp]
                    ),
                ));
            }
            BaseWeight::Quantized(q)
        } else {
            match quantize {
                Some((tier, qo)) => {
                    // Quantize from f32 on the load device, exactly as bitsandbytes does from the stored values.
                    let w = self.load_as(&wname, &[out, inp], DType::F32, opts.device)?;
                    let mut qo = qo.clone();
                    qo.name = wname.clone();
                    store_in_tier(&w, tier, &qo, opts)?
                }
                None => BaseWeight::Dense(self.load_as(&wname, &[out, inp], opts.dtype, opts.device)?),
            }
        };
        Ok(base)
    }
}

/// Stores the f32 weight `w` in `tier`.
fn store_in_tier(
    w: &Tensor,
    tier: Tier,
    qo: &QuantizeOptions,
    opts: &ModelLoadOptions,
) -> Result<BaseWeight> {
    match tier {
        Tier::Bits4 => Ok(BaseWeight::Quantized(QuantizedTensor::quantize(w, qo)?)),
        // 16-bit activations: the weight is already 2 bytes dense. f32 activations: bf16 storage.
        Tier::Bits16 if opts.dtype != DType::F32 => w.to_dtype(opts.dtype).map(BaseWeight::Dense),
        Tier::Bits2 | Tier::Bits3 | Tier::Bits8 | Tier::Bits16 => {
            KBitTensor::quantize(w, tier.bits(), qo).map(BaseWeight::KBit)
        }
    }
}

/// The stored name for `module` (`bert.encoder...`, given with the prefix as transformers names it) in
/// `ckpt`, which may store it without the prefix.
pub fn stored_module(ckpt: &Checkpoint, module: &str, model_prefix: &str) -> String {
    let bare = module
        .strip_prefix(model_prefix)
        .and_then(|m| m.strip_prefix('.'))
        .unwrap_or(module);
    ckpt.backbone_name(&format!("{bare}.weight"))
        .and_then(|w| w.strip_suffix(".weight").map(str::to_string))
        .unwrap_or_else(|| format!("{}{bare}", ckpt.prefix()))
}

/// The frozen linear slot of `module` from `ckpt`, named `module` under `prefix` (stored with or without
/// it): the weight `[out, in]`, quantized when `opts.quantize` selects the slot, and the bias `[out]`
/// when `bias`.
pub(crate) fn frozen_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    module: &str,
    out: usize,
    inp: usize,
    bias: bool,
    opts: &ModelLoadOptions,
) -> Result<LinearSlot> {
    let name = if prefix.is_empty() {
        module.to_string()
    } else {
        format!("{prefix}.{module}")
    };
    let q = opts
        .quantize
        .as_ref()
        .and_then(|q| q.tier_for(&name).map(|t| (t, &q.options)));
    let stored = stored_module(ckpt, &name, prefix);
    let (w, b) = if bias {
        let (w, b) = ckpt.linear(&stored, out, inp, q, opts)?;
        (w, Some(b))
    } else {
        (ckpt.linear_weight(&stored, out, inp, q, opts)?, None)
    };
    Ok(LinearSlot::frozen(name, w, b, opts.algo))
}

/// A frozen f32 table `[rows, cols]` (BERT's word embeddings: 30522 x 384, 47 MB for MiniLM) left in the
/// memory-mapped checkpoint and read row by row: only the pages of the rows one lookup reads are
/// resident, and only during it, where a loaded copy keeps all of it in anonymous memory for the life
/// of the model. The
/// file must not be truncated or rewritten in place while the model lives (replacing or deleting it is
/// fine: the map keeps the old inode).
#[derive(Clone)]
pub struct MappedTable {
    file: Arc<SafetensorsFile>,
    name: String,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for MappedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedTable")
            .field("file", &self.file.path())
            .field("name", &self.name)
            .field("shape", &[self.rows, self.cols])
            .finish()
    }
}

impl MappedTable {
    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes of the whole table in the file (f32).
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols * DType::F32.size_in_bytes()
    }

    /// Rows `ids` as an f32 CPU tensor `[ids.len(), cols]` (an embedding lookup); an id out of range is
    /// an error.
    pub fn gather(&self, ids: &[u32]) -> Result<Tensor> {
        let op = "embedding";
        if let Some((j, &i)) = ids.iter().enumerate().find(|&(_, &i)| i as usize >= self.rows) {
            return Err(Error::invalid(format!(
                "{op}: token id {i} at position {j} is out of range for {} rows",
                self.rows
            )));
        }
        let (_, _, bytes) = self.file.raw(&self.name)?;
        let table: &[f32] = bytemuck::try_cast_slice(bytes)
            .map_err(|e| self.file.err(format!("tensor {:?}: {e}", self.name)))?;
        let rows = crate::nn::cpu::gather_rows(table, ids, self.cols);
        // Drop the pages just read from the resident set again: over an epoch a batch's ids touch
        // most of the table's pages (2.7 rows of 384 f32 per 4 KiB page), which would otherwise stay
        // mapped. The next lookup maps its rows again from the page cache (a soft fault per page).
        self.file.release(&self.name);
        Tensor::from_vec(rows, &[ids.len(), self.cols], Device::Cpu)
    }
}
