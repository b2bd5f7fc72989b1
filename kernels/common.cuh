// Shared device helpers for every kernel family: float conversions, 8-wide vector loads and stores,
// warp and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

// Marks a kernel pointer parameter that may be null (an absent optional operand the kernel tests for).
// It expands to nothing; build.rs reads it and gives the Rust launcher an Option for that parameter.
#define NULLABLE

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, like the CPU path (half::f16::from_f32 / bf16::from_f32).
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// 8 consecutive values as f32, from an address aligned to 8 elements (32 bytes for f32, 16 for halves).
__device__ __forceinline__ void load8_as_f32(const float* p, float o[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
template <typename H> __device__ __forceinline__ void load8_as_f32(const H* p, float o[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    H h[8];
    memcpy(h, &u, sizeof(u));
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = to_f32(h[j]);
}

// 8 f32 values rounded to the element type (from_f32), stored to an address aligned to 8 elements.
__device__ __forceinline__ void store8_from_f32(float* p, const float o[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(o[4], o[5], o[6], o[7]);
}
template <typename H> __device__ __forceinline__ void store8_from_f32(H* p, const float o[8]) {
    H h[8];
#pragma unroll
    for (int j = 0; j < 8; j++) h[j] = from_f32<H>(o[j]);
    uint4 u;
    memcpy(&u, h, sizeof(u));
    *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// bitsandbytes' dQuantize<0> (csrc/kernels.cu; quantize_2D is the same search for its optimizer maps):
// 7-step binary search over the sorted 256-entry code, then a midpoint test against the neighbour on
// x's side. Used by the double quantization (nf4.cu) and the 8-bit optimizer states (optim.cu).
__device__ __forceinline__ uint8_t quantize_8bit(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        const float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return (uint8_t)(x > midpoint ? upper_pivot : pivot);
    } else {
        const float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
        return (uint8_t)(x < midpoint ? lower_pivot : pivot);
    }
}

// The dropout mask hash, bit-identical to src/tensor/mod.rs::dropout_hash (a pure function of (seed,
// index), so backward passes regenerate masks instead of storing them).
__device__ __forceinline__ uint32_t dropout_hash(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
