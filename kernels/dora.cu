// DoRA kernels: the row norm n_i = ‖W_i + s·(B·A)_i‖ without an out×in temporary, the column scale of
// the forward pass, the deterministic column reduction of the magnitude gradient, the full (non-detached)
// norm gradient and the merge. CPU twins and oracles: src/adapters/dora/cpu.rs (same names, same
// summation orders; every elementwise step uses __fmul_rn/__fadd_rn so nvcc cannot contract it into an
// FMA, which makes the twins bit-identical where the comment says so).
//
// The norm per training step (src/adapters/dora.rs):
//   ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·B_i·P_i + s²·B_i·G·B_iᵀ,  P = W·Aᵀ [out, r],  G = A·Aᵀ [r, r].
//   ‖W_i‖² is computed once (dora_q4_row_sq_norms below; W is frozen). Pᵀ = A·Wᵀ is one call of the
//   fused 4-bit GEMV of kernels/qmatmul.cu with the r rows of A as its "tokens": it streams the 4-bit W
//   once, exactly like a decode step. dora_norm_prep computes G = A·Aᵀ (and A in the GEMV's dtype)
//   before it, dora_norm_assemble turns (‖W‖², Pᵀ, B, G) into n after it: three launches per step.
//
// Napkin math (H200, 4.3 TB/s measured copy bandwidth), 8192×8192 NF4, r = 16:
//   W read by the GEMV: 37.7 MB → 8.8 µs floor. Pᵀ: 8192×16 f32 = 0.5 MB written, 0.5 MB read by the
//   assembly; B 0.5 MB; ‖W‖² 32 KB. Assembly: 8192 rows × (16 + 256) FMAs = 2.2 MFLOP, ≈ 1 MB moved:
//   well under 1 µs of traffic, so the norm step is one W read plus three small launches. PEFT instead
//   dequantizes W and materializes B·A (2 × 268 MB at bf16) every step: ≥ 0.8 GB, ≥ 190 µs.
#include "q4.cuh"

// Below this, n is treated as this value in divisions (torch.nn.functional.normalize's eps): a zero row
// gives a finite scale. Must equal NORM_EPS in src/adapters/dora.rs.
#define DORA_NORM_EPS 1e-12f

// ------------------------------------------------------------------------------------------------
// ‖W_i‖² of a 4-bit W, once per layer. One warp per row; lane l decodes the 8 consecutive elements
// [8l + 256k, 8l + 256k + 8) of the row, so a warp reads 128 consecutive bytes per step. General flat
// indexing: rows may start on an odd nibble (odd `in`) and blocks may straddle rows. Squares are
// accumulated in f64 (exact products of f32 values): the result is ‖W_i‖² correctly rounded to f32
// up to the f64 summation error.
//   Napkin: 8192² NF4 = 37.7 MB read once → ≥ 8.8 µs; 8 decodes + 8 DFMA per 8 weights, run once.

template <bool DQ>
__device__ void q4_row_sq_norms_impl(const uint8_t* data, const float* absmax, const uint8_t* codes,
                                     const float* nested, float offset, int nested_log2, const Lut16& lut,
                                     const Lut256& ncode, int bs_log2, float* __restrict__ out, int64_t rows,
                                     int64_t cols) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // no barrier follows
    Q4Reader<DQ> rd = Q4_READER(DQ);
    const int64_t f0 = row * cols;
    double acc = 0.0;
    for (int64_t j = 8 * (int64_t)lane; j < cols; j += 256) {
        const int64_t je = j + 8 < cols ? j + 8 : cols;
        for (int64_t jj = j; jj < je; jj++) {
            const double w = (double)rd.get(f0 + jj);
            acc += w * w;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row] = (float)acc;
}

#define ROW_SQ(DQ)                                                                                          \
    extern "C" __global__ void dora_q4_row_sq_norms_dq##DQ(Q4_PARAMS, float* out, int64_t rows, int64_t cols) { \
        q4_row_sq_norms_impl<DQ>(Q4_ARGS, out, rows, cols);                                                  \
    }
ROW_SQ(0)
ROW_SQ(1)

// ------------------------------------------------------------------------------------------------
// Before the GEMV: G = A·Aᵀ (f32 [r, r]) and, for a half-precision GEMV, A converted to T, in one
// launch. Block p handles the pair (k, l), k <= l (r(r+1)/2 blocks): a deterministic block reduction of
// A_k·A_l (f32, fixed tree), written to G[k, l] and G[l, k]; the diagonal blocks also write row k of A
// in T. Napkin (r = 16, in = 8192): 136 blocks each read 2 rows (64 KB) from L2 after the first touch
// of A (0.5 MB); ~1 µs, one launch instead of a cast plus a cuBLAS call.

template <typename T>
__device__ void norm_prep_impl(const float* __restrict__ a, float* __restrict__ gram, T* __restrict__ a_t, int r,
                               int64_t in) {
    __shared__ float scratch[32];
    int k = 0;
    int64_t rem = blockIdx.x;
    while (rem >= r - k) {
        rem -= r - k;
        k++;
    }
    const int l = k + (int)rem;
    const float* ak = a + (int64_t)k * in;
    const float* al = a + (int64_t)l * in;
    float acc = 0.f;
    for (int64_t j = threadIdx.x; j < in; j += blockDim.x) {
        const float v = ak[j];
        acc = fmaf(v, al[j], acc);
        if (a_t != nullptr && k == l) a_t[(int64_t)k * in + j] = from_f32<T>(v);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        gram[k * r + l] = acc;
        gram[l * r + k] = acc;
    }
}

#define NORM_PREP(TN, T)                                                                                   \
    extern "C" __global__ void dora_norm_prep_##TN(const float* a, float* gram, NULLABLE T* a_t, int r, int64_t in) { \
        norm_prep_impl<T>(a, gram, a_t, r, in);                                                            \
    }
NORM_PREP(f32, float)
NORM_PREP(f16, f16)
NORM_PREP(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// n_i from its parts. One thread per output row i (Pᵀ in the GEMV's dtype P):
//   bp  = Σ_k B[i,k]·Pᵀ[k,i]            (Pᵀ read coalesced across the warp: consecutive i)
//   bgb = Σ_k B[i,k]·(Σ_l G[k,l]·B[i,l]) (G is r×r, the same addresses for every thread: broadcast)
//   n²  = ‖W_i‖² + 2s·bp + s²·bgb, clamped at 0 (the expansion can cancel below zero when
//         B·A ≈ -W/s), n = sqrt(n²). NaN propagates (the clamp is a comparison, not fmaxf).
//   With m: scale_i = m_i / max(n_i, eps).
// Napkin: out·(r + r²) FMAs (r = 16: 2.2 MFLOP at 8192 rows), reads ‖W‖², Pᵀ and B once (≈ 1 MB).
// Every step is __fmul_rn/__fadd_rn in the CPU twin's order: bit-identical to it for P = f32.

template <typename P>
__device__ void norm_assemble_impl(const float* __restrict__ wsq, const P* __restrict__ pt,
                                   const float* __restrict__ b, const float* __restrict__ gram,
                                   const float* __restrict__ m, float* __restrict__ n_out,
                                   float* __restrict__ scale_out, float s, int64_t out, int r) {
    GRID_STRIDE(i, out) {
        const float* bi = b + i * r;
        float bp = 0.f, bgb = 0.f;
        for (int k = 0; k < r; k++) {
            const float bk = bi[k];
            bp = __fadd_rn(bp, __fmul_rn(bk, to_f32(pt[(int64_t)k * out + i])));
            float t = 0.f;
            for (int l = 0; l < r; l++) t = __fadd_rn(t, __fmul_rn(__ldg(gram + k * r + l), bi[l]));
            bgb = __fadd_rn(bgb, __fmul_rn(bk, t));
        }
        float n2 = __fadd_rn(__fadd_rn(wsq[i], __fmul_rn(__fmul_rn(2.f, s), bp)), __fmul_rn(__fmul_rn(s, s), bgb));
        if (n2 < 0.f) n2 = 0.f;
        const float n = sqrtf(n2);
        n_out[i] = n;
        if (m != nullptr) scale_out[i] = m[i] / (n < DORA_NORM_EPS ? DORA_NORM_EPS : n);
    }
}

#define NORM_ASSEMBLE(PN, P)                                                                                \
    extern "C" __global__ void dora_norm_assemble_##PN(const float* wsq, const P* pt, const float* b,        \
                                                       const float* gram, NULLABLE const float* m,          \
                                                       float* n_out, NULLABLE float* scale_out, float s,    \
                                                       int64_t out, int r) {                                \
        norm_assemble_impl<P>(wsq, pt, b, gram, m, n_out, scale_out, s, out, r);                            \
    }
NORM_ASSEMBLE(f32, float)
NORM_ASSEMBLE(f16, f16)
NORM_ASSEMBLE(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// y[t, j] = z[t, j]·c[j] (+ bias[j]) (+ add[t, j]), computed in f32 with one rounding to T per step.
// Forward without dropout: y = g ⊙ z + b. With dropout: y = (g - 1) ⊙ z_d + (W·x + b + lr).
// Also dy ⊙ (g - 1) in the dropout backward. Threads own a column (c[j], bias[j] in registers) and
// stride over rows: no division or modulo per element.
// Napkin: memory bound, (2 or 3)·sizeof(T) bytes per element; 4096 tokens × 4096 bf16 = 67-100 MB
// → 16-23 µs at 4.3 TB/s, about 10% of that token count's 4-bit GEMM (174 µs).

template <typename T>
__device__ void scale_cols_impl(const T* __restrict__ z, const float* __restrict__ c, const float* __restrict__ bias,
                                const T* __restrict__ add, T* __restrict__ y, int64_t rows, int64_t cols) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    const float cj = c[j];
    const float bj = bias != nullptr ? bias[j] : 0.f;
    for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
        const int64_t o = t * cols + j;
        float v = __fmul_rn(to_f32(z[o]), cj);
        if (bias != nullptr) v = __fadd_rn(v, bj);
        if (add != nullptr) v = __fadd_rn(v, to_f32(add[o]));
        y[o] = from_f32<T>(v);
    }
}

#define SCALE_COLS(TN, T)                                                                                    \
    extern "C" __global__ void dora_scale_cols_##TN(const T* z, const float* c, NULLABLE const float* bias,      \
                                                    NULLABLE const T* add, T* y, int64_t rows, int64_t cols) {  \
        scale_cols_impl<T>(z, c, bias, add, y, rows, cols);                                                   \
    }
SCALE_COLS(f32, float)
SCALE_COLS(f16, f16)
SCALE_COLS(bf16, bf16)

// ------------------------------------------------------------------------------------------------
// Backward of y = g ⊙ z_c (+ terms without g), in one pass over dy and z_c:
//   dm[j] = (Σ_t dy[t,j]·z_c[t,j]) / max(n_j, eps)   (the magnitude gradient, norm detached)
//   dz[t,j] = dy[t,j]·g[j]                            (in D: the dtype the next product needs)
// Deterministic without atomics: block (32, 8) owns 32 columns and all rows; thread (x, y) sums rows
// t ≡ y (mod 8) in order, then thread (x, 0) adds the 8 partial sums in order. The CPU twin uses the
// same order (bit-identical). f32 accumulation.
// Napkin: reads dy and z_c, writes dz: 3 × 2 B per element at bf16; 4096 × 4096 → 100 MB, 23 µs.
// 32 columns per block gives out/32 blocks (128 at out = 4096): enough to saturate HBM for T ≥ 512.

template <typename T, typename D>
__device__ void colsum_impl(const T* __restrict__ dy, const T* __restrict__ z, const float* __restrict__ g,
                            const float* __restrict__ n, float* __restrict__ dm, D* __restrict__ dz, int64_t rows,
                            int64_t cols) {
    __shared__ float part[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t j = (int64_t)blockIdx.x * 32 + tx;
    float acc = 0.f;
    if (j < cols) {
        const float gj = g[j];
        for (int64_t t = ty; t < rows; t += 8) {
            const int64_t o = t * cols + j;
            const float d = to_f32(dy[o]);
            acc = __fadd_rn(acc, __fmul_rn(d, to_f32(z[o])));
            if (dz != nullptr) dz[o] = from_f32<D>(__fmul_rn(d, gj));
        }
    }
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && j < cols) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) s = __fadd_rn(s, part[k][tx]);
        const float nj = n[j];
        dm[j] = s / (nj < DORA_NORM_EPS ? DORA_NORM_EPS : nj);
    }
}

#define COLSUM(TN, T, DN, D)                                                                                  \
    extern "C" __global__ void dora_colsum_##TN##_##DN(const T* dy, const T* z, const float* g, const float* n, \
                                                       float* dm, NULLABLE D* dz, int64_t rows, int64_t cols) { \
        colsum_impl<T, D>(dy, z, g, n, dm, dz, rows, cols);                                                    \
    }
COLSUM(f32, float, f32, float)
COLSUM(f16, f16, f16, f16)
COLSUM(f16, f16, f32, float)
COLSUM(bf16, bf16, bf16, bf16)
COLSUM(bf16, bf16, f32, float)

// ------------------------------------------------------------------------------------------------
// Full (non-detached) norm gradient, the per-row part. With S_j = Σ_t dy·z_c, dn = -m·S/n², the chain
// through n_i = ‖W_i + s·B_i·A‖ gives, with c_i = dn_i / n_i = -g_i·dm_i / n_i:
//   ∂L/∂B[i,k] += s·c_i·(P[i,k] + s·(B_i·G)_k)        → dbx [out, r]
//   ∂L/∂A      += s·(Cᵀ·W + s·(Cᵀ·B)·A), C = c ⊙ B    → here only Cᵀ [r, out] (coalesced writes);
//   Cᵀ·W is dora_q4_tgemv below (4-bit W) or a GEMM (dense W), the rest are r-sized GEMMs.
// One thread per row; out·r² FMAs. Bit-identical to the CPU twin.

extern "C" __global__ void dora_full_norm_grad(const float* __restrict__ dm, const float* __restrict__ g,
                                               const float* __restrict__ n, const float* __restrict__ b,
                                               const float* __restrict__ pt, const float* __restrict__ gram,
                                               float* __restrict__ dbx, float* __restrict__ ct, float s,
                                               int64_t out, int r) {
    GRID_STRIDE(i, out) {
        const float ni = n[i];
        const float c = -(__fmul_rn(g[i], dm[i]) / (ni < DORA_NORM_EPS ? DORA_NORM_EPS : ni));
        const float* bi = b + i * r;
        const float sc = __fmul_rn(s, c);
        for (int k = 0; k < r; k++) {
            float t = 0.f;
            for (int l = 0; l < r; l++) t = __fadd_rn(t, __fmul_rn(bi[l], __ldg(gram + l * r + k)));
            dbx[i * r + k] = __fmul_rn(sc, __fadd_rn(pt[(int64_t)k * out + i], __fmul_rn(s, t)));
            ct[(int64_t)k * out + i] = __fmul_rn(c, bi[k]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Cᵀ·W for a 4-bit W: out_[k, j] = Σ_i ct[k, i]·W[i, j] for k < r_chunk ≤ 16 (a "backward GEMV" with
// the r rows of Cᵀ as tokens), f32 throughout, any shape (general flat-index decode).
// Grid (ceil(in / 256), groups): thread j owns one column, block y owns a contiguous range of rows and
// writes its partial sums to ws[y, k, j]; dora_tgemv_reduce adds the groups in order (deterministic,
// no atomics). Cᵀ is staged 32 rows at a time in shared memory (a broadcast read per FMA).
// Napkin (8192², r = 16): 37.7 MB of W read once (8.8 µs floor) + 16 FMAs per decoded weight
// (2.1 GFLOP of FP32 FMA: ≈ 32 µs at 67 TFLOP/s) — FMA-bound, run only with full_norm_gradient.
// ws: groups·16·in f32 (≤ 8 MB at in = 8192), not an out×in temporary.

template <bool DQ>
__device__ void q4_tgemv_impl(const uint8_t* data, const float* absmax, const uint8_t* codes, const float* nested,
                              float offset, int nested_log2, const Lut16& lut, const Lut256& ncode, int bs_log2,
                              const float* __restrict__ ct, float* __restrict__ ws, int64_t out, int64_t in, int r,
                              int64_t rows_per_group) {
    __shared__ float s_lut[16];
    __shared__ float s_ncode[DQ ? 256 : 1];
    __shared__ float s_c[16][32];
    load_luts<DQ>(s_lut, s_ncode, lut, ncode);
    Q4Reader<DQ> rd = Q4_READER(DQ);
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t i0 = (int64_t)blockIdx.y * rows_per_group;
    const int64_t i1 = i0 + rows_per_group < out ? i0 + rows_per_group : out;
    float acc[16];
#pragma unroll
    for (int k = 0; k < 16; k++) acc[k] = 0.f;
    // The trip count depends only on the block, so every thread reaches the same barriers.
    for (int64_t ib = i0; ib < i1; ib += 32) {
        __syncthreads();
        for (int e = threadIdx.x; e < 16 * 32; e += blockDim.x) {
            const int k = e >> 5, t = e & 31;
            s_c[k][t] = (k < r && ib + t < i1) ? ct[(int64_t)k * out + ib + t] : 0.f;
        }
        __syncthreads();
        if (j < in) {
            const int nrow = (int)(i1 - ib < 32 ? i1 - ib : 32);
            for (int t = 0; t < nrow; t++) {
                const float w = rd.get((ib + t) * in + j);
#pragma unroll
                for (int k = 0; k < 16; k++) acc[k] = fmaf(s_c[k][t], w, acc[k]);
            }
        }
    }
    // Unrolled with a predicate: a runtime index into acc[] would move it to local memory.
    if (j < in) {
#pragma unroll
        for (int k = 0; k < 16; k++)
            if (k < r) ws[((int64_t)blockIdx.y * r + k) * in + j] = acc[k];
    }
}

#define TGEMV(DQ)                                                                                             \
    extern "C" __global__ void dora_q4_tgemv_dq##DQ(Q4_PARAMS, const float* ct, float* ws, int64_t out,       \
                                                    int64_t in, int r, int64_t rows_per_group) {              \
        q4_tgemv_impl<DQ>(Q4_ARGS, ct, ws, out, in, r, rows_per_group);                                       \
    }
TGEMV(0)
TGEMV(1)

// y[k0 + k, j] = Σ_g ws[g, k, j] for k < r, j < in, groups added in order. y is [r_total, in].
extern "C" __global__ void dora_tgemv_reduce(const float* __restrict__ ws, float* __restrict__ y, int64_t groups,
                                             int64_t r, int64_t in, int64_t k0) {
    GRID_STRIDE(e, r * in) {
        float s = 0.f;
        for (int64_t g = 0; g < groups; g++) s = __fadd_rn(s, ws[g * r * in + e]);
        y[k0 * in + e] = s;
    }
}

// ------------------------------------------------------------------------------------------------
// Merge and unmerge on a dense f32 [rows, cols] weight, per-row factor f (= m / n):
//   mode 0 (merge):   y = f_i·(w + d)        mode 1 (unmerge): y = w / f_i - d
// Memory bound: 12 B per element (8192² → 0.8 GB, 0.19 ms); runs once per merge.
extern "C" __global__ void dora_merge_rows(const float* __restrict__ w, const float* __restrict__ d,
                                           const float* __restrict__ f, float* __restrict__ y, int64_t rows,
                                           int64_t cols, int mode) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
        const int64_t o = i * cols + j;
        const float fi = f[i];
        y[o] = mode == 0 ? __fmul_rn(fi, __fadd_rn(w[o], d[o])) : __fadd_rn(w[o] / fi, -d[o]);
    }
}

// g_i = m_i / max(n_i, eps) (the DoRA scale from a cached norm: eval cache and unmerge).
extern "C" __global__ void dora_scale_of(const float* __restrict__ m, const float* __restrict__ n,
                                         float* __restrict__ g, int64_t out) {
    GRID_STRIDE(i, out) {
        const float ni = n[i];
        g[i] = m[i] / (ni < DORA_NORM_EPS ? DORA_NORM_EPS : ni);
    }
}

// y[i, j] = x[i, j]·f[i] on small [out, r] matrices: the backward pass scales B and dyᵀ·u by g instead
// of materializing dz = dy ⊙ g (tokens·out) when no dx is needed.
extern "C" __global__ void dora_scale_rows(const float* __restrict__ x, const float* __restrict__ f,
                                           float* __restrict__ y, int64_t rows, int64_t cols) {
    GRID_STRIDE(e, rows * cols) y[e] = __fmul_rn(x[e], f[e / cols]);
}
