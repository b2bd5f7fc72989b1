//! waveft adapter (in progress).
