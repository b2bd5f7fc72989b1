// WaveFT sparse adapter kernels (src/adapters/waveft/cuda.rs; CPU oracle in src/adapters/waveft/cpu.rs).
//
// ΔW = scaling · S·spectrum is never formed densely. Per layer a fixed structure (built on the host, see
// src/adapters/waveft/structure.rs) lists the nnz distinct nonzero positions of ΔW (CSR by row, plus a
// column view) and the synthesis map S (by position and by coefficient, ≤ 4 entries per coefficient for
// db1, F² for an F-tap wavelet).
//
// Kernels per training step (T tokens, nnz positions, n coefficients):
//   waveft_synth      v[p] = scaling · Σ w·spectrum[coef]            O(entries), one thread per position
//   waveft_spmm_<T>   y[t, r] (+)= Σ_p v[p] · x[t, idx[p]]            forward (CSR by row) and dx (by column)
//   waveft_sddmm_<T>  G[p] = Σ_t dyᵀ[row_p, t] · xᵀ[col_p, t]          one warp per position, coalesced
//   waveft_analysis   dspectrum[k] = scaling · Σ w · G[pos]           one thread per coefficient
//
// Napkin math (4096x4096, T = 512, n = 5000 db1, nnz ≈ 20k) on an H200 (4.3 TB/s, 50 MB L2):
// - spmm: 2·T·nnz = 20 MFLOP; bytes: y written once (8 MB f32), x rows (16 KB each) gathered from L1/L2
//   (x is 8 MB, L2-resident) → ~2-4 µs of DRAM traffic, latency bound in practice (~10 µs).
// - sddmm: needs xᵀ and dyᵀ (two transposes, 4 x 8 MB moved, ~8 µs), then nnz·2·T·4 B = 80 MB of
//   L2 reads (each xᵀ/dyᵀ row is reused ~5x), ~10 µs.
// - A dense PEFT step instead does two 4096² GEMMs per pass (137 GFLOP·2 at T = 4096) plus the dense
//   IDWT, which is why PEFT's WaveFT trains 2.24x slower than LoRA.
// No atomics anywhere: every output element has exactly one writer, so results are deterministic.
#include "common.cuh"

// ---------------------------------------------------------------- synthesis / analysis

__device__ __forceinline__ float synth_one(const float* __restrict__ spectrum, const int* __restrict__ syn_ptr,
                                           const int* __restrict__ syn_coef, const float* __restrict__ syn_w,
                                           int p) {
    float acc = 0.f;
    for (int e = syn_ptr[p]; e < syn_ptr[p + 1]; ++e) acc += syn_w[e] * spectrum[syn_coef[e]];
    return acc;
}

// v_row[q] = value of position q (row-major order), v_col[q] = value of position col_perm[q] (column
// order, for dx). Grid-stride over nnz.
extern "C" __global__ void waveft_synth(const float* __restrict__ spectrum, const int* __restrict__ syn_ptr,
                                        const int* __restrict__ syn_coef, const float* __restrict__ syn_w,
                                        const int* __restrict__ col_perm, float scaling, float* __restrict__ v_row,
                                        float* __restrict__ v_col, int64_t nnz) {
    GRID_STRIDE(q, nnz) {
        v_row[q] = scaling * synth_one(spectrum, syn_ptr, syn_coef, syn_w, (int)q);
        v_col[q] = scaling * synth_one(spectrum, syn_ptr, syn_coef, syn_w, col_perm[q]);
    }
}

// dspectrum[k] = scaling · Σ_{e in ana_ptr[k]..ana_ptr[k+1]} ana_w[e] · g[ana_pos[e]]. Grid-stride over n.
extern "C" __global__ void waveft_analysis(const float* __restrict__ g, const int* __restrict__ ana_ptr,
                                           const int* __restrict__ ana_pos, const float* __restrict__ ana_w,
                                           float scaling, float* __restrict__ dspectrum, int64_t n) {
    GRID_STRIDE(k, n) {
        float acc = 0.f;
        for (int e = ana_ptr[k]; e < ana_ptr[k + 1]; ++e) acc += ana_w[e] * g[ana_pos[e]];
        dspectrum[k] = scaling * acc;
    }
}

// ---------------------------------------------------------------- SpMM: y[t, r] (+)= Σ_p v[p] x[t, idx[p]]

// Block: 128 threads = 128 consecutive output columns r (coalesced writes of y's row t). Grid:
// (ceil(n_dim / 128), min(ceil(tokens / SPMM_TOK), 65535)); each block walks its token groups with a
// grid stride. A thread keeps its row's CSR range and rereads idx/vals per token from L1.
// x: [tokens, k_dim], y: [tokens, n_dim], both row-major; ptr: [n_dim + 1]; idx/vals: [nnz].
#define SPMM_TOK 8
template <typename T>
__device__ void spmm_impl(const T* __restrict__ x, int64_t tokens, int64_t k_dim, const int* __restrict__ ptr,
                          const int* __restrict__ idx, const float* __restrict__ vals, T* __restrict__ y,
                          int64_t n_dim, int accumulate) {
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n_dim) return;
    const int p0 = ptr[r], p1 = ptr[r + 1];
    for (int64_t t0 = (int64_t)blockIdx.y * SPMM_TOK; t0 < tokens; t0 += (int64_t)gridDim.y * SPMM_TOK) {
        const int64_t t1 = t0 + SPMM_TOK < tokens ? t0 + SPMM_TOK : tokens;
        for (int64_t t = t0; t < t1; ++t) {
            const T* xr = x + t * k_dim;
            float acc = 0.f;
            for (int p = p0; p < p1; ++p) acc += vals[p] * to_f32(xr[idx[p]]);
            T* yo = y + t * n_dim + r;
            *yo = from_f32<T>(accumulate ? to_f32(*yo) + acc : acc);
        }
    }
}

// ---------------------------------------------------------------- SDDMM: G[p] = <dyᵀ[row_p], xᵀ[col_p]>

// One warp per position (grid-stride over warps); lanes stride the token axis of the transposed
// operands, so loads are coalesced; a shuffle tree reduces. dyT: [out, tokens], xT: [in, tokens].
template <typename T>
__device__ void sddmm_impl(const T* __restrict__ dyT, const T* __restrict__ xT, int64_t tokens,
                           const int* __restrict__ pos_row, const int* __restrict__ pos_col, int64_t nnz,
                           float* __restrict__ g) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t p = warp; p < nnz; p += nwarps) {  // uniform per warp: the shuffles see all 32 lanes
        const T* a = dyT + (int64_t)pos_row[p] * tokens;
        const T* b = xT + (int64_t)pos_col[p] * tokens;
        float acc = 0.f;
        for (int64_t t = lane; t < tokens; t += 32) acc += to_f32(a[t]) * to_f32(b[t]);
        acc = warp_sum(acc);
        if (lane == 0) g[p] = acc;
    }
}

#define WAVEFT_TYPED(TN, T)                                                                                 \
    extern "C" __global__ void waveft_spmm_##TN(const T* x, int64_t tokens, int64_t k_dim, const int* ptr,  \
                                                const int* idx, const float* vals, T* y, int64_t n_dim,     \
                                                int accumulate) {                                           \
        spmm_impl<T>(x, tokens, k_dim, ptr, idx, vals, y, n_dim, accumulate);                               \
    }                                                                                                       \
    extern "C" __global__ void waveft_sddmm_##TN(const T* dyT, const T* xT, int64_t tokens, const int* pos_row, \
                                                 const int* pos_col, int64_t nnz, float* g) {               \
        sddmm_impl<T>(dyT, xT, tokens, pos_row, pos_col, nnz, g);                                           \
    }
WAVEFT_TYPED(f32, float)
WAVEFT_TYPED(f16, f16)
WAVEFT_TYPED(bf16, bf16)
