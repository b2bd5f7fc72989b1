// Autograd kernels (src/autograd/): activations and their backward, MSE and cross-entropy forward and
// backward, and the sum of squares behind the gradient norm. The CPU twins live in
// src/autograd/cpu.rs with the same f32 formulas and one rounding per output element.
//
// Napkin math (H200, ~4.3 TB/s copy bandwidth). Everything here is memory bound:
//   activation fwd  : read x, write y        = 2*sizeof(T) B/elem -> 16M bf16 elems = 64 MB  ~ 15 us
//   activation bwd  : read x, dy, write dx   = 3*sizeof(T) B/elem -> 16M bf16 elems = 96 MB  ~ 22 us
//   GELU-erf is the heaviest at ~25 FLOP/elem (erff and expf included): ~6 FLOP/B in bf16, under the
//   ~16 FLOP/B ridge of f32 CUDA cores (67 TFLOP/s / 4.3 TB/s), so still memory bound.
//   mse fwd         : read p, t (2*sizeof(T) B/elem) into <=1024 partial sums, then one tiny block.
//   cross-entropy   : one block per row. fwd reads the row once (online max + sum of exp), writes 12 B
//                     per row (loss, max, log-sum). bwd reads the row once and writes it once. A 4096 x 32000
//                     bf16 logits matrix is 262 MB -> ~61 us per pass.
//   grad norm       : read each f32 gradient once (4 B/elem) into per-block partials; one final block.
// Reductions are deterministic: fixed grids, fixed partial order, double accumulation in the final
// block. No atomics.
#include "common.cuh"

// Activation ids (match the Rust enum order in src/autograd/ops.rs).
#define ACT_RELU 0
#define ACT_GELU_TANH 1
#define ACT_GELU_ERF 2
#define ACT_SILU 3
#define ACT_TANH 4

// Same constants as the CPU twin: kBeta = sqrt(2/pi), kKappa = 0.044715, 1/sqrt(2*pi).
#define GELU_BETA 0.7978845608028654f
#define GELU_KAPPA 0.044715f
#define INV_SQRT_2PI 0.3989422804014327f
#define INV_SQRT_2 0.7071067811865476f

template <int A>
__device__ __forceinline__ float act_forward(float x) {
    if (A == ACT_RELU) return x < 0.f ? 0.f : x;  // NaN propagates like torch.relu
    if (A == ACT_GELU_TANH) {
        const float inner = GELU_BETA * (x + GELU_KAPPA * x * x * x);
        return 0.5f * x * (1.f + tanhf(inner));
    }
    if (A == ACT_GELU_ERF) return 0.5f * x * (1.f + erff(x * INV_SQRT_2));
    if (A == ACT_TANH) return tanhf(x);
    return x / (1.f + expf(-x));  // silu
}

template <int A>
__device__ __forceinline__ float act_derivative(float x) {
    if (A == ACT_RELU) return x <= 0.f ? 0.f : 1.f;
    if (A == ACT_GELU_TANH) {
        const float x2 = x * x;
        const float t = tanhf(GELU_BETA * (x + GELU_KAPPA * x2 * x));
        const float d_inner = GELU_BETA * (1.f + 3.f * GELU_KAPPA * x2);
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * d_inner;
    }
    if (A == ACT_GELU_ERF) {
        const float cdf = 0.5f * (1.f + erff(x * INV_SQRT_2));
        const float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
        return cdf + x * pdf;
    }
    if (A == ACT_TANH) {
        const float t = tanhf(x);
        return 1.f - t * t;
    }
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
}

template <int A, typename T>
__device__ __forceinline__ void act_fwd_impl(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
    GRID_STRIDE(i, n) y[i] = from_f32<T>(act_forward<A>(to_f32(x[i])));
}

template <int A, typename T>
__device__ __forceinline__ void act_bwd_impl(const T* __restrict__ x, const T* __restrict__ dy,
                                             T* __restrict__ dx, int64_t n) {
    GRID_STRIDE(i, n) {
        const float d = act_derivative<A>(to_f32(x[i]));
        // A zero derivative gives exactly zero, even for an infinite dy (same as the CPU twin).
        dx[i] = from_f32<T>(d == 0.f ? 0.f : to_f32(dy[i]) * d);
    }
}

#define ACT(NAME, A, TN, T)                                                                            \
    extern "C" __global__ void act_fwd_##NAME##_##TN(const T* x, T* y, int64_t n) {                   \
        act_fwd_impl<A, T>(x, y, n);                                                                   \
    }                                                                                                  \
    extern "C" __global__ void act_bwd_##NAME##_##TN(const T* x, const T* dy, T* dx, int64_t n) {     \
        act_bwd_impl<A, T>(x, dy, dx, n);                                                              \
    }
#define ACT_ALL(TN, T)                    \
    ACT(relu, ACT_RELU, TN, T)            \
    ACT(gelu, ACT_GELU_TANH, TN, T)       \
    ACT(gelu_erf, ACT_GELU_ERF, TN, T)    \
    ACT(silu, ACT_SILU, TN, T)            \
    ACT(tanh, ACT_TANH, TN, T)
ACT_ALL(f32, float)
ACT_ALL(f16, f16)
ACT_ALL(bf16, bf16)

// ------------------------------------------------------------------------------------------ reductions

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block in double; thread 0 gets the result. `scratch` holds >= 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.0;
    if (warp == 0) v = warp_sum_d(v);
    return v;
}

// Stage 1 of a deterministic sum: block b writes partials[b] = sum of (a-b)^2 (MSE) or a^2 (norm) over
// its grid-stride slice. Per-thread f32 accumulation covers n / (grid*256) elements (64 for 16M with
// 1024 blocks), so its error is tiny next to the f32 result.
template <typename T, bool DIFF>
__device__ __forceinline__ void sumsq_partial_impl(const T* __restrict__ a, const T* __restrict__ b,
                                                   float* __restrict__ partials, int64_t n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    GRID_STRIDE(i, n) {
        const float d = DIFF ? to_f32(a[i]) - to_f32(b[i]) : to_f32(a[i]);
        acc += d * d;
    }
    acc = block_sum(acc, scratch);  // every thread reaches this: no early return above
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

#define MSE_PARTIAL(TN, T)                                                                             \
    extern "C" __global__ void mse_partial_##TN(const T* p, const T* t, float* partials, int64_t n) { \
        sumsq_partial_impl<T, true>(p, t, partials, n);                                                \
    }
MSE_PARTIAL(f32, float)
MSE_PARTIAL(f16, f16)
MSE_PARTIAL(bf16, bf16)

extern "C" __global__ void sumsq_partial_f32(const float* x, float* partials, int64_t n) {
    sumsq_partial_impl<float, false>(x, x, partials, n);
}

// Stage 2: one block sums `count` partials in double, in a fixed order, and writes scale * sum.
extern "C" __global__ void finalize_sum(const float* __restrict__ partials, int64_t count, float scale,
                                        float* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += (double)partials[i];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[0] = (float)(acc * (double)scale);
}

// ------------------------------------------------------------------------------------------ MSE backward

// dp = (2/n) * g * (p - t), with g the upstream gradient of the scalar loss, read on the device so the
// backward pass never waits for the host.
template <typename T>
__device__ __forceinline__ void mse_bwd_impl(const T* __restrict__ p, const T* __restrict__ t,
                                             const float* __restrict__ g, float two_over_n,
                                             T* __restrict__ dp, int64_t n) {
    const float scale = two_over_n * g[0];
    GRID_STRIDE(i, n) dp[i] = from_f32<T>(scale * (to_f32(p[i]) - to_f32(t[i])));
}
#define MSE_BWD(TN, T)                                                                                 \
    extern "C" __global__ void mse_bwd_##TN(const T* p, const T* t, const float* g, float two_over_n, \
                                            T* dp, int64_t n) {                                        \
        mse_bwd_impl<T>(p, t, g, two_over_n, dp, n);                                                   \
    }
MSE_BWD(f32, float)
MSE_BWD(f16, f16)
MSE_BWD(bf16, bf16)

// ------------------------------------------------------------------------------------------ cross-entropy

// Online log-sum-exp state (m = running max, s = sum of exp(x - m)) over finite and -inf logits only
// (ce_fwd_impl flags NaN and +inf separately). -inf entries contribute nothing; the guards keep
// exp(-inf - -inf) = exp(NaN) out of rows that start with -inf logits.
__device__ __forceinline__ void lse_combine(float& m, float& s, float om, float os) {
    const float M = fmaxf(m, om);
    const float a = (m == -INFINITY) ? 0.f : s * expf(m - M);
    const float b = (om == -INFINITY) ? 0.f : os * expf(om - M);
    m = M;
    s = a + b;
}

// One block per row of logits [N, C] (blockDim.x = 256, a multiple of 32). A negative target marks
// an ignored row (loss 0). Reads the row once:
// each thread keeps an online (max, sum), warps combine by shuffles, warp 0 combines the 8 warps.
// Writes stats[row] = (m, ls = log sum exp(x - m)) for the backward pass and
// row_loss[row] = (m - x[target]) + ls: subtracting logits first keeps large logits accurate (an f32
// lse = m + ls would carry an error of ulp(m)).
template <typename T>
__device__ __forceinline__ void ce_fwd_impl(const T* __restrict__ logits, const int32_t* __restrict__ targets,
                                            float* __restrict__ row_loss, float* __restrict__ stats,
                                            int64_t C) {
    __shared__ float sm[32], ss[32];
    const int64_t row = blockIdx.x;
    const int32_t t = targets[row];
    if (t < 0) {  // ignored row (the whole block leaves together, before any barrier)
        if (threadIdx.x == 0) {
            row_loss[row] = 0.f;
            stats[2 * row] = 0.f;
            stats[2 * row + 1] = 0.f;
        }
        return;
    }
    const T* x = logits + row * C;
    float m = -INFINITY, s = 0.f;
    // A NaN or +inf logit makes the whole row NaN in torch (log_softmax computes x - max, and
    // inf - inf is NaN). Such values are flagged here and kept out of the online state, so neither a
    // reset of s nor lse_combine can drop them; the flag is OR-ed over the block below.
    int bad = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const float v = to_f32(x[j]);
        if (isnan(v) || v == INFINITY) {
            bad = 1;
            continue;
        }
        if (v == -INFINITY) continue;
        if (v > m) {
            s = (m == -INFINITY ? 0.f : s * expf(m - v)) + 1.f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    bad = __syncthreads_or(bad);  // every thread of the block reaches this (ignored rows left above)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, s, o);
        lse_combine(m, s, om, os);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm[lane] : -INFINITY;
        s = lane < nwarps ? ss[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, m, o);
            const float os = __shfl_xor_sync(0xffffffffu, s, o);
            lse_combine(m, s, om, os);
        }
        if (lane == 0) {
            // All -inf row: shift 0, s = 0, ls = -inf, loss NaN. A NaN or +inf logit: shift and ls NaN,
            // so the loss and every gradient of the row are NaN. Both as torch and the CPU twin.
            const float shift = bad ? NAN : (m == -INFINITY) ? 0.f : m;
            const float ls = bad ? NAN : logf(s);
            stats[2 * row] = shift;
            stats[2 * row + 1] = ls;
            row_loss[row] = (shift - to_f32(x[t])) + ls;
        }
    }
}

// dlogits[row, j] = (g / count) * (exp((x - m) - ls) - [j == target]), zeros for an ignored row
// (negative target). One block per row, one read and one write of the row.
template <typename T>
__device__ __forceinline__ void ce_bwd_impl(const T* __restrict__ logits, const int32_t* __restrict__ targets,
                                            const float* __restrict__ stats, const float* __restrict__ g,
                                            float inv_n, T* __restrict__ dx, int64_t C) {
    const int64_t row = blockIdx.x;
    const float scale = g[0] * inv_n, m = stats[2 * row], ls = stats[2 * row + 1];
    const int64_t t = targets[row];
    const T* x = logits + row * C;
    T* d = dx + row * C;
    if (t < 0) {
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) d[j] = from_f32<T>(0.f);
        return;
    }
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const float p = expf((to_f32(x[j]) - m) - ls);
        d[j] = from_f32<T>(scale * (p - (j == t ? 1.f : 0.f)));
    }
}

#define CE(TN, T)                                                                                      \
    extern "C" __global__ void ce_fwd_##TN(const T* logits, const int32_t* targets, float* row_loss,  \
                                           float* stats, int64_t C) {                                  \
        ce_fwd_impl<T>(logits, targets, row_loss, stats, C);                                           \
    }                                                                                                  \
    extern "C" __global__ void ce_bwd_##TN(const T* logits, const int32_t* targets,                   \
                                           const float* stats, const float* g, float inv_n, T* dx,     \
                                           int64_t C) {                                                \
        ce_bwd_impl<T>(logits, targets, stats, g, inv_n, dx, C);                                       \
    }
CE(f32, float)
CE(f16, f16)
CE(bf16, bf16)
