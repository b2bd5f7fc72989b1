// The 4-bit weight (NF4/FP4, bitsandbytes layout) as every kernel family reads it: the code books, the
// absmax decode, the nibble reader and the common kernel parameter list. Used by qmatmul.cu, dora.cu
// and nf4.cu; the launchers pass these parameters from one Rust struct (the generated `Q4Params`, filled
// by src/quant/cuda.rs q4_params).
//
// Layout (bitsandbytes functional.py / kernels.cu): W flattened row-major, blocks of 2^bs_log2
// consecutive elements (bs in 32..4096), element f in byte f / 2, HIGH nibble for even f; the value is
// code[nib] * absmax[f >> bs_log2] in f32. Double quantization stores absmax as 8-bit codes into the
// 256-entry nested code book plus one f32 per nested block of 2^nested_log2 codes:
//   absmax[b] = (ncode[codes[b]] * nested[b >> nested_log2]) + offset
// with two f32 roundings (__fmul_rn/__fadd_rn stop nvcc from contracting them into an FMA), exactly as
// bitsandbytes and the CPU twins (src/quant/cpu/, src/qmatmul/cpu/).
#pragma once
#include "common.cuh"

// Code books passed by value (kernel parameters), copied into shared memory by load_luts.
struct Lut16 {
    float v[16];
};
struct Lut256 {
    float v[256];
};

// The absmax of block b. s_ncode: the nested code book in shared memory (only read when DQ).
template <bool DQ>
__device__ __forceinline__ float q4_absmax(const float* __restrict__ absmax, const uint8_t* __restrict__ codes,
                                           const float* __restrict__ nested, const float* s_ncode, float offset,
                                           int nested_log2, int64_t b) {
    if (DQ) return __fadd_rn(__fmul_rn(s_ncode[__ldg(codes + b)], __ldg(nested + (b >> nested_log2))), offset);
    return __ldg(absmax + b);
}

// The 4-bit code of flat element f.
__device__ __forceinline__ uint32_t q4_nibble(const uint8_t* __restrict__ data, int64_t f) {
    const uint32_t byte = __ldg(data + (f >> 1));
    return (f & 1) ? (byte & 15u) : (byte >> 4);
}

// The 8 weights of one 4-byte word of packed codes (little endian: byte j holds element 2j in its high
// nibble and 2j + 1 in its low one) with the absmax `scale` of their block.
__device__ __forceinline__ void q4_decode8(uint32_t word, const float* s_lut, float scale, float o[8]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t byte = (word >> (8 * j)) & 0xFFu;
        o[2 * j] = __fmul_rn(s_lut[byte >> 4], scale);
        o[2 * j + 1] = __fmul_rn(s_lut[byte & 0xFu], scale);
    }
}

// Loads the code books into shared memory; every thread of the (1-D or 2-D) block must call it: it
// synchronizes.
template <bool DQ>
__device__ __forceinline__ void load_luts(float* s_lut, float* s_ncode, const Lut16& lut, const Lut256& ncode) {
    const int tid = threadIdx.x + threadIdx.y * blockDim.x, nthreads = blockDim.x * blockDim.y;
    for (int i = tid; i < 16; i += nthreads) s_lut[i] = lut.v[i];
    if (DQ)
        for (int i = tid; i < 256; i += nthreads) s_ncode[i] = ncode.v[i];
    __syncthreads();
}

// Decodes element f, caching the scale of the last block seen (consecutive f mostly share a block).
template <bool DQ>
struct Q4Reader {
    const uint8_t* __restrict__ data;
    const float* __restrict__ absmax;
    const uint8_t* __restrict__ codes;
    const float* __restrict__ nested;
    const float* s_lut;
    const float* s_ncode;
    float offset;
    int nested_log2;
    int bs_log2;
    int64_t cur_b;
    float cur_s;

    __device__ __forceinline__ float get(int64_t f) {
        const int64_t b = f >> bs_log2;
        if (b != cur_b) {
            cur_b = b;
            cur_s = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, b);
        }
        return s_lut[q4_nibble(data, f)] * cur_s;
    }
};

// The 4-bit weight as kernel parameters, in this order (the Rust side pushes the same order from one
// struct): packed codes, absmax (plain) or codes + nested absmax (double quant; the unused ones are
// null), offset, log2 of the nested blocksize, the 16-entry code book, the nested code book, log2 of
// the blocksize. NULLABLE marks pointers that may be null (see common.cuh).
#define Q4_PARAMS                                                                                            \
    const uint8_t *data, NULLABLE const float *absmax, NULLABLE const uint8_t *codes,                         \
        NULLABLE const float *nested, float offset, int nested_log2, const __grid_constant__ Lut16 lut,       \
        const __grid_constant__ Lut256 ncode, int bs_log2
// The same names as arguments, for the kernel body's call of its implementation.
#define Q4_ARGS data, absmax, codes, nested, offset, nested_log2, lut, ncode, bs_log2
// A reader over Q4_PARAMS once load_luts filled s_lut and s_ncode.
#define Q4_READER(DQ) \
    Q4Reader<DQ> { data, absmax, codes, nested, s_lut, s_ncode, offset, nested_log2, bs_log2, -1, 0.f }
