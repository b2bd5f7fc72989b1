//! Optimizers: AdamW (in progress).
