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
    // SAFETY: set_var (unsafe in edition 2024) races only with reads outside std's environment lock,
    // such as the CUDA driver's getenv: this runs before any CUDA work in this process, and every test
    // sets the same value, so concurrent writers agree.
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

/// The base weights the layer tests run over.
#[derive(Clone, Copy, Debug)]
pub enum Base {
    Dense(peft_kernels::DType),
    Nf4 { double: bool, blocksize: usize },
    Fp4,
}

/// A random `[out, in]` base weight (std 0.5, seeded), dense or quantized with bitsandbytes' settings.
pub fn make_base(
    base: Base,
    out: usize,
    inp: usize,
    seed: u64,
    dev: Device,
) -> peft_kernels::Result<peft_kernels::qmatmul::BaseWeight> {
    use peft_kernels::qmatmul::BaseWeight;
    use peft_kernels::quant::{QuantType, QuantizeOptions, QuantizedTensor};
    use peft_kernels::{DType, Tensor};
    let w = Tensor::randn(&[out, inp], 0.5, seed, DType::F32, dev)?;
    let q = |opts: QuantizeOptions| QuantizedTensor::quantize(&w, &opts).map(BaseWeight::Quantized);
    match base {
        Base::Dense(dt) => Ok(BaseWeight::Dense(w.to_dtype(dt)?)),
        Base::Nf4 { double, blocksize } => q(QuantizeOptions {
            blocksize,
            double_quant: double,
            ..Default::default()
        }),
        Base::Fp4 => q(QuantizeOptions {
            quant_type: QuantType::Fp4,
            ..Default::default()
        }),
    }
}

/// A tensor's elements as f64 (downloaded if on a GPU).
pub fn f64s(t: &peft_kernels::Tensor) -> peft_kernels::Result<Vec<f64>> {
    Ok(t.to_device(Device::Cpu)?
        .to_vec_f32()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// f64 to f32, elementwise.
pub fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Row-major `a [m, k] · b [k, n]` in f64.
pub fn mm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j];
            }
        }
    }
    c
}

/// Transpose of a row-major `[m, n]`.
pub fn tr(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// Finite differences of `loss_of` for every parameter `ids` of `store` against its analytic gradient in
/// `grads`, restoring each parameter afterwards.
pub fn check_param_gradients(
    store: peft_kernels::autograd::ParamStore,
    ids: &[peft_kernels::autograd::ParamId],
    grads: &peft_kernels::autograd::Gradients,
    loss_of: impl Fn(&peft_kernels::autograd::ParamStore) -> peft_kernels::Result<f32>,
    cfg: &peft_kernels::autograd::gradcheck::GradCheckConfig,
) -> peft_kernels::Result<()> {
    let store = std::cell::RefCell::new(store);
    for &id in ids {
        let at = store.borrow().get(id)?.clone();
        let analytic = grads
            .get(id)
            .ok_or_else(|| peft_kernels::Error::InvalidArgument("missing gradient".into()))?
            .clone();
        let name = store.borrow().name(id)?.to_string();
        peft_kernels::autograd::gradcheck::check_gradient(
            &name,
            |p| {
                store.borrow_mut().set(id, p.clone())?;
                loss_of(&store.borrow())
            },
            &at,
            &analytic,
            cfg,
        )?;
        store.borrow_mut().set(id, at)?;
    }
    Ok(())
}

/// `v` rounded to `dtype` (f16/bf16 round to nearest even; f32 unchanged), back as f32.
pub fn rounded(v: &[f32], dtype: peft_kernels::DType) -> Vec<f32> {
    use peft_kernels::DType;
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}
