// Elementwise, cast, reduction and transpose kernels for the safe tensor API (src/tensor/).
// All are memory bound: bytes moved = n * (sizeof(in) + sizeof(out)); arithmetic is in f32, rounded
// like src/tensor/cpu.rs (bit-identical for add/sub/mul/affine/axpy/cast): affine and axpy round the
// product and the sum separately (__fmul_rn/__fadd_rn), because nvcc would otherwise contract them into
// one fma.rn.f32 while Rust never contracts.
#include "common.cuh"

template <typename S, typename D>
__device__ void cast_impl(const S* __restrict__ x, D* __restrict__ y, int64_t n) {
    GRID_STRIDE(i, n) y[i] = from_f32<D>(to_f32(x[i]));
}

#define CAST(SN, S, DN, D) \
    extern "C" __global__ void cast_##SN##_##DN(const S* x, D* y, int64_t n) { cast_impl<S, D>(x, y, n); }
CAST(f32, float, f16, f16)
CAST(f32, float, bf16, bf16)
CAST(f16, f16, f32, float)
CAST(f16, f16, bf16, bf16)
CAST(bf16, bf16, f32, float)
CAST(bf16, bf16, f16, f16)

#define BINARY(NAME, EXPR, TN, T)                                                                     \
    extern "C" __global__ void binary_##NAME##_##TN(const T* __restrict__ a, const T* __restrict__ b, \
                                                     T* __restrict__ o, int64_t n) {                  \
        GRID_STRIDE(i, n) {                                                                           \
            float x = to_f32(a[i]), y = to_f32(b[i]);                                                 \
            o[i] = from_f32<T>(EXPR);                                                                 \
        }                                                                                             \
    }
#define BINARY_ALL(TN, T) BINARY(add, x + y, TN, T) BINARY(sub, x - y, TN, T) BINARY(mul, x * y, TN, T)
BINARY_ALL(f32, float)
BINARY_ALL(f16, f16)
BINARY_ALL(bf16, bf16)

#define AFFINE(TN, T)                                                                                  \
    extern "C" __global__ void affine_##TN(const T* __restrict__ x, T* __restrict__ o, float alpha,    \
                                           float beta, int64_t n) {                                    \
        GRID_STRIDE(i, n) o[i] = from_f32<T>(__fadd_rn(__fmul_rn(to_f32(x[i]), alpha), beta));         \
    }                                                                                                  \
    extern "C" __global__ void axpy_##TN(T* __restrict__ y, const T* __restrict__ x, float alpha,      \
                                         int64_t n) {                                                  \
        GRID_STRIDE(i, n) y[i] = from_f32<T>(__fadd_rn(to_f32(y[i]), __fmul_rn(alpha, to_f32(x[i])))); \
    }
AFFINE(f32, float)
AFFINE(f16, f16)
AFFINE(bf16, bf16)

// Reproducible inverted dropout: the mask is dropout_hash (common.cuh) of (seed, index).
#define DROPOUT(TN, T)                                                                                 \
    extern "C" __global__ void dropout_##TN(const T* __restrict__ x, T* __restrict__ o,                \
                                            uint64_t threshold, float scale, uint64_t seed, int64_t n) { \
        GRID_STRIDE(i, n) {                                                                            \
            bool keep = (uint64_t)dropout_hash(seed, (uint64_t)i) >= threshold;                        \
            o[i] = from_f32<T>(keep ? to_f32(x[i]) * scale : 0.f);                                     \
        }                                                                                              \
    }
DROPOUT(f32, float)
DROPOUT(f16, f16)
DROPOUT(bf16, bf16)

// One warp per row. mode 0: sum, 1: sum of squares, 2: sqrt(sum of squares).
// Accumulates in f32 per lane, then a pairwise warp tree; error ~ cols/32 * eps.
template <typename T>
__device__ void row_reduce_impl(const T* __restrict__ x, float* __restrict__ out, int64_t rows,
                                int64_t cols, int mode) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* r = x + row * cols;
    float acc = 0.f;
    for (int64_t j = lane; j < cols; j += 32) {
        float v = to_f32(r[j]);
        acc += mode == 0 ? v : v * v;
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = mode == 2 ? sqrtf(acc) : acc;
}
#define ROW_REDUCE(TN, T)                                                                             \
    extern "C" __global__ void row_reduce_##TN(const T* x, float* out, int64_t rows, int64_t cols,   \
                                               int mode) {                                            \
        row_reduce_impl<T>(x, out, rows, cols, mode);                                                 \
    }
ROW_REDUCE(f32, float)
ROW_REDUCE(f16, f16)
ROW_REDUCE(bf16, bf16)

// 32x32 tile transpose through shared memory (+1 column of padding against bank conflicts).
// Block 32x8; grid (ceil(n/32), ceil(m/32)). src is [m, n] row-major, dst is [n, m].
template <typename E>
__device__ void transpose_impl(const E* __restrict__ src, E* __restrict__ dst, int64_t m, int64_t n) {
    __shared__ E tile[32][33];
    const int64_t c0 = (int64_t)blockIdx.x * 32, r0 = (int64_t)blockIdx.y * 32;
    for (int dy = threadIdx.y; dy < 32; dy += 8) {
        int64_t r = r0 + dy, c = c0 + threadIdx.x;
        if (r < m && c < n) tile[dy][threadIdx.x] = src[r * n + c];
    }
    __syncthreads();
    for (int dy = threadIdx.y; dy < 32; dy += 8) {
        int64_t r = c0 + dy, c = r0 + threadIdx.x;  // dst row = src column
        if (r < n && c < m) dst[r * m + c] = tile[threadIdx.x][dy];
    }
}
extern "C" __global__ void transpose_b1(const uint8_t* s, uint8_t* d, int64_t m, int64_t n) { transpose_impl(s, d, m, n); }
extern "C" __global__ void transpose_b2(const uint16_t* s, uint16_t* d, int64_t m, int64_t n) { transpose_impl(s, d, m, n); }
extern "C" __global__ void transpose_b4(const uint32_t* s, uint32_t* d, int64_t m, int64_t n) { transpose_impl(s, d, m, n); }
extern "C" __global__ void transpose_b8(const uint64_t* s, uint64_t* d, int64_t m, int64_t n) { transpose_impl(s, d, m, n); }
