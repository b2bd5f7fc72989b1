//! build.rs's kernel-signature reader (build/kernel_sigs.rs) on its own: the preprocessor, the parser
//! and the grouping into launcher families, on small sources and on the real `kernels/*.cu`. The
//! generated launchers themselves are checked by the compiler, and their kernel names against the
//! fatbins by `device::cuda::tests` (under `--features cuda`).

#[allow(dead_code)]
#[path = "../build/kernel_sigs.rs"]
mod kernel_sigs;

use kernel_sigs::{Param, families, parse};
use std::path::Path;

fn ptr(name: &str, elem: &str, konst: bool, nullable: bool) -> Param {
    Param::Ptr {
        name: name.into(),
        elem: elem.into(),
        konst,
        nullable,
    }
}

fn val(name: &str, ty: &str) -> Param {
    Param::Val {
        name: name.into(),
        ty: ty.into(),
    }
}

/// Pasting, nested macros, object-like macros, NULLABLE, a parameter group, __launch_bounds__, and
/// comments and continuation lines in the way.
#[test]
fn macros_expand_like_the_c_preprocessor() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("h.cuh"),
        "#pragma once\n#define NULLABLE\n#define G_PARAMS const uint8_t *data, NULLABLE const float *s, int lg\n",
    )
    .unwrap();
    let src = r#"
#include "h.cuh"
#include <cuda_fp16.h>
// a comment with extern "C" __global__ void fake(int x) in it
/* and a block
   comment */
#define K(TN, T, DQ)                                                        \
    extern "C" __global__ void __launch_bounds__(256) k_##TN##_dq##DQ(      \
        const T* __restrict__ x, G_PARAMS, NULLABLE T* y, int64_t n) {     \
        body(x, y, n);                                                      \
    }
#define K_ALL(TN, T) K(TN, T, 0) K(TN, T, 1)
K_ALL(f32, float)
K_ALL(bf16, bf16)
extern "C" __global__ void plain(const int* idx, unsigned long long* flag, float a) {}
__global__ void not_exported(int x) {}
"#;
    let p = parse(dir.path(), src).unwrap();
    let names: Vec<&str> = p.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        ["k_f32_dq0", "k_f32_dq1", "k_bf16_dq0", "k_bf16_dq1", "plain"]
    );
    assert_eq!(
        p.kernels[2].params,
        [
            ptr("x", "half::bf16", true, false),
            Param::Group("G_PARAMS".into()),
            ptr("y", "half::bf16", false, true),
            val("n", "i64"),
        ]
    );
    assert_eq!(
        p.kernels[4].params,
        [
            ptr("idx", "i32", true, false),
            ptr("flag", "u64", false, false),
            val("a", "f32"),
        ]
    );
    assert_eq!(
        p.groups["G_PARAMS"],
        [
            ptr("data", "u8", true, false),
            ptr("s", "f32", true, true),
            val("lg", "i32")
        ]
    );
    // One generic family over (dtype, dq) plus the plain kernel.
    let fams = families(&p.kernels).unwrap();
    let fnames: Vec<&str> = fams.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(fnames, ["k", "plain"]);
    let code = kernel_sigs::launchers("demo", "Demo", &fams);
    assert!(code.contains("pub(crate) unsafe fn k<T0: KernelElem>("), "{code}");
    assert!(code.contains("(\"bf16\", 1,) => \"k_bf16_dq1\""), "{code}");
    assert!(code.contains("y: Option<&mut CudaViewMut<'_, T0>>"), "{code}");
}

/// Kernels whose parameters do not follow their dtype tokens get launchers of their own.
#[test]
fn kernels_that_do_not_unify_stay_separate() {
    let src = r#"
extern "C" __global__ void t_b1(const uint8_t* s, uint8_t* d, int64_t n) {}
extern "C" __global__ void t_b2(const uint16_t* s, uint16_t* d, int64_t n) {}
extern "C" __global__ void c_f32(const float* s, int64_t n) {}
extern "C" __global__ void c_f16(const f16* s, int n) {}
"#;
    let p = parse(Path::new("."), src).unwrap();
    let fams = families(&p.kernels).unwrap();
    let mut names: Vec<&str> = fams.iter().map(|f| f.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["c_f16", "c_f32", "t_b1", "t_b2"]);
}

/// What the reader cannot follow is a build error, not a silently wrong launcher.
#[test]
fn unreadable_signatures_are_errors() {
    let bad = [
        "extern \"C\" __global__ void k(const Foo* x) {}",
        "extern \"C\" __global__ void k(float** x) {}",
        "extern \"C\" __global__ void k(NULLABLE int n) {}",
        "#if 1\nextern \"C\" __global__ void k(int n) {}\n#endif\n",
        "extern \"C\" __global__ void k(int n) {}\nextern \"C\" __global__ void k(int n) {}",
    ];
    for src in bad {
        assert!(parse(Path::new("."), src).is_err(), "{src}");
    }
}

/// Every real kernel file is read, each kernel has a launcher, and the 4-bit kernels share one
/// parameter group with the nested blocksize as a log2.
#[test]
fn the_crate_kernels_are_read() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut total = 0;
    for stem in [
        "autograd", "dora", "nf4", "optim", "qmatmul", "tensor", "vblora", "waveft",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{stem}.cu"))).unwrap();
        let p = parse(&dir, &text).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert!(!p.kernels.is_empty(), "{stem}");
        total += p.kernels.len();
        let fams = families(&p.kernels).unwrap();
        assert!(fams.len() <= p.kernels.len());
        if stem == "dora" || stem == "qmatmul" {
            let q4 = &p.groups["Q4_PARAMS"];
            assert!(q4.contains(&val("nested_log2", "i32")), "{stem}: {q4:?}");
            assert!(q4.contains(&val("lut", "[f32; 16]")), "{stem}: {q4:?}");
            assert!(q4.contains(&ptr("absmax", "f32", true, true)), "{stem}: {q4:?}");
        }
    }
    assert!(total > 150, "{total} kernels");
}
