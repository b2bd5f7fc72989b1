//! Shared test harness: device selection, device-generic test macro, and comparison helpers.
//!
//! A test body is written once as `fn body(dev: Device) -> Result<()>` and instantiated per device by
//! [`device_test!`]. On a machine without CUDA the CUDA instance prints `SKIPPED (no CUDA device)`;
//! with `PEFT_KERNELS_REQUIRE_GPU=1` it fails instead.
#![allow(dead_code)]

use peft_kernels::Device;

/// The CUDA device to test on, or `None` (after printing why) when there is none.
pub fn cuda_device() -> Option<Device> {
    // Fresh CUDA outputs are filled with NaN bytes so that unwritten elements fail comparisons.
    // SAFETY (std::env::set_var is unsafe in edition 2024): set before any CUDA work in this process;
    // every test sets the same value, so concurrent writers agree.
    unsafe { std::env::set_var("PEFT_KERNELS_POISON", "1") };
    if peft_kernels::cuda_device_count() > 0 {
        return Some(Device::Cuda(0));
    }
    if std::env::var("PEFT_KERNELS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("PEFT_KERNELS_REQUIRE_GPU=1 but no CUDA device is available");
    }
    println!("SKIPPED (no CUDA device)");
    None
}

/// `device_test!(name)` turns `fn name(dev: Device) -> peft_kernels::Result<()>` into the tests
/// `name::cpu` and `name::cuda`.
#[macro_export]
macro_rules! device_test {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                super::$name(peft_kernels::Device::Cpu).unwrap();
            }
            #[test]
            fn cuda() {
                if let Some(dev) = $crate::common::cuda_device() {
                    super::$name(dev).unwrap();
                }
            }
        }
    )+};
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise, naming the first offending index.
#[track_caller]
pub fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let tol = atol + rtol * e.abs();
        assert!(
            err <= tol && a.is_finite() == e.is_finite(),
            "{what}: index {i}: got {a}, expected {e} (|err| {err} > tol {tol})"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
}

/// Asserts closeness relative to the largest magnitude in `expected` (for sums with cancellation).
#[track_caller]
pub fn assert_close_scaled(actual: &[f32], expected: &[f32], rel: f32, what: &str) {
    let scale = expected
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    assert_close(actual, expected, 0.0, rel * scale, what);
}

/// f64 reference matmul of row-major op(A)[m,k] · op(B)[k,n].
pub fn matmul_f64(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                acc += x as f64 * y as f64;
            }
            c[i * n + j] = acc as f32;
        }
    }
    c
}
