//! Adapter-file keys: which part of which module a tensor is, and the tensors that are not module
//! parts (trained biases, `modules_to_save` copies, the VB-LoRA bank).

use super::*;

/// One kind of per-module adapter tensor, named by its key suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    LoraA,
    LoraB,
    LoraBBias,
    Magnitude,
    EmbeddingA,
    EmbeddingB,
    WaveFtSpectrum,
    VbLogitsA,
    VbLogitsB,
    VbTopkIndicesA,
    VbTopkWeightsA,
    VbTopkIndicesB,
    VbTopkWeightsB,
}

impl Part {
    pub const ALL: [Part; 13] = [
        Part::LoraA,
        Part::LoraB,
        Part::LoraBBias,
        Part::Magnitude,
        Part::EmbeddingA,
        Part::EmbeddingB,
        Part::WaveFtSpectrum,
        Part::VbLogitsA,
        Part::VbLogitsB,
        Part::VbTopkIndicesA,
        Part::VbTopkWeightsA,
        Part::VbTopkIndicesB,
        Part::VbTopkWeightsB,
    ];

    /// The key suffix after `base_model.model.<module>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Part::LoraA => "lora_A.weight",
            Part::LoraB => "lora_B.weight",
            Part::LoraBBias => "lora_B.bias",
            Part::Magnitude => "lora_magnitude_vector",
            Part::EmbeddingA => "lora_embedding_A",
            Part::EmbeddingB => "lora_embedding_B",
            Part::WaveFtSpectrum => "waveft_spectrum",
            Part::VbLogitsA => "vblora_logits_A",
            Part::VbLogitsB => "vblora_logits_B",
            Part::VbTopkIndicesA => "vblora_logits_A_topk_indices",
            Part::VbTopkWeightsA => "vblora_logits_A_topk_weights",
            Part::VbTopkIndicesB => "vblora_logits_B_topk_indices",
            Part::VbTopkWeightsB => "vblora_logits_B_topk_weights",
        }
    }

    /// The method this tensor belongs to.
    pub fn peft_type(self) -> PeftType {
        match self {
            Part::LoraA
            | Part::LoraB
            | Part::LoraBBias
            | Part::Magnitude
            | Part::EmbeddingA
            | Part::EmbeddingB => PeftType::Lora,
            Part::WaveFtSpectrum => PeftType::WaveFt,
            _ => PeftType::VbLora,
        }
    }

    pub(super) fn is_index(self) -> bool {
        matches!(self, Part::VbTopkIndicesA | Part::VbTopkIndicesB)
    }
}

/// A tensor of the file that is not a per-module adapter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraTensor {
    /// The key in the adapter file.
    pub key: String,
    pub kind: ExtraKind,
    /// The tensor of the base checkpoint it stands for (`base_model.model.`, `.base_layer`,
    /// `.modules_to_save` / `.original_module` removed).
    pub base_name: String,
}

/// What an [`ExtraTensor`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraKind {
    /// The shared VB-LoRA vector bank.
    VbLoraBank,
    /// A trained base bias (`bias="all"` or `"<method>_only"`): replaces the base tensor on merge.
    Bias,
    /// A trained copy of a `modules_to_save` parameter: replaces the base tensor on merge.
    ModulesToSave,
    /// The frozen original inside a `ModulesToSaveWrapper` (saved by PEFT with `bias="all"`); unused.
    OriginalModule,
}

pub(super) enum KeyRole {
    Module { module: String, part: Part },
    Extra(ExtraKind, String),
}

pub(super) fn classify(key: &str, cfg: &AdapterConfig) -> Result<KeyRole> {
    let ferr = |msg: String| Error::format(WEIGHTS_NAME, msg);
    if key == VBLORA_BANK_KEY {
        if cfg.peft_type() != PeftType::VbLora {
            return Err(ferr(format!(
                "{key:?} is a VB-LoRA tensor but the config's peft_type is {}",
                cfg.peft_type()
            )));
        }
        return Ok(KeyRole::Extra(ExtraKind::VbLoraBank, String::new()));
    }
    let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
        return Err(ferr(format!(
            "unexpected key {key:?}: PEFT adapter keys start with \"{MODEL_PREFIX}\" (or are \"{VBLORA_BANK_KEY}\")"
        )));
    };
    for part in Part::ALL {
        if let Some(module) = rest.strip_suffix(part.suffix()).and_then(|m| m.strip_suffix('.'))
            && !module.is_empty()
        {
            if part.peft_type() != cfg.peft_type() {
                return Err(ferr(format!(
                    "{key:?} is a {} tensor but the config's peft_type is {}",
                    part.peft_type(),
                    cfg.peft_type()
                )));
            }
            return Ok(KeyRole::Module {
                module: module.to_string(),
                part,
            });
        }
    }
    // modules_to_save: PEFT wraps every module whose name ends with an entry (plain string suffix).
    if let Some(mts) = &cfg.modules_to_save {
        let segs: Vec<&str> = rest.split('.').collect();
        for i in 1..segs.len() {
            let x = segs[..i].join(".");
            if mts.iter().any(|m| x.ends_with(m.as_str())) {
                let (kind, tail) = match segs[i] {
                    "modules_to_save" if i + 1 < segs.len() => (ExtraKind::ModulesToSave, &segs[i + 1..]),
                    "original_module" if i + 1 < segs.len() => (ExtraKind::OriginalModule, &segs[i + 1..]),
                    _ => (ExtraKind::ModulesToSave, &segs[i..]),
                };
                return Ok(KeyRole::Extra(kind, format!("{x}.{}", tail.join("."))));
            }
        }
    }
    if cfg.bias != "none" && (rest == "bias" || rest.ends_with(".bias")) {
        let base = rest
            .split('.')
            .filter(|s| *s != "base_layer")
            .collect::<Vec<_>>()
            .join(".");
        return Ok(KeyRole::Extra(ExtraKind::Bias, base));
    }
    let suffixes: Vec<&str> = Part::ALL
        .iter()
        .filter(|p| p.peft_type() == cfg.peft_type())
        .map(|p| p.suffix())
        .collect();
    Err(ferr(format!(
        "unexpected key {key:?}: not a {} tensor (suffixes {suffixes:?}), not a trained bias (bias={:?}) and not \
         in modules_to_save ({:?})",
        cfg.peft_type(),
        cfg.bias,
        cfg.modules_to_save
    )))
}
