//! CUDA launches for kernels/nf4.cu (placeholder while the kernels are written).
