//! `torch.topk(x, k)` (largest, sorted) on the CPU, including its order among equal values.
//!
//! VB-LoRA selects sub-vectors with `logits.topk(k)`; when logits tie across the k-th place, *which*
//! index wins changes the adapter's output and gradients, so it has to match torch. torch's CPU kernel
//! (`aten/src/ATen/native/TopKImpl.h`, `topk_impl_loop`) fills `(value, index)` pairs in index order and
//! - if `k * 64 <= n`: `std::partial_sort(q, q + k, q + n, comp)`;
//! - else: `std::nth_element(q, q + k - 1, q + n, comp)`, then `std::sort(q, q + k - 1, comp)`;
//!
//! with `comp(x, y) = (isnan(x) && !isnan(y)) || x > y` (NaN counts as largest), and returns `q[..k]`.
//! Neither algorithm is stable, so ties come out in the order libstdc++'s heap select / introselect /
//! introsort leave them. This module re-implements those libstdc++ algorithms step by step (same
//! pivots, same heap sifts, same insertion-sort thresholds; they have been unchanged in libstdc++ for
//! many releases) so the selection is identical. The tests check it against torch 2.15 on tie-heavy and
//! NaN rows for both paths. The CUDA kernel in `kernels/vblora.cu` runs the same code per row.
//!
//! Note: torch's *CUDA* topk uses a radix select with different tie behaviour, so a PEFT model trained
//! on a GPU can pick other indices among exact ties than one trained on a CPU; we follow the CPU.

/// A candidate: (value, original index).
pub(crate) type Elem = (f32, u32);

#[inline(always)]
fn comp(x: &Elem, y: &Elem) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

/// `std::__push_heap` on `v` (heap rooted at 0).
fn push_heap(v: &mut [Elem], mut hole: usize, top: usize, value: Elem) {
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(&v[parent], &value) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = value;
}

/// `std::__adjust_heap`: sift the hole at `hole` down a heap of `len`, then push `value`.
fn adjust_heap(v: &mut [Elem], mut hole: usize, len: usize, value: Elem) {
    let top = hole;
    let mut second = hole;
    while len >= 1 && second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if comp(&v[second], &v[second - 1]) {
            second -= 1;
        }
        v[hole] = v[second];
        hole = second;
    }
    if len >= 2 && len.is_multiple_of(2) && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        v[hole] = v[second - 1];
        hole = second - 1;
    }
    push_heap(v, hole, top, value);
}

/// `std::__make_heap` over `v[..len]`.
fn make_heap(v: &mut [Elem], len: usize) {
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, len, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// `std::__pop_heap(first, first + len, first + result)`.
fn pop_heap(v: &mut [Elem], len: usize, result: usize) {
    let value = v[result];
    v[result] = v[0];
    adjust_heap(v, 0, len, value);
}

/// `std::__heap_select(first, first + middle, first + v.len())`.
fn heap_select(v: &mut [Elem], middle: usize) {
    make_heap(v, middle);
    for i in middle..v.len() {
        if comp(&v[i], &v[0]) {
            pop_heap(v, middle, i);
        }
    }
}

/// `std::__sort_heap` over `v[..len]`.
fn sort_heap(v: &mut [Elem], mut len: usize) {
    while len > 1 {
        len -= 1;
        pop_heap(v, len, len);
    }
}

/// `std::partial_sort(v, v + middle, v + len)`.
fn partial_sort(v: &mut [Elem], middle: usize) {
    heap_select(v, middle);
    sort_heap(v, middle);
}

/// `std::__move_median_to_first(result, a, b, c)`.
fn move_median_to_first(v: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
    let m = if comp(&v[a], &v[b]) {
        if comp(&v[b], &v[c]) {
            b
        } else if comp(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if comp(&v[a], &v[c]) {
        a
    } else if comp(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(result, m);
}

/// `std::__unguarded_partition(first, last, pivot)`.
fn unguarded_partition(v: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while comp(&v[first], &v[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&v[pivot], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

/// `std::__unguarded_partition_pivot(first, last)`.
fn unguarded_partition_pivot(v: &mut [Elem], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(v, first, first + 1, mid, last - 1);
    unguarded_partition(v, first + 1, last, first)
}

/// `std::__unguarded_linear_insert(last)`.
fn unguarded_linear_insert(v: &mut [Elem], mut last: usize) {
    let val = v[last];
    let mut next = last - 1;
    while comp(&val, &v[next]) {
        v[last] = v[next];
        last = next;
        next -= 1;
    }
    v[last] = val;
}

/// `std::__insertion_sort(first, last)`.
fn insertion_sort(v: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if comp(&v[i], &v[first]) {
            let val = v[i];
            v.copy_within(first..i, first + 1);
            v[first] = val;
        } else {
            unguarded_linear_insert(v, i);
        }
    }
}

const S_THRESHOLD: usize = 16;

/// `std::__final_insertion_sort(first, last)`.
fn final_insertion_sort(v: &mut [Elem], first: usize, last: usize) {
    if last - first > S_THRESHOLD {
        insertion_sort(v, first, first + S_THRESHOLD);
        for i in first + S_THRESHOLD..last {
            unguarded_linear_insert(v, i);
        }
    } else {
        insertion_sort(v, first, last);
    }
}

/// `std::__introsort_loop(first, last, depth_limit)`.
fn introsort_loop(v: &mut [Elem], first: usize, mut last: usize, mut depth: u32) {
    while last - first > S_THRESHOLD {
        if depth == 0 {
            let sub = &mut v[first..last];
            let n = sub.len();
            partial_sort(sub, n);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(v, first, last);
        introsort_loop(v, cut, last, depth);
        last = cut;
    }
}

/// `std::__lg(n)`: floor(log2(n)) for n > 0.
fn lg(n: usize) -> u32 {
    usize::BITS - 1 - n.leading_zeros()
}

/// `std::sort(v, v + len)`.
fn sort(v: &mut [Elem], len: usize) {
    if len == 0 {
        return;
    }
    introsort_loop(v, 0, len, 2 * lg(len));
    final_insertion_sort(v, 0, len);
}

/// `std::nth_element(v, v + nth, v + v.len())`.
fn nth_element(v: &mut [Elem], nth: usize) {
    let len = v.len();
    if len == 0 || nth == len {
        return;
    }
    let (mut first, mut last) = (0, len);
    let mut depth = 2 * lg(len);
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut v[first..last], nth + 1 - first);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(v, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(v, first, last);
}

/// torch.topk(row, k) (largest=True, sorted=True) on the CPU: the `k` selected `(value, index)` pairs in
/// torch's output order. `queue` is scratch space of `row.len()` elements. Requires `1 <= k <= n`.
pub(crate) fn torch_topk<'q>(row: &[f32], k: usize, queue: &'q mut Vec<Elem>) -> &'q [Elem] {
    let n = row.len();
    debug_assert!(k >= 1 && k <= n);
    queue.clear();
    queue.extend(row.iter().enumerate().map(|(j, &x)| (x, j as u32)));
    if k * 64 <= n {
        partial_sort(queue, k);
    } else {
        nth_element(queue, k - 1);
        sort(queue, k - 1);
    }
    &queue[..k]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_and_selects() {
        // Against a stable reference on distinct values (ties are checked against torch in tests/).
        let mut r = crate::rng::Rng::new(3);
        let mut q = Vec::new();
        for n in [1usize, 2, 3, 4, 5, 16, 17, 33, 64, 65, 200, 1000] {
            let row: Vec<f32> = (0..n).map(|_| r.normal()).collect();
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
            for k in 1..=n.min(40) {
                let got: Vec<usize> = torch_topk(&row, k, &mut q).iter().map(|e| e.1 as usize).collect();
                assert_eq!(got, want[..k], "n={n} k={k}");
            }
            // Full sort path too (introsort with more than 16 elements).
            let mut v: Vec<Elem> = row.iter().enumerate().map(|(j, &x)| (x, j as u32)).collect();
            sort(&mut v, n);
            assert_eq!(v.iter().map(|e| e.1 as usize).collect::<Vec<_>>(), want);
        }
    }
}
