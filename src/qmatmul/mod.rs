//! Fused 4-bit dequant-matmul with the low-rank update (in progress).
