//! Minimal autograd tape for adapter parameters (in progress).
