// k-bit storage tiers (2/3-bit NormalFloat, 8-bit absmax int8): blockwise quantization and
// dequantization (launched by src/kbit/cuda.rs; the CPU oracle is src/kbit/cpu.rs, whose bytes these
// kernels reproduce: tests/kbit.rs compares them bit for bit).
//
// Layout (src/kbit/mod.rs): blocks of 2^log2_bs consecutive elements with an f32 absmax; 2-bit codes four
// per byte (element 4j in the top bits of byte j), 3-bit codes eight per three bytes (a big-endian 24-bit
// word, element 8g + i at bit 21 - 3i), 8-bit codes one per byte (two's complement q in [-127, 127]).
// Every thread owns 8 consecutive elements = `bits` whole bytes, and 8 | blocksize, so no two threads
// write one byte and a thread's 8 elements share one absmax.
//
// Exactness: the f32 operations that decide a code or a value use explicit IEEE intrinsics
// (__fdiv_rn, __fmul_rn, __fadd_rn), so neither fast math nor FMA contraction changes a bit.
//
// Napkin math (H200, ~4.8 TB/s), 8192 x 8192 bf16 dequantized to bf16 (n = 67 M): 2-bit reads n/4 + n/16
// = 21 MB and writes 2n = 134 MB, ~35 us; the absmax pass of quantize reads the input once more.
#include "q4.cuh"

// The code of element i (bytes past the end of the last group are never read: the caller passes nbytes).
__device__ __forceinline__ uint32_t kbit_code(const uint8_t* __restrict__ data, int bits, int64_t i,
                                              int64_t nbytes) {
    if (bits == 2) return (data[i >> 2] >> (6 - 2 * (int)(i & 3))) & 3u;
    if (bits == 3) {
        const int64_t g = 3 * (i >> 3);
        uint32_t w = (uint32_t)data[g] << 16;
        if (g + 1 < nbytes) w |= (uint32_t)data[g + 1] << 8;
        if (g + 2 < nbytes) w |= (uint32_t)data[g + 2];
        return (w >> (21 - 3 * (int)(i & 7))) & 7u;
    }
    return data[i];
}

// absmax[b] = max |x| over block b (NaN ignored, as fmaxf and the CPU's f32::max), and the smallest
// non-finite index in *first_bad. One 256-thread block per quant block.
template <typename T>
__device__ __forceinline__ void absmax_impl(const T* __restrict__ x, float* __restrict__ absmax, int64_t n,
                                            int log2_bs, unsigned long long* first_bad) {
    __shared__ float part[8];
    const int64_t b = blockIdx.x;
    const int64_t start = b << log2_bs;
    const int64_t end = min(n, start + ((int64_t)1 << log2_bs));
    float m = 0.f;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_f32(x[i]);
        if (!isfinite(v)) atomicMin(first_bad, (unsigned long long)i);
        m = fmaxf(m, fabsf(v));
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = 0.f;
        for (int k = 0; k < (int)(blockDim.x >> 5); k++) r = fmaxf(r, part[k]);
        absmax[b] = r;
    }
}

#define KBIT_ABSMAX(TN, T)                                                                                 \
    extern "C" __global__ void kbit_absmax_##TN(const T* x, float* absmax, int64_t n, int log2_bs,         \
                                                unsigned long long* first_bad) {                           \
        absmax_impl<T>(x, absmax, n, log2_bs, first_bad);                                                  \
    }
KBIT_ABSMAX(f32, float)
KBIT_ABSMAX(f16, f16)
KBIT_ABSMAX(bf16, bf16)

// The code of s = x / absmax: 2/3 bits, the number of thresholds strictly below s (NaN: 0); 8 bits,
// round(127 s) half away from zero, clamped to [-127, 127] (NaN: 0).
__device__ __forceinline__ uint32_t kbit_encode(float s, int bits, const float* th) {
    if (bits == 8) {
        if (isnan(s)) return 0;
        const float q = fminf(fmaxf(roundf(__fmul_rn(s, 127.f)), -127.f), 127.f);
        return (uint32_t)(uint8_t)(int8_t)(int)q;
    }
    const int nth = (1 << bits) - 1;
    uint32_t c = 0;
    for (int k = 0; k < nth; k++) c += s > th[k] ? 1u : 0u;
    return c;
}

// Thread t encodes elements [8t, 8t + 8) ∩ [0, n) (missing elements pack as code 0, as on the CPU) and
// writes bytes [bits t, bits t + bits) ∩ [0, nbytes).
template <typename T>
__device__ __forceinline__ void encode_impl(const T* __restrict__ x, const float* __restrict__ absmax,
                                            uint8_t* __restrict__ data, int64_t n, int log2_bs, int bits,
                                            const Lut256& th) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t e0 = 8 * t;
    if (e0 >= n) return;
    const float m = absmax[e0 >> log2_bs];
    const float inv = m > 0.f ? __fdiv_rn(1.0f, m) : 0.f;
    const int64_t nbytes = (n * bits + 7) / 8;
    uint32_t c[8];
#pragma unroll
    for (int j = 0; j < 8; j++)
        c[j] = e0 + j < n ? kbit_encode(__fmul_rn(to_f32(x[e0 + j]), inv), bits, th.v) : 0u;
    uint8_t out[8];
    if (bits == 2) {
        out[0] = (uint8_t)((c[0] << 6) | (c[1] << 4) | (c[2] << 2) | c[3]);
        out[1] = (uint8_t)((c[4] << 6) | (c[5] << 4) | (c[6] << 2) | c[7]);
    } else if (bits == 3) {
        uint32_t w = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) w |= c[j] << (21 - 3 * j);
        out[0] = (uint8_t)(w >> 16);
        out[1] = (uint8_t)(w >> 8);
        out[2] = (uint8_t)w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) out[j] = (uint8_t)c[j];
    }
    const int64_t b0 = bits * t;
    for (int k = 0; k < bits; k++)
        if (b0 + k < nbytes) data[b0 + k] = out[k];
}

#define KBIT_ENCODE(TN, T)                                                                                 \
    extern "C" __global__ void kbit_encode_##TN(const T* x, const float* absmax, uint8_t* data, int64_t n, \
                                                int log2_bs, int bits, const __grid_constant__ Lut256 th) { \
        encode_impl<T>(x, absmax, data, n, log2_bs, bits, th);                                             \
    }
KBIT_ENCODE(f32, float)
KBIT_ENCODE(f16, f16)
KBIT_ENCODE(bf16, bf16)

// out[i] = (T)(lut[code(i)] * absmax[i >> log2_bs]); with double quantization (codes != null) the absmax
// is (ncode[codes[b]] * nested[b >> nested_log2]) + offset, two roundings, as the CPU decodes it.
// Thread t writes elements [8t, 8t + 8) ∩ [0, n); the tables sit in shared memory.
template <typename T>
__device__ __forceinline__ void dequantize_impl(const uint8_t* __restrict__ data, const float* __restrict__ absmax,
                                                const uint8_t* __restrict__ codes,
                                                const float* __restrict__ nested, float offset, int nested_log2,
                                                const Lut256& lut, const Lut256& ncode, int log2_bs, int bits,
                                                T* __restrict__ out, int64_t n) {
    __shared__ float s_lut[256];
    __shared__ float s_ncode[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) {
        s_lut[k] = lut.v[k];
        s_ncode[k] = ncode.v[k];
    }
    __syncthreads();
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t e0 = 8 * t;
    if (e0 >= n) return;  // after the only __syncthreads
    const int64_t b = e0 >> log2_bs;
    const float am = codes != nullptr ? __fadd_rn(__fmul_rn(s_ncode[codes[b]], nested[b >> nested_log2]), offset)
                                      : absmax[b];
    const int64_t nbytes = (n * bits + 7) / 8;
    for (int64_t i = e0; i < e0 + 8 && i < n; i++)
        out[i] = from_f32<T>(__fmul_rn(s_lut[kbit_code(data, bits, i, nbytes)], am));
}

#define KBIT_DEQUANTIZE(TN, T)                                                                             \
    extern "C" __global__ void kbit_dequantize_##TN(                                                       \
        const uint8_t* data, NULLABLE const float* absmax, NULLABLE const uint8_t* codes,                  \
        NULLABLE const float* nested, float offset, int nested_log2, const __grid_constant__ Lut256 lut,   \
        const __grid_constant__ Lut256 ncode, int log2_bs, int bits, T* out, int64_t n) {                  \
        dequantize_impl<T>(data, absmax, codes, nested, offset, nested_log2, lut, ncode, log2_bs, bits, out, n); \
    }
KBIT_DEQUANTIZE(f32, float)
KBIT_DEQUANTIZE(f16, f16)
KBIT_DEQUANTIZE(bf16, bf16)
