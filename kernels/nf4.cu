// NF4/FP4 blockwise 4-bit quantization, bitsandbytes-exact (launched by src/quant/cuda.rs; the CPU
// oracle is src/quant/cpu.rs, whose bytes these kernels reproduce exactly).
//
// Exactness: every f32 operation that decides a code is written with an explicit IEEE intrinsic
// (__fdiv_rn, __fmul_rn, __fadd_rn, __fsub_rn) so that neither -use_fast_math nor FMA contraction can
// change a bit; the code trees are bitsandbytes' own (csrc/kernels.cu dQuantizeNF4 / dQuantizeFP4 /
// dQuantize<0>), and the double-quantization mean is an f64 sum in a fixed order (chunks of 256 in
// index order, then the chunk sums in order), the same order as the CPU.
//
// Napkin math (H200: ~4.8 TB/s HBM3e, 50 MB L2), bf16 8192 x 8192 (n = 67 M):
//   quantize   reads 2n = 134 MB, writes n/2 + n/16 = 38 MB  -> 172 MB, ~40 us at 4.3 TB/s
//   dequantize reads n/2 + n/16 = 38 MB, writes 2n = 134 MB -> 172 MB, ~40 us
// Both are pure streaming kernels: ~10 flops per element, no reuse, so the target is copy bandwidth.
#include "q4.cuh"

// ------------------------------------------------------------------------------------------------
// Code choice (bitsandbytes' CUDA device functions; the thresholds are its literals, rounded by nvcc)
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t nf4_code(float x) {
    if (x > 0.03979014977812767f)
        if (x > 0.3893125355243683f)
            if (x > 0.6427869200706482f)
                if (x > 0.8614784181118011f) return 0b1111;
                else return 0b1110;
            else if (x > 0.5016634166240692f) return 0b1101;
            else return 0b1100;
        else if (x > 0.2035212516784668f)
            if (x > 0.2920137718319893f) return 0b1011;
            else return 0b1010;
        else if (x > 0.1202552504837513f) return 0b1001;
        else return 0b1000;
    else if (x > -0.33967943489551544f)
        if (x > -0.13791173323988914f)
            if (x > -0.045525018125772476f) return 0b0111;
            else return 0b0110;
        else if (x > -0.23460740596055984f) return 0b0101;
        else return 0b0100;
    else if (x > -0.6106329262256622f)
        if (x > -0.4599952697753906f) return 0b0011;
        else return 0b0010;
    else if (x > -0.8480964004993439f) return 0b0001;
    else return 0b0000;
}

__device__ __forceinline__ uint32_t fp4_code(float x) {
    const uint32_t sign = x < 0.f ? 0b1000u : 0u;
    x = fabsf(x);
    if (x > 0.29166667f)
        if (x > 0.583333f)
            if (x > 0.8333333f) return 0b0011u + sign;
            else return 0b0010u + sign;
        else if (x > 0.4166667f) return 0b0101u + sign;
        else return 0b0100u + sign;
    else if (x > 0.0859375f)
        if (x > 0.20833333f) return 0b0111u + sign;
        else return 0b0110u + sign;
    else if (x > 0.00260417f) return 0b0001u + sign;
    else return 0b0000u + sign;
}

template <int QT> __device__ __forceinline__ uint32_t code4(float x) { return QT == 0 ? nf4_code(x) : fp4_code(x); }

// ------------------------------------------------------------------------------------------------
// Quantize: one thread per 8 consecutive elements (one 16-byte load for bf16/f16, two for f32; one
// 4-byte store of packed codes). A quant block of bs elements is bs/8 consecutive threads; the block
// absmax is a shuffle reduction within the group (bs <= 256) or warp maxima through shared memory
// (bs >= 512). CUDA blocks have max(256, bs/8) threads, always a multiple of bs/8.
// ------------------------------------------------------------------------------------------------

// The 8 elements at i0 (a multiple of 8) as f32; those at or beyond n read as 0. Full groups are one
// aligned vector load: cudaMalloc bases are 256-byte aligned.
template <typename T> __device__ __forceinline__ void load8(const T* __restrict__ x, int64_t i0, int64_t n, float v[8]) {
    if (i0 + 8 <= n) {
        load8_as_f32(x + i0, v);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = i0 + j < n ? to_f32(x[i0 + j]) : 0.f;
    }
}

template <typename T, int QT>
__device__ __forceinline__ void quantize_impl(const T* __restrict__ x, uint8_t* __restrict__ packed,
                                              float* __restrict__ absmax, int64_t n, int log2_bs,
                                              unsigned long long* __restrict__ first_bad) {
    __shared__ float smax[32];
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t i0 = t * 8;
    float v[8];
    load8<T>(x, i0, n, v);
    // fmaxf ignores NaN (as in bitsandbytes); padding beyond n is 0 and never raises the max.
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (!isfinite(v[j])) atomicMin(first_bad, (unsigned long long)(i0 + j));
        m = fmaxf(m, fabsf(v[j]));
    }
    const int group = 1 << (log2_bs - 3);  // threads per quant block: 4 .. 512
    if (group <= 32) {
        for (int o = group >> 1; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    } else {
        // Uniform branch (group is a kernel argument): every thread reaches the barrier.
        m = warp_max(m);
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, per = group >> 5;
        if (lane == 0) smax[warp] = m;
        __syncthreads();
        const int first = (warp / per) * per;
        m = 0.f;
        for (int k = 0; k < per; k++) m = fmaxf(m, smax[first + k]);
    }
    const float s = __fdiv_rn(1.0f, m);  // 0 -> inf; 0 * inf = NaN -> code 0, as in bitsandbytes CUDA
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
        const uint32_t hi = code4<QT>(__fmul_rn(v[j], s)), lo = code4<QT>(__fmul_rn(v[j + 1], s));
        word |= ((hi << 4) | lo) << (4 * j);  // byte j/2 at the lower address (little endian)
    }
    if (i0 + 8 <= n) {
        *reinterpret_cast<uint32_t*>(packed + 4 * t) = word;  // 4-byte aligned
    } else if (i0 < n) {
        const int64_t nbytes = (n + 1) / 2;
        for (int k = 0; k < 4; k++)
            if (4 * t + k < nbytes) packed[4 * t + k] = (uint8_t)(word >> (8 * k));
    }
    if ((threadIdx.x & (group - 1)) == 0 && i0 < n) absmax[i0 >> log2_bs] = m;
}

#define QUANTIZE(TN, T, QN, QT)                                                                          \
    extern "C" __global__ void quantize_4bit_##TN##_##QN(const T* x, uint8_t* packed, float* absmax,     \
                                                         int64_t n, int log2_bs,                         \
                                                         unsigned long long* first_bad) {                \
        quantize_impl<T, QT>(x, packed, absmax, n, log2_bs, first_bad);                                  \
    }
QUANTIZE(f32, float, nf4, 0)
QUANTIZE(f16, f16, nf4, 0)
QUANTIZE(bf16, bf16, nf4, 0)
QUANTIZE(f32, float, fp4, 1)
QUANTIZE(f16, f16, fp4, 1)
QUANTIZE(bf16, bf16, fp4, 1)

// ------------------------------------------------------------------------------------------------
// Dequantize: one thread per 32 elements = one 16-byte load of packed codes, one absmax (bs >= 32 and
// 32 | bs, so the 32 elements share a block; neighbouring threads hit the same absmax in L1), and
// 8 outputs per 16-byte store (f16/bf16: 4 stores; f32: 8). The 16-entry table sits in shared memory
// (16 distinct words: no bank conflicts). With double quantization the absmax is decoded inline from
// its 8-bit code (the 256-entry map in shared memory), so no second kernel and no f32 absmax round trip.
// The one dequantize kernel of the crate: src/quant/cuda.rs launches it for QuantizedTensor::dequantize
// and for qmatmul's dequantize + cuBLAS path.
// ------------------------------------------------------------------------------------------------

template <typename T, bool DQ>
__device__ __forceinline__ void dequantize_impl(const uint8_t* __restrict__ data, const float* __restrict__ absmax,
                                                const uint8_t* __restrict__ codes, const float* __restrict__ nested,
                                                float offset, int nested_log2, const Lut16& lut,
                                                const Lut256& ncode, int bs_log2, T* __restrict__ out, int64_t n) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t e0 = t * 32;
    if (e0 >= n) return;  // after the only __syncthreads
    // (code[q] * absmax2) + offset, two roundings, exactly as bitsandbytes and the CPU path.
    const float am = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, e0 >> bs_log2);
    if (e0 + 32 <= n) {
        // 16-byte aligned: data + 16 t from a cudaMalloc base.
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(data + 16 * t));
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float o[8];
            q4_decode8(w[k], s_lut, am, o);
            store8_from_f32(out + e0 + 8 * k, o);  // (e0 + 8k) * sizeof(T) is a multiple of 16
        }
    } else {
        for (int64_t i = e0; i < n; i++) out[i] = from_f32<T>(__fmul_rn(s_lut[q4_nibble(data, i)], am));
    }
}

#define DEQUANTIZE(TN, T, DQ)                                                                              \
    extern "C" __global__ void dequantize_4bit_##TN##_dq##DQ(Q4_PARAMS, T* out, int64_t n) {              \
        dequantize_impl<T, DQ>(Q4_ARGS, out, n);                                                           \
    }
DEQUANTIZE(f32, float, 0)
DEQUANTIZE(f32, float, 1)
DEQUANTIZE(f16, f16, 0)
DEQUANTIZE(f16, f16, 1)
DEQUANTIZE(bf16, bf16, 0)
DEQUANTIZE(bf16, bf16, 1)

// ------------------------------------------------------------------------------------------------
// Double quantization (n/64 values: tiny next to the 4-bit pass; written for exactness, not speed)
// ------------------------------------------------------------------------------------------------

// partial[c] = sum of absmax[256 c .. 256 c + 256) in f64, in index order. One warp per 32 chunks:
// coalesced loads into shared memory, then one thread per chunk (row stride 257: no bank conflicts).
extern "C" __global__ void dq_partial_sums(const float* __restrict__ absmax, double* __restrict__ partial,
                                           int64_t nb) {
    __shared__ float tile[32][257];
    const int64_t c0 = (int64_t)blockIdx.x * 32;
    for (int k = threadIdx.x; k < 32 * 256; k += 32) {
        const int64_t i = c0 * 256 + k;
        tile[k >> 8][k & 255] = i < nb ? absmax[i] : 0.f;  // +0.0 leaves an f64 sum unchanged
    }
    __syncwarp();
    const int64_t c = c0 + threadIdx.x;
    if (c < (nb + 255) / 256) {
        double s = 0.0;
        for (int k = 0; k < 256; k++) s += (double)tile[threadIdx.x][k];
        partial[c] = s;
    }
}

// offset = (float)(sum of the partial sums in order / nb). One thread.
extern "C" __global__ void dq_offset(const double* __restrict__ partial, int64_t nchunks, int64_t nb,
                                     float* __restrict__ offset) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int64_t c = 0; c < nchunks; c++) s += partial[c];
    offset[0] = __double2float_rn(s / (double)nb);
}

// One block of 256 threads per nested block: absmax2 = max |absmax - offset|, codes by dQuantize<0>.
extern "C" __global__ void dq_quantize(const float* __restrict__ absmax, const float* __restrict__ offset,
                                       uint8_t* __restrict__ codes, float* __restrict__ absmax2, int64_t nb,
                                       Lut256 dcode) {
    __shared__ float scode[256];
    __shared__ float scratch[8];
    scode[threadIdx.x] = dcode.v[threadIdx.x];  // blockDim.x == 256
    const float off = offset[0];
    const int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x;
    const float d = i < nb ? __fsub_rn(absmax[i], off) : 0.f;
    float m = warp_max(fabsf(d));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();  // also publishes scode
    m = 0.f;
    for (int k = 0; k < 8; k++) m = fmaxf(m, scratch[k]);
    const float s = __fdiv_rn(1.0f, m);
    if (i < nb) codes[i] = quantize_8bit(scode, __fmul_rn(d, s));
    if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
}

// absmax[i] = (code[q[i]] * absmax2[i >> log2_nbs]) + offset (for QuantizedTensor::absmax_f32).
extern "C" __global__ void dq_decode(const uint8_t* __restrict__ codes, const float* __restrict__ absmax2,
                                     Lut256 dcode, float offset, int log2_nbs, float* __restrict__ out,
                                     int64_t nb) {
    GRID_STRIDE(i, nb) out[i] = q4_absmax<true>(nullptr, codes, absmax2, dcode.v, offset, log2_nbs, i);
}
