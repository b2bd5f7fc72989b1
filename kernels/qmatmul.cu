// Fused 4-bit (NF4/FP4, bitsandbytes layout) linear kernels: y = x·Wᵀ + bias + u·bᵀ and
// dx = dy·W + v·a, W [out, in] frozen. CPU twin and oracle: src/qmatmul/cpu.rs.
//
// Layout: W flattened row-major, blocks of `bs` (power of two, 32..4096) consecutive elements, element
// 2j in the HIGH nibble of byte j, value = code[nib] * absmax[f / bs] in f32. Double quant:
// absmax[b] = (ncode[codes[b]] * nested[b >> nested_log2]) + offset, two f32 roundings (no FMA: the
// __fmul_rn/__fadd_rn below stop nvcc from contracting), exactly as bitsandbytes.
//
// Kernels
//   q4_gemv_simt_*     decode path (<= 16 tokens) for every dtype and shape: one warp per output row,
//                      16-byte loads of 32 codes when in % 32 == 0 (else one code per lane), f32 FMAs,
//                      bias and u·bᵀ folded into the same warp reduction.
//   q4_gemv_mma_*      decode path for f16/bf16, in % 32 == 0: 16 rows per block, 8 warps split K,
//                      4-bit codes decoded straight into mma.sync m16n8k16 A fragments, tokens are the
//                      n8 dimension (1 or 2 n-tiles), bias and u·bᵀ in the cross-warp epilogue.
//   q4_gemm_mma_{fwd,bwd}_*
//                      many tokens, f16/bf16: 128x128x32 block tiles, 8 warps (64x32 each),
//                      cp.async double-buffered activation tiles, W tile decoded into shared memory
//                      one stage ahead, ldmatrix(.trans) fragments, optional split-K (f32 partials),
//                      low-rank term as extra K-tiles ([x | u]·[W | b]ᵀ).
//   splitk_reduce_*, add_bias_*
//
// Napkin math (H200: 4.3 TB/s copy, ~790 TFLOP/s dense bf16, both measured; spec 4.8 TB/s, 989 TFLOP/s):
//   8192x8192 NF4 GEMV: 37.7 MB -> 8.8 us floor; r=16 LoRA adds 0.5 MB. The mma GEMV issues per 2
//   weights ~1 BFE + 1 LDS + 1 FMUL (+ 1/2 CVT) per weight: ~3.5 ops/weight against a budget of ~4.4
//   at full bandwidth, so it should sit near (not at) the floor. Tensor-core work is negligible.
//   4096 tokens x 4096x4096: 137 GFLOP -> 174 us floor; W decode is 16.8 M weights once per
//   (M-tile) = 32 M-tiles x 16.8 M = 0.5 G decodes ~ 2-3% of the mma time.
#include "q4.cuh"
#include "mma.cuh"

// ------------------------------------------------------------------------------------------------
// Decode helpers: the code books, q4_absmax, q4_nibble and load_luts live in q4.cuh, load8_as_f32 in
// common.cuh; the dequantize kernel is nf4.cu's (src/quant/cuda.rs launches it).

// ------------------------------------------------------------------------------------------------
// SIMT decode GEMV: y[t, row] = sum_k W[row, k] x[t, k] + bias[row] + u[t, :]·b[row, :], t < nt <= 16.
// Block: 4 warps, one output row per warp. A: type of bias/u/b (f32 or T).
// ALIGNED (in % 32 == 0): lane loads 16 B = 32 codes of one block per step (chunk c = lane + 32*i).
// General: lane strides single elements, decoding flat index row*in + k.

constexpr int MAXT = 16;

template <typename T, typename A, bool DQ, bool ALIGNED>
__device__ void gemv_simt_impl(const T* __restrict__ x, const uint8_t* __restrict__ data,
                               const float* __restrict__ absmax, const uint8_t* __restrict__ codes,
                               const float* __restrict__ nested, float offset, int nested_log2, const Lut16& lut,
                               const Lut256& ncode, int bs_log2, const A* __restrict__ bias,
                               const A* __restrict__ u, const A* __restrict__ bl, int r, T* __restrict__ y,
                               int nt, int64_t out, int64_t in) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= out) return;  // after the only __syncthreads
    float acc[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; t++) acc[t] = 0.f;
    if (ALIGNED) {
        const int64_t chunks = in >> 5;
        const uint4* wrow = reinterpret_cast<const uint4*>(data + ((row * in) >> 1));  // 16-B aligned
        for (int64_t c = lane; c < chunks; c += 32) {
            const uint4 q = __ldg(wrow + c);
            const float s = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2,
                                          (row * in + (c << 5)) >> bs_log2);
            const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int qi = 0; qi < 4; qi++) {
                // Word qi holds elements 32c + 8qi .. +8 of the row.
                float w[8];
                q4_decode8(words[qi], s_lut, s, w);
#pragma unroll
                for (int t = 0; t < MAXT; t++) {
                    if (t < nt) {
                        float xv[8];
                        load8_as_f32(x + t * in + (c << 5) + 8 * qi, xv);
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[t] = fmaf(w[e], xv[e], acc[t]);
                    }
                }
            }
        }
    } else {
        for (int64_t k = lane; k < in; k += 32) {
            const int64_t f = row * in + k;
            const float w = s_lut[q4_nibble(data, f)] *
                            q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, f >> bs_log2);
#pragma unroll
            for (int t = 0; t < MAXT; t++)
                if (t < nt) acc[t] = fmaf(w, to_f32(x[t * in + k]), acc[t]);
        }
    }
    // Low-rank term, lane-parallel over r, reduced together with the main sum.
    for (int j = lane; j < r; j += 32) {
        const float bj = to_f32(bl[row * r + j]);
#pragma unroll
        for (int t = 0; t < MAXT; t++)
            if (t < nt) acc[t] = fmaf(to_f32(u[t * r + j]), bj, acc[t]);
    }
    const float bv = bias ? to_f32(bias[row]) : 0.f;
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < nt) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) y[t * out + row] = from_f32<T>(v + bv);
        }
    }
}

// The parameters of both decode GEMVs. bias, u and bl are null when absent (r = 0 without u).
#define GEMV_PARAMS(T, A)                                                                                     \
    const T *x, Q4_PARAMS, NULLABLE const A *bias, NULLABLE const A *u, NULLABLE const A *bl, int r, T *y,     \
        int nt, int64_t out, int64_t in
#define GEMV_SIMT(TN, T, AN, A, DQ, AL)                                                                        \
    extern "C" __global__ void q4_gemv_simt_##TN##_##AN##_dq##DQ##_al##AL(GEMV_PARAMS(T, A)) {                 \
        gemv_simt_impl<T, A, DQ, AL>(x, Q4_ARGS, bias, u, bl, r, y, nt, out, in);                                \
    }
#define GEMV_SIMT_DQAL(TN, T, AN, A) \
    GEMV_SIMT(TN, T, AN, A, 0, 0) GEMV_SIMT(TN, T, AN, A, 0, 1) GEMV_SIMT(TN, T, AN, A, 1, 0) GEMV_SIMT(TN, T, AN, A, 1, 1)
GEMV_SIMT_DQAL(f32, float, f32, float)
GEMV_SIMT_DQAL(f16, f16, f16, f16)
GEMV_SIMT_DQAL(f16, f16, f32, float)
GEMV_SIMT_DQAL(bf16, bf16, bf16, bf16)
GEMV_SIMT_DQAL(bf16, bf16, f32, float)

// ------------------------------------------------------------------------------------------------
// Tensor-core primitives (sm_80+)

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading src.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// ------------------------------------------------------------------------------------------------
// Tensor-core decode GEMV (f16/bf16, in % 32 == 0, nt <= 8 * NT tokens).
//
// Block = 8 warps = 16 output rows [row0, row0 + 16). K is cut into 128-element k-tiles; warp w takes
// k-tiles w, w + 8, ... Thread (g = lane / 4, c = lane % 4) owns the 32-element chunk
// k0 + 32c .. +32 of rows row0 + g and row0 + g + 8: two 16-byte loads, one absmax each.
//
// mma m16n8k16 fragment semantics (PTX ISA): a0 = A[g][2c,2c+1], a1 = A[g+8][2c,2c+1],
// a2 = A[g][2c+8,2c+9], a3 = A[g+8][2c+8,2c+9]; b0 = B[2c,2c+1][n=g], b1 = B[2c+8,2c+9][g];
// c0,c1 = C[g][2c,2c+1], c2,c3 = C[g+8][2c,2c+1]. The sum over k is order-free, so the logical k of
// thread c may map to any physical columns as long as A and B agree. Here, for word q (0..3) of the
// thread's uint4 and step h (0..1): logical {2c, 2c+1} -> physical k0 + 32c + 8q + 4h + {0, 1}
// (byte 2h of the word: hi nibble, lo nibble) and logical {2c+8, 2c+9} -> k0 + 32c + 8q + 4h + {2, 3}
// (byte 2h + 1). Over c = 0..3 these are 16 distinct columns per step, and B needs x at the thread's
// own columns: x[tok][k0 + 32c + 8q .. +8] is one 16-byte load whose words 2h, 2h+1 are b0, b1.
// Tokens are the n dimension: n-tile j holds tokens 8j .. 8j + 7 (token = 8j + g for B).

template <typename T, typename A, bool DQ, int NT>
__device__ void gemv_mma_impl(const T* __restrict__ x, const uint8_t* __restrict__ data,
                              const float* __restrict__ absmax, const uint8_t* __restrict__ codes,
                              const float* __restrict__ nested, float offset, int nested_log2, const Lut16& lut,
                              const Lut256& ncode, int bs_log2, const A* __restrict__ bias,
                              const A* __restrict__ u, const A* __restrict__ bl, int r, T* __restrict__ y, int nt,
                              int64_t out, int64_t in) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    __shared__ float red[8][16][16];  // [warp][row][token] partial sums
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int64_t row0 = (int64_t)blockIdx.x * 16;
    const int64_t ra = row0 + g, rb = row0 + g + 8;
    const bool va = ra < out, vb = rb < out;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
    const int64_t nkt = (in + 127) / 128;
    for (int64_t kt = warp; kt < nkt; kt += 8) {
        const int64_t k = kt * 128 + 32 * c;  // first column of this thread's chunk
        const bool vk = k < in;               // in % 32 == 0: the chunk is whole or absent
        uint4 qa = make_uint4(0, 0, 0, 0), qb = make_uint4(0, 0, 0, 0);
        float sa = 0.f, sb = 0.f;
        if (vk && va) {
            qa = __ldg(reinterpret_cast<const uint4*>(data + ((ra * in + k) >> 1)));
            sa = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, (ra * in + k) >> bs_log2);
        }
        if (vk && vb) {
            qb = __ldg(reinterpret_cast<const uint4*>(data + ((rb * in + k) >> 1)));
            sb = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, (rb * in + k) >> bs_log2);
        }
        // Absent rows decode to code[nib] * 0 = 0 (codes are finite): no special case needed.
        const uint32_t wa[4] = {qa.x, qa.y, qa.z, qa.w}, wb[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            uint4 xq[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int tok = 8 * j + g;
                xq[j] = (vk && tok < nt) ? *reinterpret_cast<const uint4*>(x + tok * in + k + 8 * q)
                                         : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                uint32_t af[4];
                const uint32_t b0a = (wa[q] >> (16 * h)) & 0xffu, b1a = (wa[q] >> (16 * h + 8)) & 0xffu;
                const uint32_t b0b = (wb[q] >> (16 * h)) & 0xffu, b1b = (wb[q] >> (16 * h + 8)) & 0xffu;
                af[0] = Vec2<T>::pack(s_lut[b0a >> 4] * sa, s_lut[b0a & 15u] * sa);
                af[1] = Vec2<T>::pack(s_lut[b0b >> 4] * sb, s_lut[b0b & 15u] * sb);
                af[2] = Vec2<T>::pack(s_lut[b1a >> 4] * sa, s_lut[b1a & 15u] * sa);
                af[3] = Vec2<T>::pack(s_lut[b1b >> 4] * sb, s_lut[b1b & 15u] * sb);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xq[j]);
                    const uint32_t bf[2] = {xw[2 * h], xw[2 * h + 1]};
                    mma16816<T>(acc[j], af, bf);
                }
            }
        }
    }
    // Cross-warp reduction through shared memory, then one output per thread (row = tid % 16,
    // token = tid / 16: consecutive threads store consecutive rows of one token).
#pragma unroll
    for (int j = 0; j < NT; j++) {
        red[warp][g][8 * j + 2 * c] = acc[j][0];
        red[warp][g][8 * j + 2 * c + 1] = acc[j][1];
        red[warp][g + 8][8 * j + 2 * c] = acc[j][2];
        red[warp][g + 8][8 * j + 2 * c + 1] = acc[j][3];
    }
    // With one n-tile, tokens 8..15 of `red` are never written and never read (nt <= 8).
    __syncthreads();
    const int orow = threadIdx.x & 15, tok = threadIdx.x >> 4;
    const int64_t row = row0 + orow;
    if (row < out && tok < nt) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) v += red[w][orow][tok];
        if (bias) v += to_f32(bias[row]);
        for (int j = 0; j < r; j++) v = fmaf(to_f32(u[tok * r + j]), to_f32(bl[row * r + j]), v);
        y[tok * out + row] = from_f32<T>(v);
    }
}

#define GEMV_MMA(TN, T, AN, A, DQ, NT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        q4_gemv_mma_##TN##_##AN##_dq##DQ##_nt##NT(GEMV_PARAMS(T, A)) {                                         \
        gemv_mma_impl<T, A, DQ, NT>(x, Q4_ARGS, bias, u, bl, r, y, nt, out, in);                                 \
    }
#define GEMV_MMA_ALL(TN, T, AN, A) \
    GEMV_MMA(TN, T, AN, A, 0, 1) GEMV_MMA(TN, T, AN, A, 0, 2) GEMV_MMA(TN, T, AN, A, 1, 1) GEMV_MMA(TN, T, AN, A, 1, 2)
GEMV_MMA_ALL(f16, f16, f16, f16)
GEMV_MMA_ALL(f16, f16, f32, float)
GEMV_MMA_ALL(bf16, bf16, bf16, bf16)
GEMV_MMA_ALL(bf16, bf16, f32, float)

// ------------------------------------------------------------------------------------------------
// Tiled tensor-core GEMM with in-shared-memory 4-bit decode.
//
// C[M, N] = Act[M, K] · B[K, N] (+ Act2[M, r] · B2[r, N]) (+ bias[N])
//   FWD: Act = x [tokens, in], K = in, N = out, B[k][n] = W[n][k];  Act2 = u, B2[k][n] = b[n][k].
//   BWD: Act = dy [tokens, out], K = out, N = in, B[k][n] = W[k][n]; Act2 = v, B2[k][n] = a[k][n].
// Requirements (checked by the launcher): in % 32 == 0 (each 16-element decode run lies in one block
// and is 8-byte aligned), K % 8 == 0 (16-byte cp.async rows of Act).
//
// Tiles BM = BN = 128, BK = 32; 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 m16 x 4 n8 mmas per
// k16 step. Shared memory, padded rows (conflict-free ldmatrix, computed in the comments below):
//   As[2][128][40] T           (row stride 80 B: 8 rows hit bank groups 0,20,8,28,16,4,24,12)
//   FWD Bs[2][128][40] T       (stored [n][k]: ldmatrix gives B fragments directly)
//   BWD Bs[2][32][136] T       (stored [k][n], 272 B rows: ldmatrix.trans)
// = 40 KB (FWD) / 37 KB (BWD), static.
// Pipeline per k-tile: issue cp.async of the next Act tile and the global loads of the next W codes,
// run the 8 k16 x 16 mmas of this tile, decode the prefetched codes into the other W stage, wait,
// barrier. Split-K: blockIdx.z takes a contiguous range of k-tiles; with splits > 1 the f32 partials
// go to `ws` and splitk_reduce adds them (and the bias). The low-rank K-tiles run in the last split.

constexpr int BM = 128, BN = 128, BK = 32;
constexpr int APAD = BK + 8;   // As / FWD Bs row length (elements)
constexpr int BPADT = BN + 8;  // BWD Bs row length

template <bool BWD>
struct BsLayout;
template <>
struct BsLayout<false> {
    static constexpr int SIZE = BN * APAD;
};
template <>
struct BsLayout<true> {
    static constexpr int SIZE = BK * BPADT;
};

template <typename T, typename A, bool DQ, bool BWD>
__device__ void gemm_mma_impl(const T* __restrict__ act, const uint8_t* __restrict__ data,
                              const float* __restrict__ absmax, const uint8_t* __restrict__ codes,
                              const float* __restrict__ nested, float offset, int nested_log2, const Lut16& lut,
                              const Lut256& ncode, int bs_log2, const A* __restrict__ bias,
                              const A* __restrict__ act2, const A* __restrict__ b2, int r, T* __restrict__ y,
                              float* __restrict__ ws, int64_t M, int64_t N, int64_t K, int64_t in,
                              int kt_per_split) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    __shared__ __align__(16) T As[2][BM * APAD];
    __shared__ __align__(16) T Bs[2][BsLayout<BWD>::SIZE];
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
    const int64_t nkt = K / BK + (K % BK != 0);
    const int64_t kt_begin = (int64_t)blockIdx.z * kt_per_split;
    const int64_t kt_end = min(nkt, kt_begin + kt_per_split);
    const bool last_split = blockIdx.z == gridDim.z - 1;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

    // --- Act tile: 128 rows x 32 cols = 512 chunks of 8 elements, 2 per thread.
    auto load_act = [&](int s, int64_t kt) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int id = tid + 256 * i;
            const int row = id >> 2, col = (id & 3) * 8;
            const int64_t gm = m0 + row, gk = kt * BK + col;
            const bool ok = gm < M && gk < K;  // K % 8 == 0: the 8-chunk is whole or absent
            const T* src = ok ? act + gm * K + gk : act;
            cp_async16(&As[s][row * APAD + col], src, ok ? 16 : 0);
        }
    };
    // --- W codes of one tile: 8 bytes = 16 consecutive weights of one W row per thread.
    //   FWD: W rows n0 + tid/2, columns kt*32 + 16*(tid%2).   BWD: W row kt*32 + tid/8, columns n0 + 16*(tid%8).
    auto load_w = [&](int64_t kt, uint2& q, float& s) {
        int64_t wrow, wcol;
        if (BWD) {
            wrow = kt * BK + (tid >> 3);
            wcol = n0 + 16 * (tid & 7);
        } else {
            wrow = n0 + (tid >> 1);
            wcol = kt * BK + 16 * (tid & 1);
        }
        const int64_t rows = BWD ? K : N;  // W has `out` rows: K in BWD, N in FWD
        q = make_uint2(0, 0);
        s = 0.f;
        if (wrow < rows && wcol < in) {  // in % 32 == 0: the 16-run is whole or absent
            const int64_t f = wrow * in + wcol;
            q = __ldg(reinterpret_cast<const uint2*>(data + (f >> 1)));
            s = q4_absmax<DQ>(absmax, codes, nested, s_ncode, offset, nested_log2, f >> bs_log2);
        }
    };
    auto store_w = [&](int s, const uint2& q, float sc) {
        uint32_t v[8];
        const uint32_t words[2] = {q.x, q.y};
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t byte = (words[i >> 2] >> (8 * (i & 3))) & 0xffu;
            v[i] = Vec2<T>::pack(s_lut[byte >> 4] * sc, s_lut[byte & 15u] * sc);
        }
        T* dst = BWD ? &Bs[s][(tid >> 3) * BPADT + 16 * (tid & 7)] : &Bs[s][(tid >> 1) * APAD + 16 * (tid & 1)];
        reinterpret_cast<uint4*>(dst)[0] = make_uint4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<uint4*>(dst)[1] = make_uint4(v[4], v[5], v[6], v[7]);
    };
    auto compute = [&](int s) {
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            uint32_t af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                ldmatrix_x4(af[mi], &As[s][(wm * 64 + mi * 16 + (lane & 15)) * APAD + ks * 16 + (lane >> 4) * 8]);
#pragma unroll
            for (int p = 0; p < 2; p++) {
                uint32_t t4[4];
                if (BWD) {
                    const int kr = ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                    const int nc = wn * 32 + p * 16 + (lane >> 4) * 8;
                    ldmatrix_x4_trans(t4, &Bs[s][kr * BPADT + nc]);
                } else {
                    const int nr = wn * 32 + p * 16 + (lane & 7) + (lane >> 4) * 8;
                    const int kc = ks * 16 + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4(t4, &Bs[s][nr * APAD + kc]);
                }
                bfr[2 * p][0] = t4[0];
                bfr[2 * p][1] = t4[1];
                bfr[2 * p + 1][0] = t4[2];
                bfr[2 * p + 1][1] = t4[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int nj = 0; nj < 4; nj++) mma16816<T>(acc[mi][nj], af[mi], bfr[nj]);
        }
    };

    if (kt_begin < kt_end) {
        uint2 q;
        float sc;
        load_act(0, kt_begin);
        cp_async_commit();
        load_w(kt_begin, q, sc);
        store_w(0, q, sc);
        cp_async_wait_all();
        __syncthreads();
        for (int64_t kt = kt_begin; kt < kt_end; kt++) {
            const int s = (int)((kt - kt_begin) & 1);
            const bool more = kt + 1 < kt_end;
            if (more) {
                load_act(s ^ 1, kt + 1);
                cp_async_commit();
                load_w(kt + 1, q, sc);
            }
            compute(s);
            if (more) store_w(s ^ 1, q, sc);
            cp_async_wait_all();
            __syncthreads();
        }
    }

    // --- Low-rank K-tiles (last split only): Act2 [M, r] and B2 converted to T on load.
    if (last_split && r > 0) {
        for (int k2 = 0; k2 < r; k2 += BK) {
            // As: 128 x 32, 16 elements per thread (row tid/2, cols 16*(tid%2) ..).
            {
                const int row = tid >> 1, col = 16 * (tid & 1);
                const int64_t gm = m0 + row;
#pragma unroll
                for (int e = 0; e < 16; e++) {
                    const int kk = k2 + col + e;
                    const float v = (gm < M && kk < r) ? to_f32(act2[gm * r + kk]) : 0.f;
                    As[0][row * APAD + col + e] = from_f32<T>(v);
                }
            }
            if (BWD) {
                // Bs[k][n] = a[k2 + k][n0 + n]: row tid/8, cols 16*(tid%8) ..
                const int kr = tid >> 3, nc = 16 * (tid & 7);
#pragma unroll
                for (int e = 0; e < 16; e++) {
                    const int64_t gn = n0 + nc + e;
                    const int kk = k2 + kr;
                    const float v = (kk < r && gn < N) ? to_f32(b2[(int64_t)kk * N + gn]) : 0.f;
                    Bs[0][kr * BPADT + nc + e] = from_f32<T>(v);
                }
            } else {
                // Bs[n][k] = b[n0 + n][k2 + k]: row tid/2, cols 16*(tid%2) ..
                const int nr = tid >> 1, kc = 16 * (tid & 1);
                const int64_t gn = n0 + nr;
#pragma unroll
                for (int e = 0; e < 16; e++) {
                    const int kk = k2 + kc + e;
                    const float v = (gn < N && kk < r) ? to_f32(b2[gn * r + kk]) : 0.f;
                    Bs[0][nr * APAD + kc + e] = from_f32<T>(v);
                }
            }
            __syncthreads();
            compute(0);
            __syncthreads();
        }
    }

    // --- Epilogue: thread holds C[m][n], C[m][n+1] (c0, c1) and rows m+8 (c2, c3).
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int nj = 0; nj < 4; nj++) {
            const int64_t n = n0 + wn * 32 + nj * 8 + 2 * c;
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * hh;
                if (m >= M) continue;
                const float v0 = acc[mi][nj][2 * hh], v1 = acc[mi][nj][2 * hh + 1];
                if (ws) {
                    float* o = ws + (int64_t)blockIdx.z * M * N + m * N;
                    if (n < N) o[n] = v0;
                    if (n + 1 < N) o[n + 1] = v1;
                } else {
                    if (n < N) y[m * N + n] = from_f32<T>(v0 + (bias ? to_f32(bias[n]) : 0.f));
                    if (n + 1 < N) y[m * N + n + 1] = from_f32<T>(v1 + (bias ? to_f32(bias[n + 1]) : 0.f));
                }
            }
        }
    }
}

#define GEMM_MMA(DIR, BWDV, TN, T, AN, A, DQ)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) q4_gemm_mma_##DIR##_##TN##_##AN##_dq##DQ(               \
        const T* act, Q4_PARAMS, NULLABLE const A* bias, NULLABLE const A* act2, NULLABLE const A* b2, int r,    \
        T* y, NULLABLE float* ws, int64_t M, int64_t N, int64_t K, int64_t in, int kt_per_split) {              \
        gemm_mma_impl<T, A, DQ, BWDV>(act, Q4_ARGS, bias, act2, b2, r, y, ws, M, N, K, in, kt_per_split);        \
    }
#define GEMM_MMA_ALL(TN, T, AN, A)                                                                            \
    GEMM_MMA(fwd, false, TN, T, AN, A, 0) GEMM_MMA(fwd, false, TN, T, AN, A, 1)                              \
    GEMM_MMA(bwd, true, TN, T, AN, A, 0) GEMM_MMA(bwd, true, TN, T, AN, A, 1)
GEMM_MMA_ALL(f16, f16, f16, f16)
GEMM_MMA_ALL(f16, f16, f32, float)
GEMM_MMA_ALL(bf16, bf16, bf16, bf16)
GEMM_MMA_ALL(bf16, bf16, f32, float)

// ------------------------------------------------------------------------------------------------
// Split-K reduction and bias.

template <typename T, typename A>
__device__ void splitk_reduce_impl(const float* __restrict__ ws, const A* __restrict__ bias, T* __restrict__ y,
                                   int64_t M, int64_t N, int splits) {
    const int64_t n = M * N;
    GRID_STRIDE(i, n) {
        float v = bias ? to_f32(bias[i % N]) : 0.f;
        for (int s = 0; s < splits; s++) v += ws[(int64_t)s * n + i];
        y[i] = from_f32<T>(v);
    }
}
// y[m, n] += bias[n], in place (after cuBLAS).
template <typename T, typename A>
__device__ void add_bias_impl(T* __restrict__ y, const A* __restrict__ bias, int64_t M, int64_t N) {
    GRID_STRIDE(i, M * N) y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % N]));
}
#define EPI(TN, T, AN, A)                                                                                    \
    extern "C" __global__ void splitk_reduce_##TN##_##AN(const float* ws, NULLABLE const A* bias, T* y,      \
                                                         int64_t M, int64_t N, int splits) {                 \
        splitk_reduce_impl<T, A>(ws, bias, y, M, N, splits);                                                 \
    }                                                                                                        \
    extern "C" __global__ void add_bias_##TN##_##AN(T* y, const A* bias, int64_t M, int64_t N) {             \
        add_bias_impl<T, A>(y, bias, M, N);                                                                  \
    }
EPI(f32, float, f32, float)
EPI(f16, f16, f16, f16)
EPI(f16, f16, f32, float)
EPI(bf16, bf16, bf16, bf16)
EPI(bf16, bf16, f32, float)
