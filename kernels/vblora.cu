// VB-LoRA composition kernels (src/adapters/vblora/cuda.rs; CPU oracle in src/adapters/vblora/cpu.rs).
//
//   vblora_select   per row of logits [V]: torch's CPU top-k (libstdc++ partial_sort / nth_element +
//                   sort, replayed step by step so ties resolve exactly as on the CPU) and the softmax
//                   of the k selected logits. One thread per row; the row is copied to a scratch queue.
//   vblora_compose  out[row, l] = Σ_j w[row, j] · bank[idx[row, j], l]   (grid-stride over rows·L)
//   vblora_dlogits  one warp per row: g_j = <grad_row, bank[idx_j]>, dlogit[idx_j] = w_j (g_j - Σ w g)
//   vblora_dbank    dbank[v, :] = Σ_{(row, j): idx = v} w · grad_row, one block per bank row scanning
//                   the selections in a fixed order through shared-memory tiles: deterministic, no atomics.
//
// Napkin math (r = 4, 4096x4096, L = V = 256, k = 2): rows = r·(in + out)/L = 128. select: 128 threads
// x ~V·log k compares; compose: 128·256·k FMAs; dbank: V blocks x 256 selections scanned. All of it is a
// few microseconds of latency, negligible next to the layer's 2·T·in·out GEMMs (17 GFLOP at T = 512).
// Layouts: layout_r = 0 writes/reads rows as [rows, L]; layout_r = r maps row (ob·r + j), element l to
// B[ob·L + l, j] of a row-major [out, r] (PEFT's transpose(1, 2).reshape(-1, r)).
#include "common.cuh"

struct Elem {
    float v;
    int i;
};

// torch's comparator for largest=True: NaN first, then by value.
__device__ __forceinline__ bool comp(Elem x, Elem y) { return (isnan(x.v) && !isnan(y.v)) || x.v > y.v; }

// A queue of (value, index) pairs in global scratch memory (structure of arrays).
struct Arr {
    float* v;
    int* id;
    __device__ __forceinline__ Elem get(int k) const {
        Elem e;
        e.v = v[k];
        e.i = id[k];
        return e;
    }
    __device__ __forceinline__ void set(int k, Elem e) const {
        v[k] = e.v;
        id[k] = e.i;
    }
    __device__ __forceinline__ void swap(int a, int b) const {
        Elem t = get(a);
        set(a, get(b));
        set(b, t);
    }
    __device__ __forceinline__ Arr sub(int off) const {
        Arr s;
        s.v = v + off;
        s.id = id + off;
        return s;
    }
};

// ---- libstdc++ algorithms (bits/stl_heap.h, bits/stl_algo.h), same steps as src/adapters/vblora/topk.rs

__device__ void push_heap(Arr a, int hole, int top, Elem value) {
    while (hole > top) {
        const int parent = (hole - 1) / 2;
        if (!comp(a.get(parent), value)) break;
        a.set(hole, a.get(parent));
        hole = parent;
    }
    a.set(hole, value);
}

__device__ void adjust_heap(Arr a, int hole, int len, Elem value) {
    const int top = hole;
    int second = hole;
    while (len >= 1 && second < (len - 1) / 2) {
        second = 2 * (second + 1);
        if (comp(a.get(second), a.get(second - 1))) second--;
        a.set(hole, a.get(second));
        hole = second;
    }
    if (len >= 2 && (len % 2) == 0 && second == (len - 2) / 2) {
        second = 2 * (second + 1);
        a.set(hole, a.get(second - 1));
        hole = second - 1;
    }
    push_heap(a, hole, top, value);
}

__device__ void make_heap(Arr a, int len) {
    if (len < 2) return;
    int parent = (len - 2) / 2;
    while (true) {
        const Elem value = a.get(parent);
        adjust_heap(a, parent, len, value);
        if (parent == 0) return;
        parent--;
    }
}

__device__ void pop_heap(Arr a, int len, int result) {
    const Elem value = a.get(result);
    a.set(result, a.get(0));
    adjust_heap(a, 0, len, value);
}

__device__ void heap_select(Arr a, int middle, int len) {
    make_heap(a, middle);
    for (int i = middle; i < len; ++i)
        if (comp(a.get(i), a.get(0))) pop_heap(a, middle, i);
}

__device__ void sort_heap(Arr a, int len) {
    while (len > 1) {
        len--;
        pop_heap(a, len, len);
    }
}

__device__ void move_median_to_first(Arr a, int result, int x, int y, int z) {
    int m;
    if (comp(a.get(x), a.get(y))) {
        if (comp(a.get(y), a.get(z))) m = y;
        else if (comp(a.get(x), a.get(z))) m = z;
        else m = x;
    } else if (comp(a.get(x), a.get(z))) {
        m = x;
    } else if (comp(a.get(y), a.get(z))) {
        m = z;
    } else {
        m = y;
    }
    a.swap(result, m);
}

__device__ int unguarded_partition(Arr a, int first, int last, int pivot) {
    while (true) {
        while (comp(a.get(first), a.get(pivot))) first++;
        last--;
        while (comp(a.get(pivot), a.get(last))) last--;
        if (first >= last) return first;
        a.swap(first, last);
        first++;
    }
}

__device__ int unguarded_partition_pivot(Arr a, int first, int last) {
    const int mid = first + (last - first) / 2;
    move_median_to_first(a, first, first + 1, mid, last - 1);
    return unguarded_partition(a, first + 1, last, first);
}

__device__ void unguarded_linear_insert(Arr a, int last) {
    const Elem val = a.get(last);
    int next = last - 1;
    while (comp(val, a.get(next))) {
        a.set(last, a.get(next));
        last = next;
        next--;
    }
    a.set(last, val);
}

__device__ void insertion_sort(Arr a, int first, int last) {
    if (first == last) return;
    for (int i = first + 1; i < last; ++i) {
        if (comp(a.get(i), a.get(first))) {
            const Elem val = a.get(i);
            for (int j = i; j > first; --j) a.set(j, a.get(j - 1));
            a.set(first, val);
        } else {
            unguarded_linear_insert(a, i);
        }
    }
}

#define S_THRESHOLD 16

__device__ void final_insertion_sort(Arr a, int first, int last) {
    if (last - first > S_THRESHOLD) {
        insertion_sort(a, first, first + S_THRESHOLD);
        for (int i = first + S_THRESHOLD; i < last; ++i) unguarded_linear_insert(a, i);
    } else {
        insertion_sort(a, first, last);
    }
}

__device__ __forceinline__ int lg(int n) { return 31 - __clz(n); }

// __introsort_loop without recursion: the recursive call on [cut, last) and the loop on [first, cut)
// touch disjoint ranges, so running them from an explicit stack gives the same array. Entries on the
// stack have strictly decreasing depth limits, so at most 2·lg(n) + 1 <= 63 are pending.
__device__ void introsort_loop(Arr a, int first0, int last0, int depth0) {
    int sf[64], sl[64], sd[64];
    int top = 0;
    sf[0] = first0;
    sl[0] = last0;
    sd[0] = depth0;
    top = 1;
    while (top > 0) {
        top--;
        int first = sf[top], last = sl[top], depth = sd[top];
        while (last - first > S_THRESHOLD) {
            if (depth == 0) {
                Arr s = a.sub(first);
                heap_select(s, last - first, last - first);
                sort_heap(s, last - first);
                break;
            }
            depth--;
            const int cut = unguarded_partition_pivot(a, first, last);
            if (top < 64) {
                sf[top] = cut;
                sl[top] = last;
                sd[top] = depth;
                top++;
            }
            last = cut;
        }
    }
}

__device__ void std_sort(Arr a, int len) {
    if (len == 0) return;
    introsort_loop(a, 0, len, 2 * lg(len));
    final_insertion_sort(a, 0, len);
}

__device__ void nth_element(Arr a, int len, int nth) {
    if (len == 0 || nth == len) return;
    int first = 0, last = len;
    int depth = 2 * lg(len);
    while (last - first > 3) {
        if (depth == 0) {
            heap_select(a.sub(first), nth + 1 - first, last - first);
            a.swap(first, nth);
            return;
        }
        depth--;
        const int cut = unguarded_partition_pivot(a, first, last);
        if (cut <= nth) first = cut;
        else last = cut;
    }
    insertion_sort(a, first, last);
}

// rows x [V] logits -> idx [rows, k] (torch.topk order) and w [rows, k] = softmax of the selected logits.
// sv/si: scratch [rows, V]. *flag |= 1 when a row holds a non-finite logit.
extern "C" __global__ void vblora_select(const float* __restrict__ logits, int64_t rows, int V, int k,
                                         float* __restrict__ sv, int* __restrict__ si, int* __restrict__ idx,
                                         float* __restrict__ w, int* __restrict__ flag) {
    GRID_STRIDE(row, rows) {
        const float* z = logits + row * V;
        Arr a;
        a.v = sv + row * V;
        a.id = si + row * V;
        bool bad = false;
        for (int j = 0; j < V; ++j) {
            a.v[j] = z[j];
            a.id[j] = j;
            bad |= !isfinite(z[j]);
        }
        if (bad) atomicOr(flag, 1);
        if ((long long)k * 64 <= (long long)V) {
            heap_select(a, k, V);
            sort_heap(a, k);
        } else {
            nth_element(a, V, k - 1);
            std_sort(a, k - 1);
        }
        float m = -INFINITY;
        for (int j = 0; j < k; ++j) {
            const float x = a.v[j];
            if (x > m || isnan(x)) m = x;
        }
        float s = 0.f;
        for (int j = 0; j < k; ++j) {
            const float e = expf(a.v[j] - m);
            w[row * k + j] = e;
            s += e;
        }
        const float inv = 1.f / s;
        for (int j = 0; j < k; ++j) {
            w[row * k + j] *= inv;
            idx[row * k + j] = a.id[j];
        }
    }
}

__device__ __forceinline__ int64_t out_index(int64_t row, int64_t l, int64_t L, int64_t layout_r) {
    return layout_r == 0 ? row * L + l : ((row / layout_r) * L + l) * layout_r + row % layout_r;
}

extern "C" __global__ void vblora_compose(const float* __restrict__ bank, int64_t L, const int* __restrict__ idx,
                                          const float* __restrict__ w, int k, int64_t rows, int64_t layout_r,
                                          float* __restrict__ out) {
    GRID_STRIDE(e, rows * L) {
        const int64_t row = e / L, l = e % L;
        float acc = 0.f;
        for (int j = 0; j < k; ++j) acc += w[row * k + j] * bank[(int64_t)idx[row * k + j] * L + l];
        out[out_index(row, l, L, layout_r)] = acc;
    }
}

// dlogits must be zeroed before the launch (only the k selected entries of a row are written).
extern "C" __global__ void vblora_dlogits(const float* __restrict__ bank, int64_t L, const float* __restrict__ grad,
                                          const int* __restrict__ idx, const float* __restrict__ w, int k,
                                          int64_t rows, int V, int64_t layout_r, float* __restrict__ dlogits) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t row = warp; row < rows; row += nwarps) {  // uniform per warp
        float dot_w = 0.f;
        for (int j = 0; j < k; ++j) {
            const int64_t b = idx[row * k + j];
            float acc = 0.f;
            for (int64_t l = lane; l < L; l += 32) acc += grad[out_index(row, l, L, layout_r)] * bank[b * L + l];
            acc = warp_sum(acc);  // xor tree: every lane holds the sum
            dot_w += w[row * k + j] * acc;
            if (lane == 0) dlogits[row * V + b] = acc;  // g_j, parked in its own (distinct) slot
        }
        __syncwarp();
        for (int j = lane; j < k; j += 32) {
            const int64_t b = idx[row * k + j];
            const float g = dlogits[row * V + b];
            dlogits[row * V + b] = w[row * k + j] * (g - dot_w);
        }
        __syncwarp();
    }
}

#define DBANK_TILE 1024
extern "C" __global__ void vblora_dbank(const float* __restrict__ grad, const int* __restrict__ idx,
                                        const float* __restrict__ w, int k, int64_t rows, int64_t L, int V,
                                        int64_t layout_r, float* __restrict__ dbank) {
    __shared__ int s_idx[DBANK_TILE];
    const int64_t total = rows * k;
    for (int v = blockIdx.x; v < V; v += gridDim.x) {
        for (int64_t l0 = 0; l0 < L; l0 += blockDim.x) {
            const int64_t l = l0 + threadIdx.x;
            float acc = 0.f;
            for (int64_t e0 = 0; e0 < total; e0 += DBANK_TILE) {
                const int cnt = (int)(total - e0 < DBANK_TILE ? total - e0 : DBANK_TILE);
                __syncthreads();  // the previous tile has been consumed by every thread
                for (int i = threadIdx.x; i < cnt; i += blockDim.x) s_idx[i] = idx[e0 + i];
                __syncthreads();
                if (l < L) {
                    for (int i = 0; i < cnt; ++i) {
                        if (s_idx[i] == v) {
                            const int64_t e = e0 + i;
                            acc += w[e] * grad[out_index(e / k, l, L, layout_r)];
                        }
                    }
                }
            }
            if (l < L) dbank[(int64_t)v * L + l] = acc;
        }
    }
}
