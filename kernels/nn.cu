// Transformer tape ops (src/nn/): row gathers and their deterministic scatter-add transpose, the
// broadcast row add, LayerNorm forward and backward, masked mean pooling forward and backward, and for
// the Llama family RMSNorm forward and backward and rotary embeddings (forward; backward = inverse). The CPU
// twins live in src/nn/cpu.rs with the same f32 formulas and one rounding per output element.
//
// Napkin math (H200, ~4.3 TB/s copy bandwidth, 132 SMs). Everything here is memory bound:
//   gather/scatter : read + write one row per output row (2*h*sizeof(T) B): an embedding lookup of 16x512
//                    tokens x 1024 bf16 moves 32 MB ~ 8 us.
//   add_row        : read x, write y (+ the L1/L2-resident f32 row).
//   LayerNorm fwd  : one block per row; the row is read three times (mean, centred variance, write) but
//                    passes 2 and 3 hit L1/L2 for rows up to tens of KB, so DRAM traffic is read x +
//                    write y + 8 B of stats per row: 8192 x 1024 bf16 = 32 MB ~ 8 us.
//   LayerNorm bwd  : read x, dy (one reduction pass, one write pass), write dx: 48 MB ~ 11 us.
//   mean pool      : fwd reads every unmasked row once (a block per (sequence, 256 columns)), bwd writes
//                    every row once.
//   RMSNorm        : as LayerNorm with one reduction (sum of squares) instead of two.
//   RoPE           : read x, write y; head_dim/2 sincos per token in double (16 heads share them through
//                    shared memory), ~100 cycles each, hidden behind the row's memory traffic.
// At MiniLM sizes (1024 rows x 384) each launch is ~1-2 us of traffic, i.e. launch-latency bound; a
// block per row (1024 blocks of 128 threads) fills the GPU. Reductions are block-wide in a fixed order
// (no atomics): results are deterministic.
#include "common.cuh"

// ------------------------------------------------------------------------------------------ gathers

// out[j, :] = src[idx[j], :]; one block per output row (grid.x = rows), threads stride the columns.
template <typename T>
__device__ __forceinline__ void gather_rows_impl(const T* __restrict__ src, const uint32_t* __restrict__ idx,
                                                 T* __restrict__ out, int64_t h) {
    const int64_t j = blockIdx.x;
    const T* s = src + (int64_t)idx[j] * h;
    T* o = out + j * h;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) o[c] = s[c];
}

// out[r, :] = sum over k in [offsets[r], offsets[r+1]) of dy[order[k], :], in that order, f32
// accumulation, one rounding; rows with no entry get zeros. One block per output row.
template <typename T>
__device__ __forceinline__ void scatter_add_rows_impl(const T* __restrict__ dy, const uint32_t* __restrict__ offsets,
                                                      const uint32_t* __restrict__ order, T* __restrict__ out,
                                                      int64_t h) {
    const int64_t r = blockIdx.x;
    const uint32_t k0 = offsets[r], k1 = offsets[r + 1];
    T* o = out + r * h;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        float acc = 0.f;
        for (uint32_t k = k0; k < k1; ++k) acc += to_f32(dy[(int64_t)order[k] * h + c]);
        o[c] = from_f32<T>(acc);
    }
}

// y[i, :] = x[i, :] + row; one block per row.
template <typename T>
__device__ __forceinline__ void add_row_impl(const T* __restrict__ x, const float* __restrict__ row,
                                             T* __restrict__ y, int64_t h) {
    const int64_t off = (int64_t)blockIdx.x * h;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) y[off + c] = from_f32<T>(to_f32(x[off + c]) + row[c]);
}

// ------------------------------------------------------------------------------------------ LayerNorm

// One block per row. mean = x0 + sum(x - x0)/h (the shift keeps rows with a large common offset
// accurate), var = sum((x - mean)^2)/h (two-pass, no E[x^2] - mean^2 cancellation), rstd =
// 1/sqrtf(var + eps) (IEEE sqrt and division, like the CPU twin), y = (x - mean)*rstd*w + b.
// stats[2*row] = mean, stats[2*row+1] = rstd.
template <typename T>
__device__ __forceinline__ void layer_norm_fwd_impl(const T* __restrict__ x, const float* __restrict__ w,
                                                    const float* __restrict__ b, T* __restrict__ y,
                                                    float* __restrict__ stats, int64_t h, float eps) {
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * h;
    const T* xr = x + off;
    const float shift = to_f32(xr[0]);
    const float inv_h = 1.f / (float)h;
    float s = 0.f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) s += to_f32(xr[c]) - shift;
    const float mean = shift + block_sum(s, scratch) * inv_h;
    float v = 0.f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float d = to_f32(xr[c]) - mean;
        v += d * d;
    }
    const float var = block_sum(v, scratch) * inv_h;
    const float rstd = 1.f / sqrtf(var + eps);
    T* yr = y + off;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) yr[c] = from_f32<T>((to_f32(xr[c]) - mean) * rstd * w[c] + b[c]);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
}

// dx = rstd*(g - mean(g) - xhat*mean(g*xhat)) with g = dy*w, xhat = (x - mean)*rstd; one block per row.
template <typename T>
__device__ __forceinline__ void layer_norm_bwd_impl(const T* __restrict__ x, const T* __restrict__ dy,
                                                    const float* __restrict__ w, const float* __restrict__ stats,
                                                    T* __restrict__ dx, int64_t h) {
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * h;
    const float mean = stats[2 * blockIdx.x], rstd = stats[2 * blockIdx.x + 1];
    const float inv_h = 1.f / (float)h;
    float sg = 0.f, sgx = 0.f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float g = to_f32(dy[off + c]) * w[c];
        sg += g;
        sgx += g * ((to_f32(x[off + c]) - mean) * rstd);
    }
    const float a = block_sum(sg, scratch) * inv_h;
    const float cc = block_sum(sgx, scratch) * inv_h;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float xhat = (to_f32(x[off + c]) - mean) * rstd;
        dx[off + c] = from_f32<T>(rstd * (to_f32(dy[off + c]) * w[c] - a - xhat * cc));
    }
}

// ------------------------------------------------------------------------------------------ mean pooling

// y[b, c] = (sum over unmasked t of x[b*seq + t, c]) / counts[b], 0 when counts[b] == 0.
// grid = (batch, ceil(h / blockDim.x)); one thread per output element, t in increasing order.
template <typename T>
__device__ __forceinline__ void mean_pool_fwd_impl(const T* __restrict__ x, const uint8_t* __restrict__ mask,
                                                   const float* __restrict__ counts, T* __restrict__ y,
                                                   int64_t seq, int64_t h) {
    const int64_t b = blockIdx.x;
    const int64_t c = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= h) return;
    float acc = 0.f;
    for (int64_t t = 0; t < seq; ++t) {
        const int64_t r = b * seq + t;
        if (mask[r]) acc += to_f32(x[r * h + c]);
    }
    const float n = counts[b];
    y[b * h + c] = from_f32<T>(n > 0.f ? acc / n : 0.f);
}

// dx[r, c] = mask[r] ? dy[r / seq, c] / counts[r / seq] : 0; one block per token row.
template <typename T>
__device__ __forceinline__ void mean_pool_bwd_impl(const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                                                   const float* __restrict__ counts, T* __restrict__ dx,
                                                   int64_t seq, int64_t h) {
    const int64_t r = blockIdx.x, b = r / seq;
    const bool keep = mask[r] != 0;
    const float n = counts[b];
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x)
        dx[r * h + c] = from_f32<T>(keep ? to_f32(dy[b * h + c]) / n : 0.f);
}

// ------------------------------------------------------------------------------------------ Llama: RMSNorm, RoPE

template <typename T>
__device__ __forceinline__ float round_to(float v) {
    return to_f32(from_f32<T>(v));
}

// transformers' LlamaRMSNorm: r = 1/sqrtf(mean(x^2) + eps) in f32, y = round_T(w * round_T(x * r)).
// One block per row; rstd[row] = r. Products are kept apart (__fmul_rn) so that nvcc does not fuse them
// into an FMA, which would skip the rounding torch does.
template <typename T>
__device__ __forceinline__ void rms_norm_fwd_impl(const T* __restrict__ x, const float* __restrict__ w,
                                                  T* __restrict__ y, float* __restrict__ rstd, int64_t h,
                                                  float eps) {
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * h;
    float s = 0.f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float v = to_f32(x[off + c]);
        s += v * v;
    }
    const float r = 1.f / sqrtf(block_sum(s, scratch) * (1.f / (float)h) + eps);
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x)
        y[off + c] = from_f32<T>(__fmul_rn(w[c], round_to<T>(__fmul_rn(to_f32(x[off + c]), r))));
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// dx = r*(g - xhat*mean(g*xhat)), g = dy*w, xhat = x*r; one block per row.
template <typename T>
__device__ __forceinline__ void rms_norm_bwd_impl(const T* __restrict__ x, const T* __restrict__ dy,
                                                  const float* __restrict__ w, const float* __restrict__ rstd,
                                                  T* __restrict__ dx, int64_t h) {
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * h;
    const float r = rstd[blockIdx.x];
    float s = 0.f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x)
        s += to_f32(dy[off + c]) * w[c] * (to_f32(x[off + c]) * r);
    const float m = block_sum(s, scratch) * (1.f / (float)h);
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
        const float xhat = to_f32(x[off + c]) * r;
        dx[off + c] = from_f32<T>(r * (to_f32(dy[off + c]) * w[c] - xhat * m));
    }
}

#define ROPE_MAX_HALF 512

// Rotary embedding (transformers' Llama apply_rotary_pos_emb with rotate_half) of one token per block:
// x is [tokens, width] with width = heads * 2 * half. cos/sin of pos * inv_freq[i] are computed once per
// token in double from the f32 angle (as the CPU twin), rounded to T like torch's cos.to(dtype), and
// staged in shared memory for every head. out[i] = x[i]*c - x[i+half]*s, out[i+half] = x[i+half]*c +
// x[i]*s with each product and the sum rounded to T (torch computes them in T). `negate` flips the sine:
// the inverse rotation, i.e. the backward.
template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const uint32_t* __restrict__ positions,
                                          const float* __restrict__ inv_freq, T* __restrict__ y, int64_t width,
                                          int64_t half, int negate) {
    __shared__ float cs[2][ROPE_MAX_HALF];
    const int64_t t = blockIdx.x;
    const float pos = (float)positions[t];
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        const double f = (double)(pos * inv_freq[i]);
        const float s = round_to<T>((float)sin(f));
        cs[0][i] = round_to<T>((float)cos(f));
        cs[1][i] = negate ? -s : s;
    }
    __syncthreads();
    const int64_t pairs = width / 2;
    const T* xr = x + t * width;
    T* yr = y + t * width;
    for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int64_t head = p / half, i = p - head * half;
        const int64_t j1 = head * 2 * half + i, j2 = j1 + half;
        const float a = to_f32(xr[j1]), b = to_f32(xr[j2]);
        const float c = cs[0][i], s = cs[1][i];
        yr[j1] = from_f32<T>(__fadd_rn(round_to<T>(__fmul_rn(a, c)), round_to<T>(__fmul_rn(-b, s))));
        yr[j2] = from_f32<T>(__fadd_rn(round_to<T>(__fmul_rn(b, c)), round_to<T>(__fmul_rn(a, s))));
    }
}

#define NN_KERNELS(TN, T)                                                                                      \
    extern "C" __global__ void gather_rows_##TN(const T* src, const uint32_t* idx, T* out, int64_t h) {       \
        gather_rows_impl<T>(src, idx, out, h);                                                                 \
    }                                                                                                          \
    extern "C" __global__ void scatter_add_rows_##TN(const T* dy, const uint32_t* offsets, const uint32_t* order, \
                                                     T* out, int64_t h) {                                      \
        scatter_add_rows_impl<T>(dy, offsets, order, out, h);                                                  \
    }                                                                                                          \
    extern "C" __global__ void add_row_##TN(const T* x, const float* row, T* y, int64_t h) {                   \
        add_row_impl<T>(x, row, y, h);                                                                         \
    }                                                                                                          \
    extern "C" __global__ void layer_norm_fwd_##TN(const T* x, const float* w, const float* b, T* y,           \
                                                   float* stats, int64_t h, float eps) {                      \
        layer_norm_fwd_impl<T>(x, w, b, y, stats, h, eps);                                                     \
    }                                                                                                          \
    extern "C" __global__ void layer_norm_bwd_##TN(const T* x, const T* dy, const float* w, const float* stats, \
                                                   T* dx, int64_t h) {                                         \
        layer_norm_bwd_impl<T>(x, dy, w, stats, dx, h);                                                        \
    }                                                                                                          \
    extern "C" __global__ void mean_pool_fwd_##TN(const T* x, const uint8_t* mask, const float* counts, T* y,  \
                                                  int64_t seq, int64_t h) {                                    \
        mean_pool_fwd_impl<T>(x, mask, counts, y, seq, h);                                                     \
    }                                                                                                          \
    extern "C" __global__ void mean_pool_bwd_##TN(const T* dy, const uint8_t* mask, const float* counts, T* dx, \
                                                  int64_t seq, int64_t h) {                                    \
        mean_pool_bwd_impl<T>(dy, mask, counts, dx, seq, h);                                                   \
    }                                                                                                          \
    extern "C" __global__ void rms_norm_fwd_##TN(const T* x, const float* w, T* y, float* rstd, int64_t h,     \
                                                 float eps) {                                                  \
        rms_norm_fwd_impl<T>(x, w, y, rstd, h, eps);                                                           \
    }                                                                                                          \
    extern "C" __global__ void rms_norm_bwd_##TN(const T* x, const T* dy, const float* w, const float* rstd,   \
                                                 T* dx, int64_t h) {                                           \
        rms_norm_bwd_impl<T>(x, dy, w, rstd, dx, h);                                                           \
    }                                                                                                          \
    extern "C" __global__ void rope_##TN(const T* x, const uint32_t* positions, const float* inv_freq, T* y,   \
                                         int64_t width, int64_t half, int negate) {                            \
        rope_impl<T>(x, positions, inv_freq, y, width, half, negate);                                          \
    }
NN_KERNELS(f32, float)
NN_KERNELS(f16, f16)
NN_KERNELS(bf16, bf16)
