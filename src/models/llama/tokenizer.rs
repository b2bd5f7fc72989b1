//! The tokenizer of a causal LM checkpoint (`tokenizer.json` through the `tokenizers` crate: BPE,
//! SentencePiece-style or word-level, with the file's own post-processor, e.g. Llama's `<s>`), with our
//! truncation and right padding per batch.

use super::TokenBatch;
use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// A causal LM tokenizer: texts to right-padded [`TokenBatch`]es.
pub struct CausalLmTokenizer {
    tok: Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for CausalLmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLmTokenizer")
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl CausalLmTokenizer {
    /// Loads `path` (a `tokenizer.json`). The pad id is `pad_id` if given (the config's `pad_token_id`),
    /// else the vocabulary's `<pad>`, `<|endoftext|>`, `</s>` or `<unk>`, else 0: padded positions are
    /// masked, so the id only has to be a valid one.
    pub fn from_file(path: impl AsRef<Path>, pad_id: Option<u32>) -> Result<CausalLmTokenizer> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let err = |e: &dyn std::fmt::Display| Error::format(path.display().to_string(), e.to_string());
        let mut tok = Tokenizer::from_file(path).map_err(|e| err(&e))?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| err(&e))?;
        let pad_id = pad_id
            .or_else(|| {
                ["<pad>", "<|endoftext|>", "</s>", "<unk>"]
                    .iter()
                    .find_map(|t| tok.token_to_id(t))
            })
            .unwrap_or(0);
        Ok(CausalLmTokenizer { tok, pad_id })
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids of one text with the file's special tokens (Llama's `<s>`), the first `max_len` kept.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len == 0 {
            return Err(Error::invalid("max_len must be positive"));
        }
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
        let ids = enc.get_ids();
        Ok(ids[..ids.len().min(max_len)].to_vec())
    }

    /// A batch: every text encoded and truncated to `max_len`, right-padded to the longest.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], max_len: usize) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::invalid("encode_batch: no texts"));
        }
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t.as_ref(), max_len))
            .collect::<Result<_>>()?;
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut b = TokenBatch {
            input_ids: Vec::with_capacity(rows.len() * seq),
            token_type_ids: vec![0; rows.len() * seq],
            attention_mask: Vec::with_capacity(rows.len() * seq),
            batch: rows.len(),
            seq,
        };
        for ids in &rows {
            let pad = seq - ids.len();
            b.input_ids
                .extend(ids.iter().copied().chain(std::iter::repeat_n(self.pad_id, pad)));
            b.attention_mask
                .extend(std::iter::repeat_n(1u8, ids.len()).chain(std::iter::repeat_n(0, pad)));
        }
        b.validate()?;
        Ok(b)
    }
}
