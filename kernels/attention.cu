// Scaled dot-product attention, forward and backward, fused in the FlashAttention-2 manner (Dao 2023,
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"): online softmax
// over key tiles, no seq x seq matrix in memory, the row log-sum-exp saved for backward, P recomputed in
// backward. Semantics (masks, GQA, dropout index, fully masked rows) are src/attention/mod.rs's; the CPU
// twin is src/attention/cpu.rs.
//
// Layout: q [B*Sq, H*D], k/v [B*Sk, KVH*D] token-major (head h of token t = columns h*D..h*D+D of row
// t); kv head of query head h is h / (H / KVH). Scores, softmax and all accumulation are f32; f16/bf16
// are converted on load and rounded once on store.
//
// Kernels (SIMT path: every dtype, head_dim <= 128; the host rejects larger heads; see the end of the
// file for the tensor-core forward):
//   attn_fwd_<T>      grid (B*H, ceil(Sq/16)), 128 threads. 4 warps x 4 query rows; Q rows in shared
//                     memory, K/V tiles of 32 keys in shared memory (f32, rows padded to 129 floats so
//                     that lane j reading key j's row is conflict-free). Per row and tile: lane j scores
//                     key j, warp max/sum give the online-softmax update, P is broadcast by shuffles into
//                     the output accumulator (lane owns d = lane + 32c). Causal blocks stop at their last
//                     visible key tile.
//   attn_bwd_dot_<T>  D = rowsum(dO * O) per (b, h, i), one warp per row (FA-2's precomputation).
//   attn_bwd_<T>      grid (B*KVH, ceil(Sk/32)), 128 threads: each block owns 32 keys of one kv head
//                     (warp w keys 8w..8w+7, dK/dV accumulated in registers, lane owns d = lane + 32c) and
//                     walks every query head of its group and every query row that can see its keys
//                     (causal: rows from j0 - (Sk - Sq)). Per row: s and dP by warp reductions, P =
//                     exp(scale*s - lse), dS = P*(dP*M - D); dK += scale*dS*q, dV += P*M*dO, and dQ +=
//                     scale*dS*K is added to an f32 buffer with atomics.
//
// Why dQ by atomics (as FA-2 does) rather than a second pass: a second, query-major pass would recompute
// S and dP (two more Q·Kᵀ-sized products, +40% backward FLOPs); the atomics cost one f32 red per
// (row, d, 8-key warp slice), which at Sk/8 adds per dQ element is far below the FLOPs saved. dK/dV need
// no atomics because one block owns each key (GQA's query heads are looped inside the block).
//
// Napkin math, H200 (~790 TFLOP/s dense bf16 tensor cores, ~67 TFLOP/s f32 SIMT FMA, 4.8 TB/s HBM):
//   seq 512, head_dim 64, bf16, per (batch, head): forward FLOPs 4*S^2*D = 67 MFLOP, bytes in/out
//   4*S*D*2 = 262 KB -> 256 FLOP/byte, compute bound. Backward 2.5x the forward FLOPs (5 matmuls incl. the
//   recomputed S). A tuned mma.sync m16n8k16 kernel (FA-2) reaches 50-70% of peak at this size; this
//   SIMT path is bounded by f32 FMA (~67 TFLOP/s, ~8% of the tensor-core peak) and by its shared-memory
//   reads (one 4-byte load per FMA), so expect ~3-5% of the bf16 peak.
//   seq 2048, head_dim 128, causal: forward 4*S^2*D/2 = 1.07 GFLOP per (batch, head) (half the tiles
//   skipped), 2 MB of q/k/v/o at bf16 -> 512 FLOP/byte. FA-2 reports ~70% of peak (A100) for forward;
//   part 2's goal of 40% needs the mma path, not this one.
// STATUS: forward has a tensor-core path (attn_fwd_mma_*, below) for f16/bf16 with head_dim 32/64/128;
// the backward is SIMT only (f16/bf16 run it with f32 math): an mma.sync backward is not written yet.

#include "common.cuh"
#include "mma.cuh"
#include <math.h>

#define ATT_DMAX 128
#define ATT_BK 32
#define ATT_KPAD (ATT_DMAX + 1)
#define FWD_WARPS 4
#define FWD_RPW 4
#define FWD_ROWS (FWD_WARPS * FWD_RPW)
#define BWD_KPW 8  // keys per warp in backward (4 warps x 8 = ATT_BK)
#define ATT_DPL (ATT_DMAX / 32)  // head features per lane

// Whether query i of sequence b may see key j (key in range, not padding, causal bottom-right).
__device__ __forceinline__ bool att_visible(const uint8_t* mask, int b, int Sq, int Sk, int i, int j, int causal) {
    if (j >= Sk) return false;
    if (mask != nullptr && mask[(int64_t)b * Sk + j] == 0) return false;
    return !causal || (int64_t)j + Sq <= (int64_t)i + Sk;
}

// Dropout multiplier of probability (b, h, i, j): 0 or 1/(1-p); 1 without dropout (threshold 0).
__device__ __forceinline__ float att_keep(uint64_t threshold, float drop_scale, uint64_t seed, int b, int h, int H,
                                          int i, int Sq, int j, int Sk) {
    if (threshold == 0) return 1.f;
    const uint64_t idx = (((uint64_t)b * H + h) * (uint64_t)Sq + i) * (uint64_t)Sk + j;
    return (uint64_t)dropout_hash(seed, idx) >= threshold ? drop_scale : 0.f;
}

// Loads keys j0..j0+31 of one kv head (rows b*Sk + j of a [B*Sk, KVH*D] tensor, columns g*D..) into an
// f32 tile, zero beyond Sk and beyond D (so that padded lanes multiply zeros, never stale bits).
template <typename T>
__device__ __forceinline__ void att_load_tile(float (*dst)[ATT_KPAD], const T* __restrict__ base, int64_t stride,
                                              int j0, int Sk, int D) {
    for (int e = threadIdx.x; e < ATT_BK * ATT_DMAX; e += blockDim.x) {
        const int jj = e / ATT_DMAX, d = e % ATT_DMAX;
        dst[jj][d] = (j0 + jj < Sk && d < D) ? to_f32(base[(int64_t)(j0 + jj) * stride + d]) : 0.f;
    }
}

template <typename T>
__device__ void attn_fwd_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const uint8_t* __restrict__ mask_in, int has_mask, T* __restrict__ out,
                              float* __restrict__ lse, int Sq, int Sk, int H, int KVH, int D, float scale, int causal,
                              uint64_t threshold, float drop_scale, uint64_t seed) {
    __shared__ float Qs[FWD_ROWS][ATT_DMAX];
    __shared__ float Ks[ATT_BK][ATT_KPAD];
    __shared__ float Vs[ATT_BK][ATT_KPAD];
    const uint8_t* mask = has_mask ? mask_in : nullptr;
    const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / KVH);
    const int i0 = blockIdx.y * FWD_ROWS;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t qstride = (int64_t)H * D, kstride = (int64_t)KVH * D;
    const T* qb = q + (int64_t)b * Sq * qstride + (int64_t)h * D;
    const T* kb = k + (int64_t)b * Sk * kstride + (int64_t)g * D;
    const T* vb = v + (int64_t)b * Sk * kstride + (int64_t)g * D;
    for (int e = tid; e < FWD_ROWS * ATT_DMAX; e += blockDim.x) {
        const int r = e / ATT_DMAX, d = e % ATT_DMAX;
        Qs[r][d] = (i0 + r < Sq && d < D) ? to_f32(qb[(int64_t)(i0 + r) * qstride + d]) : 0.f;
    }
    float m[FWD_RPW], l[FWD_RPW], o[FWD_RPW][ATT_DPL];
#pragma unroll
    for (int t = 0; t < FWD_RPW; t++) {
        m[t] = -INFINITY;
        l[t] = 0.f;
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) o[t][c] = 0.f;
    }
    // Keys any row of this block may see: causal rows i see j <= i + Sk - Sq.
    int kend = Sk;
    if (causal) {
        const int64_t last = (int64_t)min(i0 + FWD_ROWS, Sq) - 1 + Sk - Sq + 1;
        kend = (int)max((int64_t)0, min((int64_t)Sk, last));
    }
    for (int j0 = 0; j0 < kend; j0 += ATT_BK) {
        __syncthreads();  // previous tile fully consumed (and Qs written, the first time)
        att_load_tile<T>(Ks, kb, kstride, j0, Sk, D);
        att_load_tile<T>(Vs, vb, kstride, j0, Sk, D);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < FWD_RPW; t++) {
            const int r = warp * FWD_RPW + t, i = i0 + r;
            if (i >= Sq) break;  // warp-uniform
            const int j = j0 + lane;
            const bool vis = att_visible(mask, b, Sq, Sk, i, j, causal);
            float s = -INFINITY;
            if (vis) {
                float acc = 0.f;
                for (int d = 0; d < D; d++) acc = fmaf(Qs[r][d], Ks[lane][d], acc);
                s = acc * scale;
            }
            const float mnew = fmaxf(m[t], warp_max(s));
            if (mnew == -INFINITY) continue;  // warp-uniform: nothing visible to this row yet
            const float p = vis ? expf(s - mnew) : 0.f;
            const float corr = expf(m[t] - mnew);  // 0 when m was -inf
            l[t] = l[t] * corr + warp_sum(p);
            const float pd = p * att_keep(threshold, drop_scale, seed, b, h, H, i, Sq, j, Sk);
#pragma unroll
            for (int c = 0; c < ATT_DPL; c++) o[t][c] *= corr;
            for (int jj = 0; jj < ATT_BK; jj++) {
                const float pj = __shfl_sync(0xffffffffu, pd, jj);
#pragma unroll
                for (int c = 0; c < ATT_DPL; c++) o[t][c] = fmaf(pj, Vs[jj][lane + 32 * c], o[t][c]);
            }
            m[t] = mnew;
        }
    }
#pragma unroll
    for (int t = 0; t < FWD_RPW; t++) {
        const int r = warp * FWD_RPW + t, i = i0 + r;
        if (i >= Sq) break;
        // l >= 1 once any key was visible (the max term is exp(0)); l == 0 means a fully masked row.
        const bool empty = l[t] == 0.f;
        const float inv = empty ? 0.f : 1.f / l[t];
        T* orow = out + ((int64_t)b * Sq + i) * qstride + (int64_t)h * D;
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) {
            const int d = lane + 32 * c;
            if (d < D) orow[d] = from_f32<T>(o[t][c] * inv);
        }
        if (lane == 0) lse[((int64_t)b * H + h) * Sq + i] = empty ? INFINITY : m[t] + logf(l[t]);
    }
}

// D[(b*H + h)*Sq + i] = sum_d dO[b*Sq + i, h*D + d] * O[b*Sq + i, h*D + d]; one warp per (token, head).
template <typename T>
__device__ void attn_bwd_dot_impl(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ dvec,
                                  int64_t tokens, int Sq, int H, int D) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t n = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); n < tokens * H; n += warps) {
        const int64_t t = n / H;
        const int h = (int)(n % H);
        const int64_t base = t * H * D + (int64_t)h * D;
        float acc = 0.f;
        for (int d = lane; d < D; d += 32) acc = fmaf(to_f32(o[base + d]), to_f32(dout[base + d]), acc);
        acc = warp_sum(acc);
        const int64_t b = t / Sq, i = t % Sq;
        if (lane == 0) dvec[(b * H + h) * Sq + i] = acc;
    }
}

template <typename T>
__device__ void attn_bwd_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const T* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ dvec, const uint8_t* __restrict__ mask_in, int has_mask,
                              float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv, int Sq, int Sk,
                              int H, int KVH, int D, float scale, int causal, uint64_t threshold, float drop_scale,
                              uint64_t seed) {
    __shared__ float Ks[ATT_BK][ATT_KPAD];
    __shared__ float Vs[ATT_BK][ATT_KPAD];
    const uint8_t* mask = has_mask ? mask_in : nullptr;
    const int b = blockIdx.x / KVH, g = blockIdx.x % KVH, group = H / KVH;
    const int j0 = blockIdx.y * ATT_BK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t qstride = (int64_t)H * D, kstride = (int64_t)KVH * D;
    att_load_tile<T>(Ks, k + (int64_t)b * Sk * kstride + (int64_t)g * D, kstride, j0, Sk, D);
    att_load_tile<T>(Vs, v + (int64_t)b * Sk * kstride + (int64_t)g * D, kstride, j0, Sk, D);
    __syncthreads();
    float dka[BWD_KPW][ATT_DPL], dva[BWD_KPW][ATT_DPL];
#pragma unroll
    for (int kk = 0; kk < BWD_KPW; kk++)
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) dka[kk][c] = dva[kk][c] = 0.f;
    // The first row that can see any key of this warp's slice.
    const int jw = j0 + warp * BWD_KPW;
    const int istart = causal ? (int)max((int64_t)0, (int64_t)jw - Sk + Sq) : 0;
    for (int hh = 0; hh < group; hh++) {
        const int h = g * group + hh;
        for (int i = istart; i < Sq; i++) {
            const int64_t row = ((int64_t)b * H + h) * Sq + i;
            const float L = lse[row];
            if (L == INFINITY) continue;  // fully masked query row: no gradient
            const int64_t at = ((int64_t)b * Sq + i) * qstride + (int64_t)h * D;
            float qv[ATT_DPL], dov[ATT_DPL], dqp[ATT_DPL];
#pragma unroll
            for (int c = 0; c < ATT_DPL; c++) {
                const int d = lane + 32 * c;
                qv[c] = d < D ? to_f32(q[at + d]) : 0.f;
                dov[c] = d < D ? to_f32(dout[at + d]) : 0.f;
                dqp[c] = 0.f;
            }
            const float Di = dvec[row];
            bool any = false;
#pragma unroll
            for (int kk = 0; kk < BWD_KPW; kk++) {
                const int jl = warp * BWD_KPW + kk, j = j0 + jl;
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int c = 0; c < ATT_DPL; c++) {
                    s = fmaf(qv[c], Ks[jl][lane + 32 * c], s);
                    dp = fmaf(dov[c], Vs[jl][lane + 32 * c], dp);
                }
                s = warp_sum(s);
                dp = warp_sum(dp);
                if (!att_visible(mask, b, Sq, Sk, i, j, causal)) continue;  // warp-uniform
                any = true;
                const float p = expf(s * scale - L);
                const float keep = att_keep(threshold, drop_scale, seed, b, h, H, i, Sq, j, Sk);
                const float ds = p * (dp * keep - Di) * scale;
                const float pk = p * keep;
#pragma unroll
                for (int c = 0; c < ATT_DPL; c++) {
                    dva[kk][c] = fmaf(pk, dov[c], dva[kk][c]);
                    dka[kk][c] = fmaf(ds, qv[c], dka[kk][c]);
                    dqp[c] = fmaf(ds, Ks[jl][lane + 32 * c], dqp[c]);
                }
            }
            if (any) {
#pragma unroll
                for (int c = 0; c < ATT_DPL; c++) {
                    const int d = lane + 32 * c;
                    if (d < D) atomicAdd(&dq_acc[at + d], dqp[c]);
                }
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < BWD_KPW; kk++) {
        const int j = jw + kk;
        if (j >= Sk) break;
        const int64_t at = ((int64_t)b * Sk + j) * kstride + (int64_t)g * D;
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) {
            const int d = lane + 32 * c;
            if (d < D) {
                dk[at + d] = from_f32<T>(dka[kk][c]);
                dv[at + d] = from_f32<T>(dva[kk][c]);
            }
        }
    }
}

#define ATTN(TN, T)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        attn_fwd_##TN(const T* q, const T* k, const T* v, const uint8_t* mask, int has_mask, T* out, float* lse, \
                      int Sq, int Sk, int H, int KVH, int D, float scale, int causal, uint64_t threshold,       \
                      float drop_scale, uint64_t seed) {                                                         \
        attn_fwd_impl<T>(q, k, v, mask, has_mask, out, lse, Sq, Sk, H, KVH, D, scale, causal, threshold,        \
                         drop_scale, seed);                                                                      \
    }                                                                                                            \
    extern "C" __global__ void attn_bwd_dot_##TN(const T* o, const T* dout, float* dvec, int64_t tokens, int Sq, \
                                                 int H, int D) {                                                 \
        attn_bwd_dot_impl<T>(o, dout, dvec, tokens, Sq, H, D);                                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        attn_bwd_##TN(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dvec,   \
                      const uint8_t* mask, int has_mask, float* dq_acc, T* dk, T* dv, int Sq, int Sk, int H,     \
                      int KVH, int D, float scale, int causal, uint64_t threshold, float drop_scale,            \
                      uint64_t seed) {                                                                           \
        attn_bwd_impl<T>(q, k, v, dout, lse, dvec, mask, has_mask, dq_acc, dk, dv, Sq, Sk, H, KVH, D, scale,    \
                         causal, threshold, drop_scale, seed);                                                   \
    }

ATTN(f32, float)
ATTN(f16, f16)
ATTN(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Tensor-core forward (f16/bf16, head_dim D in {32, 64, 128}): FA-2's forward with mma.sync m16n8k16.
//
// Block = 4 warps = 64 query rows (warp w: rows 16w..16w+15, fragment rows g and g+8), key tiles of 64.
// Q stays in registers as A fragments (D/16 k-steps x 4 regs, loaded once from global). K and V tiles
// live in shared memory as [key][D + 8] T (row stride (D+8)*2 bytes = 16 mod 128: the 8 row addresses
// of every ldmatrix hit distinct 16-byte bank groups). S = Q·Kᵀ: K rows are B fragments directly
// (ldmatrix, as qmatmul's forward); O += P·V: P is re-packed from the S accumulators into A fragments
// (the C layout of n-tiles 2kk, 2kk+1 is the A layout of k-step kk), V through ldmatrix.trans.
// Softmax statistics per fragment row: max over the quad (lanes 4g..4g+3) by shuffles; the row sum l is
// kept per thread and reduced over the quad at the end. P is rounded to T for the P·V product (as FA-2).
// Shared memory: 2 x 64 x (D+8) x 2 B = 34.8 KB at D = 128. Registers at D = 128: O 64 + S 32 + Q 32.
#define MMA_BQ 64
#define MMA_BK 64

template <typename T, int D>
__device__ void attn_fwd_mma_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  const uint8_t* __restrict__ mask_in, int has_mask, T* __restrict__ out,
                                  float* __restrict__ lse, int Sq, int Sk, int H, int KVH, float scale, int causal,
                                  uint64_t threshold, float drop_scale, uint64_t seed) {
    constexpr int PAD = D + 8;
    constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
    constexpr int NT = D / 8;   // n-tiles of O
    __shared__ __align__(16) T Ks[MMA_BK * PAD];
    __shared__ __align__(16) T Vs[MMA_BK * PAD];
    const uint8_t* mask = has_mask ? mask_in : nullptr;
    const int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KVH);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, cq = lane & 3;
    const int i0 = blockIdx.y * MMA_BQ;
    const int64_t qstride = (int64_t)H * D, kstride = (int64_t)KVH * D;
    const T* qb = q + (int64_t)b * Sq * qstride + (int64_t)h * D;
    const T* kb = k + (int64_t)b * Sk * kstride + (int64_t)kvh * D;
    const T* vb = v + (int64_t)b * Sk * kstride + (int64_t)kvh * D;
    // The thread's two query rows (fragment rows g and g + 8 of its warp).
    const int rows[2] = {i0 + warp * 16 + gq, i0 + warp * 16 + gq + 8};

    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ks++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = rows[e & 1], d = ks * 16 + 2 * cq + (e >> 1) * 8;
            qf[ks][e] = i < Sq ? *reinterpret_cast<const uint32_t*>(qb + (int64_t)i * qstride + d) : 0u;
        }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    int kend = Sk;
    if (causal) {
        const int64_t last = (int64_t)min(i0 + MMA_BQ, Sq) - 1 + Sk - Sq + 1;
        kend = (int)max((int64_t)0, min((int64_t)Sk, last));
    }
    for (int j0 = 0; j0 < kend; j0 += MMA_BK) {
        __syncthreads();  // the previous tile is consumed
        // 16-byte chunks: MMA_BK rows x D/8 chunks each for K and V (D % 8 == 0 and the row offsets are
        // multiples of 8 elements, so every chunk is 16-byte aligned in global memory).
        for (int e = tid; e < MMA_BK * (D / 8); e += blockDim.x) {
            const int jj = e / (D / 8), d = (e % (D / 8)) * 8;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (j0 + jj < Sk) {
                kv4 = *reinterpret_cast<const uint4*>(kb + (int64_t)(j0 + jj) * kstride + d);
                vv4 = *reinterpret_cast<const uint4*>(vb + (int64_t)(j0 + jj) * kstride + d);
            }
            *reinterpret_cast<uint4*>(&Ks[jj * PAD + d]) = kv4;
            *reinterpret_cast<uint4*>(&Vs[jj * PAD + d]) = vv4;
        }
        __syncthreads();
        // S = Q·Kᵀ for the warp's 16 rows x 64 keys: 8 n-tiles.
        float s[MMA_BK / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int p = 0; p < MMA_BK / 16; p++) {
                uint32_t t4[4];
                const int nr = p * 16 + (lane & 7) + (lane >> 4) * 8;
                const int kc = ks * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(t4, &Ks[nr * PAD + kc]);
                const uint32_t b0[2] = {t4[0], t4[1]}, b1[2] = {t4[2], t4[3]};
                mma16816<T>(s[2 * p], qf[ks], b0);
                mma16816<T>(s[2 * p + 1], qf[ks], b1);
            }
        // Scale, mask, online softmax. Element (n, e): row rows[e >> 1], key j0 + 8n + 2cq + (e & 1).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < MMA_BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + 8 * n + 2 * cq + (e & 1), r = e >> 1;
                const bool vis = rows[r] < Sq && att_visible(mask, b, Sq, Sk, rows[r], j, causal);
                s[n][e] = vis ? s[n][e] * scale : -INFINITY;
                mx[r] = fmaxf(mx[r], s[n][e]);
            }
        float corr[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mnew = fmaxf(m[r], mx[r]);
            base[r] = mnew == -INFINITY ? 0.f : mnew;  // nothing visible yet: every p and corr is 0
            corr[r] = expf(m[r] - base[r]);
            m[r] = mnew;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[n][e] *= corr[e >> 1];
        // P (dropped) as A fragments of the 4 k-steps over the tile's keys, then O += P·V.
#pragma unroll
        for (int kk = 0; kk < MMA_BK / 16; kk++) {
            float pv[2][4];
#pragma unroll
            for (int hn = 0; hn < 2; hn++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int n = 2 * kk + hn, r = e >> 1;
                    const int j = j0 + 8 * n + 2 * cq + (e & 1);
                    const float p = expf(s[n][e] - base[r]);
                    l[r] += p;
                    const float keep =
                        (threshold != 0 && rows[r] < Sq && j < Sk)
                            ? att_keep(threshold, drop_scale, seed, b, h, H, rows[r], Sq, j, Sk)
                            : 1.f;
                    pv[hn][e] = p * keep;
                }
            uint32_t af[4];
            af[0] = Vec2<T>::pack(pv[0][0], pv[0][1]);
            af[1] = Vec2<T>::pack(pv[0][2], pv[0][3]);
            af[2] = Vec2<T>::pack(pv[1][0], pv[1][1]);
            af[3] = Vec2<T>::pack(pv[1][2], pv[1][3]);
#pragma unroll
            for (int p = 0; p < D / 16; p++) {
                uint32_t t4[4];
                const int kr = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                const int nc = p * 16 + (lane >> 4) * 8;
                ldmatrix_x4_trans(t4, &Vs[kr * PAD + nc]);
                const uint32_t b0[2] = {t4[0], t4[1]}, b1[2] = {t4[2], t4[3]};
                mma16816<T>(o[2 * p], af, b0);
                mma16816<T>(o[2 * p + 1], af, b1);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = rows[r];
        if (i >= Sq) continue;
        const bool empty = l[r] == 0.f;  // l >= 1 once a key was visible (its max term is exp(0))
        const float inv = empty ? 0.f : 1.f / l[r];
        T* orow = out + ((int64_t)b * Sq + i) * qstride + (int64_t)h * D;
#pragma unroll
        for (int n = 0; n < NT; n++)
            *reinterpret_cast<uint32_t*>(orow + 8 * n + 2 * cq) =
                Vec2<T>::pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (cq == 0) lse[((int64_t)b * H + h) * Sq + i] = empty ? INFINITY : m[r] + logf(l[r]);
    }
}

#define ATTN_MMA(TN, T, D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        attn_fwd_mma_##TN##_d##D(const T* q, const T* k, const T* v, const uint8_t* mask, int has_mask, T* out,  \
                                 float* lse, int Sq, int Sk, int H, int KVH, int Dr, float scale, int causal,    \
                                 uint64_t threshold, float drop_scale, uint64_t seed) {                          \
        (void)Dr; /* == D; the host passes the SIMT kernel's argument list */                                    \
        attn_fwd_mma_impl<T, D>(q, k, v, mask, has_mask, out, lse, Sq, Sk, H, KVH, scale, causal, threshold,    \
                                drop_scale, seed);                                                               \
    }

ATTN_MMA(f16, f16, 32)
ATTN_MMA(f16, f16, 64)
ATTN_MMA(f16, f16, 128)
ATTN_MMA(bf16, bf16, 32)
ATTN_MMA(bf16, bf16, 64)
ATTN_MMA(bf16, bf16, 128)
