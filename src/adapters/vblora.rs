//! vblora adapter (in progress).
