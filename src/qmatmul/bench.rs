//! Shared benchmark setup (filled in below).
