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
// Kernels (this file is the SIMT path: every dtype, head_dim <= 128; the host rejects larger heads):
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
// STATUS: this file has the SIMT path only. The tensor-core (mma.sync m16n8k16, ldmatrix) forward and
// backward for bf16/f16 are not written yet; f16/bf16 run here with f32 math.

#include "common.cuh"
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
