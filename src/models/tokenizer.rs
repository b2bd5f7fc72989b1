//! The WordPiece tokenizer of a BERT checkpoint (`tokenizer.json`, through the `tokenizers` crate) with
//! our own truncation and per-batch padding, and the [`BertBatch`] the model consumes.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

/// A padded batch of token sequences, flattened sequence-major (`[batch * seq]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BertBatch {
    pub input_ids: Vec<u32>,
    /// Segment ids (all 0 for single sentences).
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    pub batch: usize,
    pub seq: usize,
}

impl BertBatch {
    /// A batch from padded rows: `ids[b][t]`, `mask[b][t]` (0/1), optional `token_types[b][t]` (zeros
    /// when `None`). Every row must have the same length.
    pub fn from_rows(
        ids: &[Vec<u32>],
        mask: &[Vec<u8>],
        token_types: Option<&[Vec<u32>]>,
    ) -> Result<BertBatch> {
        let batch = ids.len();
        let seq = ids.first().map_or(0, Vec::len);
        let rows_ok = |n: usize| n == seq;
        if mask.len() != batch
            || !ids.iter().all(|r| rows_ok(r.len()))
            || !mask.iter().all(|r| rows_ok(r.len()))
        {
            return Err(Error::invalid(
                "BertBatch::from_rows: ragged rows or mask/ids count mismatch",
            ));
        }
        let token_type_ids = match token_types {
            Some(tt) => {
                if tt.len() != batch || !tt.iter().all(|r| rows_ok(r.len())) {
                    return Err(Error::invalid(
                        "BertBatch::from_rows: token types do not match the ids",
                    ));
                }
                tt.concat()
            }
            None => vec![0; batch * seq],
        };
        let b = BertBatch {
            input_ids: ids.concat(),
            token_type_ids,
            attention_mask: mask.concat(),
            batch,
            seq,
        };
        b.validate()?;
        Ok(b)
    }

    /// Checks lengths and the mask values (ids are checked against the vocabulary by the model).
    pub fn validate(&self) -> Result<()> {
        let n = self
            .batch
            .checked_mul(self.seq)
            .ok_or_else(|| Error::invalid("batch * seq overflows"))?;
        if n == 0 {
            return Err(Error::invalid("empty batch"));
        }
        if self.input_ids.len() != n || self.token_type_ids.len() != n || self.attention_mask.len() != n {
            return Err(Error::invalid(format!(
                "batch {}x{}: input_ids {}, token_type_ids {}, attention_mask {} (each must be {n})",
                self.batch,
                self.seq,
                self.input_ids.len(),
                self.token_type_ids.len(),
                self.attention_mask.len()
            )));
        }
        if self.attention_mask.iter().any(|&m| m > 1) {
            return Err(Error::invalid("attention_mask values must be 0 or 1"));
        }
        Ok(())
    }

    /// Real (unpadded) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().map(|&m| m as usize).sum()
    }
}

/// A BERT tokenizer: `tokenizer.json`'s normalizer, pre-tokenizer, WordPiece model and `[CLS] .. [SEP]`
/// post-processor; the file's own padding and truncation are turned off (MiniLM's pads to 128) and
/// replaced by truncation to `max_len` and padding to the longest sequence of each batch.
pub struct BertTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    /// The last truncating copy made (by `max_len`): cloning a tokenizer copies its whole vocabulary,
    /// far more than encoding a sentence costs.
    truncating: std::sync::Mutex<Option<(usize, std::sync::Arc<Tokenizer>)>>,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path.display().to_string(), e.to_string())
}

impl BertTokenizer {
    /// Loads `path` (a `tokenizer.json`). The pad id is the vocabulary's `[PAD]` (0 in BERT vocabularies).
    pub fn from_file(path: impl AsRef<Path>) -> Result<BertTokenizer> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let mut tok = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| tok_err(path, e))?;
        let pad_id = tok
            .token_to_id("[PAD]")
            .ok_or_else(|| tok_err(path, "the vocabulary has no [PAD] token"))?;
        Ok(BertTokenizer {
            tok,
            pad_id,
            truncating: std::sync::Mutex::new(None),
        })
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids of one text with `[CLS]`/`[SEP]`, truncated to `max_len` tokens (specials included).
    pub fn encode(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        encode_with(self.truncating(max_len)?.as_ref(), text)
    }

    /// A copy of the tokenizer that truncates to `max_len`, cached for the next call with the same
    /// `max_len`.
    fn truncating(&self, max_len: usize) -> Result<std::sync::Arc<Tokenizer>> {
        // A poisoned lock only means another thread panicked while swapping the cache: take it.
        let mut cache = self.truncating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, t)) = cache.as_ref()
            && *n == max_len
        {
            return Ok(std::sync::Arc::clone(t));
        }
        if max_len < 2 {
            return Err(Error::invalid(format!(
                "max_len {max_len} leaves no room for [CLS] and [SEP]"
            )));
        }
        let mut tok = self.tok.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::invalid(format!("truncation: {e}")))?;
        let tok = std::sync::Arc::new(tok);
        *cache = Some((max_len, std::sync::Arc::clone(&tok)));
        Ok(tok)
    }

    /// A batch: every text encoded and truncated to `max_len`, padded with `[PAD]` to the longest.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], max_len: usize) -> Result<BertBatch> {
        if texts.is_empty() {
            return Err(Error::invalid("encode_batch: no texts"));
        }
        let tok = self.truncating(max_len)?;
        let encoded: Vec<(Vec<u32>, Vec<u32>)> = texts
            .iter()
            .map(|t| encode_with(&tok, t.as_ref()))
            .collect::<Result<_>>()?;
        let seq = encoded.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut b = BertBatch {
            input_ids: Vec::with_capacity(texts.len() * seq),
            token_type_ids: Vec::with_capacity(texts.len() * seq),
            attention_mask: Vec::with_capacity(texts.len() * seq),
            batch: texts.len(),
            seq,
        };
        for (ids, types) in &encoded {
            let pad = seq - ids.len();
            b.input_ids
                .extend(ids.iter().copied().chain(std::iter::repeat_n(self.pad_id, pad)));
            b.token_type_ids
                .extend(types.iter().copied().chain(std::iter::repeat_n(0, pad)));
            b.attention_mask
                .extend(std::iter::repeat_n(1u8, ids.len()).chain(std::iter::repeat_n(0, pad)));
        }
        b.validate()?;
        Ok(b)
    }
}

/// Ids and type ids of `text` with the special tokens, under `tok`'s truncation.
fn encode_with(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
    Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
}
