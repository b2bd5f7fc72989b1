//! lora adapter (in progress).
