//! PEFT adapter files (in progress).
