//! dora adapter (in progress).
