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

/// An integer tensor of a fixture file (i64 as stored by torch) as u32s.
pub fn ints(f: &peft_kernels::io::SafetensorsFile, name: &str) -> Vec<u32> {
    let (_, _, bytes) = f.raw(name).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// A float tensor of a fixture file as f32s.
pub fn floats(f: &peft_kernels::io::SafetensorsFile, name: &str) -> Vec<f32> {
    f.load(name, Device::Cpu).unwrap().to_vec_f32().unwrap()
}

/// Our store key for a PEFT parameter name (`...lora_A.default.weight`,
/// `classifier.modules_to_save.default.weight`).
pub fn our_key(peft_name: &str) -> String {
    peft_name
        .replace(".modules_to_save.default.", ".")
        .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        .replace(".default.weight", ".weight")
}

/// Checks every gradient a fixture file stores as `{prefix}{PEFT name}` against `grads` (rtol 1e-4,
/// atol 1e-4 of the largest expected magnitude). Returns how many were checked.
pub fn check_fixture_grads(
    io: &peft_kernels::io::SafetensorsFile,
    prefix: &str,
    store: &peft_kernels::autograd::ParamStore,
    grads: &peft_kernels::autograd::Gradients,
    what: &str,
) -> usize {
    let mut n = 0;
    for name in io.names().iter().filter(|n| n.starts_with(prefix)) {
        let key = our_key(&name[prefix.len()..]);
        let id = store
            .find(&key)
            .unwrap_or_else(|| panic!("{what}: no parameter {key:?}"));
        let g = grads
            .get(id)
            .unwrap_or_else(|| panic!("{what}: no gradient for {key:?}"));
        let want = floats(io, name);
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert_close(&g.to_vec_f32().unwrap(), &want, 1e-4, 1e-4 * scale, &key);
        n += 1;
    }
    n
}

/// How [`one_layer_each`] builds its layers: module names `{prefix}.lora`, `.dora`, `.waveft`,
/// `.vblora`; each method's base format and whether it has a bias (in that order); WaveFT's
/// `n_frequency`.
pub struct LayerSet {
    pub prefix: &'static str,
    pub bases: [Base; 4],
    pub biased: [bool; 4],
    pub n_frequency: usize,
}

/// One layer of each adapter method (LoRA, DoRA, WaveFT, VB-LoRA) on seeded random `[out, inp]` bases,
/// random non-zero adapter weights (LoRA r=3, alpha=5; VB-LoRA r=2 over a 6x4 bank, top-2) and dropout
/// 0.25 where the method has it.
pub fn one_layer_each(
    set: &LayerSet,
    out: usize,
    inp: usize,
    store: &mut peft_kernels::autograd::ParamStore,
    dev: Device,
) -> peft_kernels::Result<Vec<Box<dyn peft_kernels::adapters::AdapterLinear>>> {
    use peft_kernels::adapters::dora::{DoraLinear, DoraOptions};
    use peft_kernels::adapters::lora::{LoraConfig, LoraInit, LoraLinear};
    use peft_kernels::adapters::vblora::{VbLoraBank, VbLoraConfig, VbLoraLinear, VbLoraOptions};
    use peft_kernels::adapters::waveft::{WaveFtConfig, WaveFtLinear};
    let lc = LoraConfig {
        r: 3,
        alpha: 5.0,
        dropout: 0.25,
        init: LoraInit::Random,
        ..LoraConfig::default()
    };
    let wc = WaveFtConfig {
        n_frequency: set.n_frequency,
        scaling: 3.0,
        ..WaveFtConfig::default()
    };
    let vc = VbLoraConfig {
        r: 2,
        num_vectors: 6,
        vector_length: 4,
        topk: 2,
    };
    let bank = VbLoraBank::new(&vc, 0.5, store, 1, dev)?;
    let vo = VbLoraOptions {
        dropout: 0.25,
        init_logits_std: 0.5,
    };
    // Layer i: base seed 3i+2, bias seed 3i+3, adapter seed 3i+4.
    let base = |i: usize| make_base(set.bases[i], out, inp, 3 * i as u64 + 2, dev);
    let bias = |i: usize| -> peft_kernels::Result<Option<peft_kernels::Tensor>> {
        if !set.biased[i] {
            return Ok(None);
        }
        peft_kernels::Tensor::randn(&[out], 0.3, 3 * i as u64 + 3, peft_kernels::DType::F32, dev).map(Some)
    };
    let name = |m: &str| format!("{}.{m}", set.prefix);
    Ok(vec![
        Box::new(LoraLinear::new(&name("lora"), base(0)?, bias(0)?, &lc, store, 4)?),
        Box::new(DoraLinear::new(
            &name("dora"),
            base(1)?,
            bias(1)?,
            &lc,
            store,
            7,
            DoraOptions::default(),
        )?),
        Box::new(WaveFtLinear::new(
            &name("waveft"),
            base(2)?,
            bias(2)?,
            &wc,
            false,
            store,
            10,
        )?),
        Box::new(VbLoraLinear::new(
            &name("vblora"),
            base(3)?,
            bias(3)?,
            &bank,
            &vo,
            store,
            13,
        )?),
    ])
}
