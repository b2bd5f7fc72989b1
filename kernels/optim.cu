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

// Threads tid, tid + stride, ... of the launch update [0, n) of one tensor.
template <typename T>
__device__ __forceinline__ void adamw_span(T* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, int64_t n, const AdamWScalars& s, int64_t tid,
                                           int64_t stride) {
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

template <typename T>
__device__ __forceinline__ void adamw_impl(T* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                           float* __restrict__ v, int64_t n, const AdamWScalars s) {
    adamw_span<T>(p, g, m, v, n, s, (int64_t)blockIdx.x * blockDim.x + threadIdx.x, (int64_t)gridDim.x * blockDim.x);
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

// ---------------------------------------------------------------------------------------------------
// bitsandbytes' Adam (AdamW8bit): csrc/kernels.cu `kOptimizer32bit2State` (ADAM, f32 state, tensors
// below min_8bit_size) and `kOptimizerStatic8bit2StateBlockwise` (ADAM, blocksize 256), with IEEE
// intrinsics in the kernels' operation order so that results equal the CPU twin (src/optim/cpu.rs)
// bit for bit. bitsandbytes itself uses __fdividef/__powf and lets nvcc contract into FMAs, so it
// differs from both in the last bits.
//
// Napkin math, 8-bit state, f32 parameter: read p, g (8 B) + 2 codes (2 B), write p + 2 codes (6 B)
// = 16 B per element vs 28 B for f32 state: the 8-bit step is ~1.75x cheaper in DRAM traffic; the two
// 8-step searches through the 256-entry maps run from shared memory (~16 dependent LDS + compares per
// element, hidden by the memory stream at 256 threads x several blocks per SM).

#define NEG_FLT_MAX (-3.40282347e+38f)

struct BnbScalars {
    float beta1, w1, beta2, w2;
    float step_size;  // -lr * c2 / c1
    float eps_c2;     // c2 * eps
    float decay;      // 1 - lr * wd
    int weight_decay; // wd > 0
};

__device__ __forceinline__ float bnb_param(float p, float m, float v, const BnbScalars& s) {
    p = __fadd_rn(p, __fmul_rn(s.step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), s.eps_c2))));
    return s.weight_decay ? __fmul_rn(p, s.decay) : p;
}

// Threads tid, tid + stride, ... of the launch update [0, n) of one tensor.
template <typename T>
__device__ __forceinline__ void adam_bnb32_span(T* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                                float* __restrict__ v, int64_t n, const BnbScalars& s, int64_t tid,
                                                int64_t stride) {
    for (int64_t i = tid; i < n; i += stride) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], s.beta1), __fmul_rn(s.w1, gi));
        const float vi = __fadd_rn(__fmul_rn(v[i], s.beta2), __fmul_rn(s.w2, __fmul_rn(gi, gi)));
        p[i] = from_f32<T>(bnb_param(to_f32(p[i]), mi, vi, s));
        m[i] = mi;
        v[i] = vi;
    }
}

template <typename T>
__device__ __forceinline__ void adam_bnb32_impl(T* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                                float* __restrict__ v, int64_t n, const BnbScalars s) {
    adam_bnb32_span<T>(p, g, m, v, n, s, (int64_t)blockIdx.x * blockDim.x + threadIdx.x,
                       (int64_t)gridDim.x * blockDim.x);
}

// One thread block of 256 threads per quantization block of 256 elements (grid-stride over blocks).
// A block is [base, base + 256) of one tensor; `absmax` index b. Max over |state| with a warp shuffle
// reduction and one shared-memory step across the 8 warps (max is exact in any order).
template <typename T>
__device__ __forceinline__ void adam8bit_block(T* __restrict__ p, const float* __restrict__ g,
                                               unsigned char* __restrict__ cm, unsigned char* __restrict__ cv,
                                               float* __restrict__ am, float* __restrict__ av, int64_t n, int64_t b,
                                               const BnbScalars& s, const float* code_m, const float* code_v,
                                               float* red /* 16 floats of shared memory */) {
    const int64_t i = b * 256 + threadIdx.x;
    const bool valid = i < n;
    float m = 0.f, v = 0.f, gi = 0.f;
    if (valid) {
        gi = g[i];
        const float gz = isfinite(gi) ? gi : 0.f;
        float vv = __fmul_rn(code_v[cv[i]], av[b]);
        vv = __fadd_rn(__fmul_rn(vv, s.beta2), __fmul_rn(__fmul_rn(s.w2, gz), gz));
        float mm = __fmul_rn(code_m[cm[i]], am[b]);
        mm = __fadd_rn(__fmul_rn(mm, s.beta1), __fmul_rn(s.w1, gz));
        m = isfinite(gi) ? mm : 0.f;
        v = isfinite(gi) ? vv : 0.f;
    }
    float mx_m = warp_max(valid ? fabsf(m) : NEG_FLT_MAX);
    float mx_v = warp_max(valid ? fabsf(v) : NEG_FLT_MAX);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // every thread has read am[b] / av[b] and the previous use of `red` is over
    if (lane == 0) {
        red[warp] = mx_m;
        red[8 + warp] = mx_v;
    }
    __syncthreads();
    mx_m = red[0];
    mx_v = red[8];
#pragma unroll
    for (int w = 1; w < 8; w++) {
        mx_m = fmaxf(mx_m, red[w]);
        mx_v = fmaxf(mx_v, red[8 + w]);
    }
    if (valid) {
        if (isfinite(gi)) p[i] = from_f32<T>(bnb_param(to_f32(p[i]), m, v, s));
        unsigned char c = quantize_8bit(code_m, __fdiv_rn(m, mx_m));
        // bitsandbytes keeps m's sign: step one code towards m when the nearest code's sign bit differs.
        if (signbit(code_m[c]) != signbit(m)) c = (unsigned char)(m > 0.0f ? c + 1 : c - 1);
        cm[i] = c;
        cv[i] = quantize_8bit(code_v, __fdiv_rn(v, mx_v));
    }
    if (threadIdx.x == 0) {
        am[b] = mx_m;
        av[b] = mx_v;
    }
}

template <typename T>
__device__ __forceinline__ void adam8bit_impl(T* p, const float* g, unsigned char* cm, unsigned char* cv, float* am,
                                              float* av, int64_t n, const BnbScalars s, const float* code_m_g,
                                              const float* code_v_g) {
    __shared__ float code_m[256], code_v[256], red[16];
    code_m[threadIdx.x] = code_m_g[threadIdx.x];
    code_v[threadIdx.x] = code_v_g[threadIdx.x];
    __syncthreads();
    const int64_t nblocks = (n + 255) / 256;
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x)
        adam8bit_block<T>(p, g, cm, cv, am, av, n, b, s, code_m, code_v, red);
}

#define BNB_ARGS float beta1, float w1, float beta2, float w2, float step_size, float eps_c2, float decay, int weight_decay
#define BNB_SCALARS {beta1, w1, beta2, w2, step_size, eps_c2, decay, weight_decay}

#define ADAM_BNB(TN, T)                                                                                         \
    extern "C" __global__ void adam_bnb32_##TN(T* p, const float* g, float* m, float* v, int64_t n, BNB_ARGS) { \
        const BnbScalars s = BNB_SCALARS;                                                                       \
        adam_bnb32_impl<T>(p, g, m, v, n, s);                                                                   \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                           \
        adam8bit_##TN(T* p, const float* g, unsigned char* cm, unsigned char* cv, float* am, float* av,        \
                      int64_t n, BNB_ARGS, const float* code_m, const float* code_v) {                          \
        const BnbScalars s = BNB_SCALARS;                                                                       \
        adam8bit_impl<T>(p, g, cm, cv, am, av, n, s, code_m, code_v);                                           \
    }
ADAM_BNB(f32, float)
ADAM_BNB(f16, f16)
ADAM_BNB(bf16, bf16)

// ---------------------------------------------------------------------------------------------------
// Multi-tensor steps: one launch updates every tensor of a group (same state format and parameter
// type), so that a LoRA model's hundreds of small adapter tensors cost one launch instead of one each
// (each launch is ~3-5 us of latency; a 16 x 4096 LoRA A moves 1.8 MB, ~0.4 us at full bandwidth).
// The same idea as apex's multi_tensor_apply / torch's _foreach kernels, with a device array of
// descriptors instead of kernel-argument chunks, so one launch takes any number of tensors.
//
// Descriptors are int64 words written by src/optim/multi.rs (the layout is checked there against these
// constants): pointers as integers, the element count, the tensor's first chunk in the launch's chunk
// numbering, and one word holding the two per-tensor step scalars (each tensor has its own step count,
// hence its own bias corrections) as two little-endian f32. Empty tensors are never described, and
// `start` strictly increases, so the tensor of chunk c is the last descriptor with start <= c.
//
// Torch AdamW and bitsandbytes' 32-bit Adam: {p, g, m, v, n, start, (a, b)}, 7 words; a chunk is
// MULTI_CHUNK elements (256 threads x 4 elements x 4 iterations), so a chunk of an aligned tensor is
// aligned for the float4 / 8-byte path of adamw_span. 8-bit: {p, g, cm, cv, am, av, n, start, (a, b)},
// 9 words; a chunk is one quantization block of 256 elements (one thread block, as adam8bit_block needs).
#define MULTI_CHUNK 4096
#define DESC32_WORDS 7
#define DESC8_WORDS 9

// The descriptor of chunk c: binary search for the last start <= c over `nt` descriptors of `words` words
// whose start is word `start_word`.
__device__ __forceinline__ const int64_t* find_desc(const int64_t* descs, int64_t nt, int words, int start_word,
                                                    int64_t c) {
    int64_t lo = 0, hi = nt - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) >> 1;
        if (descs[mid * words + start_word] <= c) lo = mid;
        else hi = mid - 1;
    }
    return descs + lo * words;
}

// The two f32 of a scalar word (little-endian: the first in the low half).
__device__ __forceinline__ float2 desc_scalars(int64_t w) {
    const unsigned long long u = (unsigned long long)w;
    return make_float2(__uint_as_float((unsigned)(u & 0xffffffffull)), __uint_as_float((unsigned)(u >> 32)));
}

// Grid-stride over the launch's chunks; every thread of a block takes the same chunk, so the chunk's
// tensor and range are block-uniform.
#define MULTI32_PROLOGUE(T)                                                                               \
    for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {                                           \
        const int64_t* d = find_desc(descs, ntensors, DESC32_WORDS, 5, c);                               \
        const int64_t base = (c - d[5]) * MULTI_CHUNK;                                                    \
        const int64_t len = min((int64_t)MULTI_CHUNK, d[4] - base);                                       \
        T* p = reinterpret_cast<T*>((uintptr_t)d[0]) + base;                                              \
        const float* g = reinterpret_cast<const float*>((uintptr_t)d[1]) + base;                          \
        float* m = reinterpret_cast<float*>((uintptr_t)d[2]) + base;                                      \
        float* v = reinterpret_cast<float*>((uintptr_t)d[3]) + base;                                      \
        const float2 sc = desc_scalars(d[6]);

#define ADAM_MULTI(TN, T)                                                                                       \
    extern "C" __global__ void adamw_multi_##TN(const int64_t* descs, int64_t ntensors, int64_t nchunks,         \
                                                float decay, float w1, float beta2, float w2, float eps) {      \
        MULTI32_PROLOGUE(T)                                                                                     \
        const AdamWScalars s = {decay, w1, beta2, w2, sc.x, sc.y, eps};                                         \
        adamw_span<T>(p, g, m, v, len, s, threadIdx.x, blockDim.x);                                             \
        }                                                                                                       \
    }                                                                                                           \
    extern "C" __global__ void adam_bnb32_multi_##TN(const int64_t* descs, int64_t ntensors, int64_t nchunks,    \
                                                     float beta1, float w1, float beta2, float w2, float decay, \
                                                     int weight_decay) {                                        \
        MULTI32_PROLOGUE(T)                                                                                     \
        const BnbScalars s = {beta1, w1, beta2, w2, sc.x, sc.y, decay, weight_decay};                           \
        adam_bnb32_span<T>(p, g, m, v, len, s, threadIdx.x, blockDim.x);                                        \
        }                                                                                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                           \
        adam8bit_multi_##TN(const int64_t* descs, int64_t ntensors, int64_t nblocks, float beta1, float w1,     \
                            float beta2, float w2, float decay, int weight_decay, const float* code_m_g,        \
                            const float* code_v_g) {                                                            \
        __shared__ float code_m[256], code_v[256], red[16];                                                     \
        code_m[threadIdx.x] = code_m_g[threadIdx.x];                                                            \
        code_v[threadIdx.x] = code_v_g[threadIdx.x];                                                            \
        __syncthreads();                                                                                        \
        for (int64_t c = blockIdx.x; c < nblocks; c += gridDim.x) {                                             \
            const int64_t* d = find_desc(descs, ntensors, DESC8_WORDS, 7, c);                                  \
            const float2 sc = desc_scalars(d[8]);                                                               \
            const BnbScalars s = {beta1, w1, beta2, w2, sc.x, sc.y, decay, weight_decay};                       \
            adam8bit_block<T>(reinterpret_cast<T*>((uintptr_t)d[0]), reinterpret_cast<const float*>((uintptr_t)d[1]), \
                              reinterpret_cast<unsigned char*>((uintptr_t)d[2]),                                \
                              reinterpret_cast<unsigned char*>((uintptr_t)d[3]),                                \
                              reinterpret_cast<float*>((uintptr_t)d[4]), reinterpret_cast<float*>((uintptr_t)d[5]), \
                              d[6], c - d[7], s, code_m, code_v, red);                                          \
        }                                                                                                       \
    }
ADAM_MULTI(f32, float)
ADAM_MULTI(f16, f16)
ADAM_MULTI(bf16, bf16)
