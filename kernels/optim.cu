// Fused AdamW step (src/optim/): one launch per parameter tensor updates p, m and v in one pass.
// CPU twin: src/optim/cpu.rs (same operation sequence, bit-identical results for f32; see below).
//
// Napkin math per element, f32 parameter: read p, g, m, v (16 B) + write p, m, v (12 B) = 28 B;
// bf16/f16 parameter: 2 + 4 + 4 + 4 read, 2 + 4 + 4 written = 24 B. ~12 FLOPs (incl. one sqrt and
// one div) per element = 0.4 FLOP/B, hopelessly memory bound: the floor on an H200 (4.3 TB/s) is
// 28 B x 16M / 4.3e12 = 104 us for 16M f32 parameters, 6.5 us per 1M. LoRA r=16 on all linears of
// an 8B model is ~42M parameters -> ~0.27 ms per step, noise next to the forward/backward.
// Small tensors (a LoRA A of 16 x 4096 = 65k elements, 1.8 MB of traffic, ~0.4 us at full bandwidth)
// are bound by launch latency (~3-5 us) instead; a multi-tensor launch would fix that (not done).
//
// Vector loads: each thread moves 4 elements per iteration (float4 for g, m, v and p in f32; 8 B
// for 4 halves), so a warp issues 512 B per stream per load instruction. Pointers that are not
// 16 B (8 B for halves) aligned fall back to the scalar loop, which also handles the n % 4 tail.
//
// Exactness: the update uses __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn, which the compiler
// never contracts into FMAs, in exactly torch's operation order (_single_tensor_adamw):
//   p *= 1 - lr*wd;  m += (1-b1)*(g - m);  v = v*b2 + ((1-b2)*g)*g;
//   denom = sqrt(v)/sqrt(1-b2^t) + eps;  p += (-lr/(1-b1^t)) * m / denom
// so results match the CPU twin bit for bit (f32 parameters; halves round once at the end).
#include "common.cuh"

struct AdamWScalars {
    float decay;     // 1 - lr * weight_decay
    float w1;        // 1 - beta1 (lerp weight)
    float beta2;
    float w2;        // 1 - beta2
    float neg_step;  // -lr / (1 - beta1^t)
    float bc2_sqrt;  // sqrt(1 - beta2^t)
    float eps;
};

__device__ __forceinline__ void adamw_elem(float& p, float g, float& m, float& v, const AdamWScalars& s) {
    p = __fmul_rn(p, s.decay);
    m = __fadd_rn(m, __fmul_rn(s.w1, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.w2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step, m), denom));
}

// 4 consecutive elements of T <-> 4 floats, in one 16 B (f32) or 8 B (f16/bf16) access.
__device__ __forceinline__ void load4(const float* ptr, float (&x)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(ptr);
    x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
}
__device__ __forceinline__ void store4(float* ptr, const float (&x)[4]) {
    *reinterpret_cast<float4*>(ptr) = make_float4(x[0], x[1], x[2], x[3]);
}

template <typename T> __device__ __forceinline__ float bits_to_f32(unsigned short b);
template <> __device__ __forceinline__ float bits_to_f32<bf16>(unsigned short b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
template <> __device__ __forceinline__ float bits_to_f32<f16>(unsigned short b) { return __half2float(__ushort_as_half(b)); }
template <typename T> __device__ __forceinline__ unsigned short f32_to_bits(float x);
template <> __device__ __forceinline__ unsigned short f32_to_bits<bf16>(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
template <> __device__ __forceinline__ unsigned short f32_to_bits<f16>(float x) { return __half_as_ushort(__float2half_rn(x)); }

// Little-endian: element 0 is in the low 16 bits of the first word.
template <typename T>
__device__ __forceinline__ void load4(const T* ptr, float (&x)[4]) {
    const uint2 q = *reinterpret_cast<const uint2*>(ptr);
    x[0] = bits_to_f32<T>((unsigned short)(q.x & 0xffffu));
    x[1] = bits_to_f32<T>((unsigned short)(q.x >> 16));
    x[2] = bits_to_f32<T>((unsigned short)(q.y & 0xffffu));
    x[3] = bits_to_f32<T>((unsigned short)(q.y >> 16));
}
template <typename T>
__device__ __forceinline__ void store4(T* ptr, const float (&x)[4]) {
    uint2 q;
    q.x = (unsigned)f32_to_bits<T>(x[0]) | ((unsigned)f32_to_bits<T>(x[1]) << 16);
    q.y = (unsigned)f32_to_bits<T>(x[2]) | ((unsigned)f32_to_bits<T>(x[3]) << 16);
    *reinterpret_cast<uint2*>(ptr) = q;
}

template <typename T>
__device__ __forceinline__ void adamw_impl(T* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, int64_t n, const AdamWScalars s) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const bool aligned = ((uintptr_t)p % (4 * sizeof(T)) == 0) && ((uintptr_t)g % 16 == 0) &&
                         ((uintptr_t)m % 16 == 0) && ((uintptr_t)v % 16 == 0);
    const int64_t n4 = aligned ? n / 4 : 0;
    for (int64_t q = tid; q < n4; q += stride) {
        const int64_t i = q * 4;
        float pp[4], gg[4], mm[4], vv[4];
        load4(p + i, pp);
        load4(g + i, gg);
        load4(m + i, mm);
        load4(v + i, vv);
#pragma unroll
        for (int k = 0; k < 4; k++) adamw_elem(pp[k], gg[k], mm[k], vv[k], s);
        store4(p + i, pp);
        store4(m + i, mm);
        store4(v + i, vv);
    }
    // The n % 4 tail, or everything when a pointer is misaligned.
    for (int64_t i = n4 * 4 + tid; i < n; i += stride) {
        float pi = to_f32(p[i]), mi = m[i], vi = v[i];
        adamw_elem(pi, g[i], mi, vi, s);
        p[i] = from_f32<T>(pi);
        m[i] = mi;
        v[i] = vi;
    }
}

#define ADAMW(TN, T)                                                                                   \
    extern "C" __global__ void adamw_##TN(T* p, const float* g, float* m, float* v, int64_t n,        \
                                          float decay, float w1, float beta2, float w2, float neg_step, \
                                          float bc2_sqrt, float eps) {                                 \
        const AdamWScalars s = {decay, w1, beta2, w2, neg_step, bc2_sqrt, eps};                        \
        adamw_impl<T>(p, g, m, v, n, s);                                                               \
    }
ADAMW(f32, float)
ADAMW(f16, f16)
ADAMW(bf16, bf16)
