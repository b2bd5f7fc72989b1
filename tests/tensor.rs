//! The tensor API: every op on every device against f64 math (CPU) and against the CPU (CUDA).

mod common;

use common::{assert_close, assert_close_scaled, matmul_f64};
use half::{bf16, f16};
use peft_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Relative tolerance of one rounding to `dtype`.
fn eps(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1.0 / 1024.0,
        _ => 1.0 / 128.0,
    }
}

/// Rounds like a cast to `dtype` would (the values a `dtype` tensor really holds).
fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

fn casts(dev: Device) -> Result<()> {
    let x = Tensor::randn(&[37, 19], 3.0, 11, DType::F32, dev)?;
    let xv = x.to_vec::<f32>()?;
    for &to in &FLOATS {
        let y = x.to_dtype(to)?;
        assert_eq!(y.dtype(), to);
        assert_eq!(y.device(), dev);
        // Round to nearest even, bit-for-bit what `half` does on the CPU.
        let got = y.to_vec_f32()?;
        assert_eq!(got, round_to(&xv, to), "cast f32 -> {to}");
        for &back in &FLOATS {
            let z = y.to_dtype(back)?.to_vec_f32()?;
            assert_eq!(z, round_to(&got, back), "cast {to} -> {back}");
        }
    }
    // Extremes survive: inf, -inf, largest finite, subnormals.
    let ext = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        -65504.0,
        1e-7,
        -3e-39,
        0.0,
        -0.0,
    ];
    let t = Tensor::from_slice(&ext, &[ext.len()], dev)?;
    for &to in &FLOATS {
        assert_eq!(
            t.to_dtype(to)?.to_vec_f32()?,
            round_to(&ext, to),
            "extremes -> {to}"
        );
    }
    Ok(())
}

fn elementwise(dev: Device) -> Result<()> {
    for &dt in &FLOATS {
        for &n in &[1usize, 7, 1000, 65_537] {
            let a = Tensor::randn(&[n], 1.0, 1, dt, dev)?;
            let b = Tensor::randn(&[n], 2.0, 2, dt, dev)?;
            let (av, bv) = (a.to_vec_f32()?, b.to_vec_f32()?);
            let check = |t: Tensor, f: &dyn Fn(f64, f64) -> f64, what: &str| -> Result<()> {
                let want: Vec<f32> = av
                    .iter()
                    .zip(&bv)
                    .map(|(&x, &y)| f(x as f64, y as f64) as f32)
                    .collect();
                assert_close(
                    &t.to_vec_f32()?,
                    &round_to(&want, dt),
                    0.0,
                    0.0,
                    &format!("{what} {dt} n={n}"),
                );
                Ok(())
            };
            check(a.add(&b)?, &|x, y| x + y, "add")?;
            check(a.sub(&b)?, &|x, y| x - y, "sub")?;
            check(a.mul(&b)?, &|x, y| ((x as f32) * (y as f32)) as f64, "mul")?;
            check(a.scale(-1.5)?, &|x, _| x * -1.5, "scale")?;
            let mut c = a.clone();
            c.add_scaled_(&b, 0.25)?;
            check(c, &|x, y| ((x as f32) + 0.25 * (y as f32)) as f64, "add_scaled_")?;
            // Copy on write: `a` is unchanged by the in-place update of its clone.
            assert_eq!(a.to_vec_f32()?, av);
        }
    }
    Ok(())
}

/// `affine` and `add_scaled_` round the product and the sum separately (two f32 roundings, like the
/// CPU and plain Rust f32 arithmetic), never as one fused multiply-add: bits are compared with a
/// non-power-of-two alpha and a nonzero beta, on values where an FMA gives other bits.
fn affine_and_axpy_round_twice(dev: Device) -> Result<()> {
    let (alpha, beta) = (0.3f32, 1.7f32);
    let n = 4099;
    let xv: Vec<f32> = Tensor::randn(&[n], 3.0, 11, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let yv: Vec<f32> = Tensor::randn(&[n], 3.0, 12, DType::F32, Device::Cpu)?.to_vec_f32()?;
    let affine: Vec<f32> = xv.iter().map(|&x| x * alpha + beta).collect();
    let axpy: Vec<f32> = yv.iter().zip(&xv).map(|(&y, &x)| y + alpha * x).collect();
    // The test can fail: a fused multiply-add differs from the two roundings somewhere.
    assert!(xv.iter().zip(&affine).any(|(&x, &a)| x.mul_add(alpha, beta) != a));
    assert!(
        xv.iter()
            .zip(yv.iter().zip(&axpy))
            .any(|(&x, (&y, &a))| alpha.mul_add(x, y) != a)
    );
    for &dt in &FLOATS {
        let x = Tensor::from_slice(&xv, &[n], dev)?.to_dtype(dt)?;
        let mut y = Tensor::from_slice(&yv, &[n], dev)?.to_dtype(dt)?;
        // The oracle from the dtype-rounded inputs, rounded once more to the dtype.
        let (xr, yr) = (x.to_vec_f32()?, y.to_vec_f32()?);
        let want_affine: Vec<f32> = xr.iter().map(|&x| x * alpha + beta).collect();
        let want_axpy: Vec<f32> = yr.iter().zip(&xr).map(|(&y, &x)| y + alpha * x).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let got = x.affine(alpha, beta)?.to_vec_f32()?;
        assert_eq!(bits(&got), bits(&round_to(&want_affine, dt)), "affine {dt}");
        y.add_scaled_(&x, alpha)?;
        assert_eq!(
            bits(&y.to_vec_f32()?),
            bits(&round_to(&want_axpy, dt)),
            "axpy {dt}"
        );
    }
    Ok(())
}

fn reductions(dev: Device) -> Result<()> {
    for &dt in &FLOATS {
        for &(rows, cols) in &[(1usize, 1usize), (3, 33), (17, 1000), (5, 0)] {
            let x = Tensor::randn(&[rows, cols], 1.0, 5, dt, dev)?;
            let xv = x.to_vec_f32()?;
            let mut sums = vec![0f32; rows];
            let mut sq = vec![0f32; rows];
            for r in 0..rows {
                let row = &xv[r * cols..(r + 1) * cols];
                sums[r] = row.iter().map(|&v| v as f64).sum::<f64>() as f32;
                sq[r] = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() as f32;
            }
            let norms: Vec<f32> = sq.iter().map(|v| v.sqrt()).collect();
            let tol = 1e-5 * (cols as f32).sqrt().max(1.0);
            assert_close(
                &x.row_sums()?.to_vec::<f32>()?,
                &sums,
                tol,
                tol,
                &format!("row_sums {dt}"),
            );
            assert_close(
                &x.row_sq_norms()?.to_vec::<f32>()?,
                &sq,
                tol,
                tol,
                &format!("row_sq_norms {dt}"),
            );
            assert_close(
                &x.row_norms()?.to_vec::<f32>()?,
                &norms,
                tol,
                tol,
                &format!("row_norms {dt}"),
            );
            assert_eq!(x.row_sums()?.shape(), &[rows]);
        }
    }
    Ok(())
}

fn transpose(dev: Device) -> Result<()> {
    for &dt in &FLOATS {
        for &(m, n) in &[(1usize, 1usize), (33, 65), (64, 31), (100, 1)] {
            let x = Tensor::randn(&[m, n], 1.0, 9, dt, dev)?;
            let xv = x.to_vec_f32()?;
            let t = x.t()?;
            assert_eq!(t.shape(), &[n, m]);
            let tv = t.to_vec_f32()?;
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(tv[j * m + i], xv[i * n + j]);
                }
            }
        }
    }
    Ok(())
}

fn matmul_case(dev: Device, dt: DType, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Result<()> {
    let ashape = if ta { [k, m] } else { [m, k] };
    let bshape = if tb { [n, k] } else { [k, n] };
    let a = Tensor::randn(&ashape, 1.0, (m * 31 + k) as u64, dt, dev)?;
    let b = Tensor::randn(&bshape, 1.0, (n * 17 + k) as u64, dt, dev)?;
    let c = a.matmul_t(&b, ta, tb)?;
    assert_eq!(c.shape(), &[m, n]);
    assert_eq!(c.dtype(), dt);
    let want = matmul_f64(&a.to_vec_f32()?, &b.to_vec_f32()?, m, n, k, ta, tb);
    // Output rounding plus f32 accumulation error ~ sqrt(k) * eps32 relative to the row scale.
    let tol = eps(dt) * 2.0 + 1e-6 * (k as f32).sqrt();
    assert_close(
        &c.to_vec_f32()?,
        &want,
        tol,
        tol * (k as f32).sqrt(),
        &format!("matmul {dt} {m}x{n}x{k} t={ta}/{tb}"),
    );
    if dev.is_cuda() {
        // CUDA against the CPU backend on the same inputs.
        let cpu = a
            .to_device(Device::Cpu)?
            .matmul_t(&b.to_device(Device::Cpu)?, ta, tb)?;
        assert_close_scaled(
            &c.to_vec_f32()?,
            &cpu.to_vec_f32()?,
            2.0 * eps(dt),
            "cuda vs cpu matmul",
        );
    }
    Ok(())
}

fn matmul(dev: Device) -> Result<()> {
    for &dt in &FLOATS {
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (7, 5, 3),
            (33, 17, 65),
            (128, 64, 256),
            (5, 3, 0),
        ] {
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                matmul_case(dev, dt, m, n, k, ta, tb)?;
            }
        }
    }
    // Leading batch dimensions flatten into rows.
    let x = Tensor::randn(&[2, 3, 8], 1.0, 3, DType::F32, dev)?;
    let w = Tensor::randn(&[8, 5], 1.0, 4, DType::F32, dev)?;
    assert_eq!(x.matmul(&w)?.shape(), &[2, 3, 5]);
    Ok(())
}

fn transfers(dev: Device) -> Result<()> {
    let v: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 - 7.0).collect();
    let t = Tensor::from_slice(&v, &[7, 11, 13], dev)?;
    assert_eq!(t.to_vec::<f32>()?, v);
    assert_eq!(t.to_device(Device::Cpu)?.to_device(dev)?.to_vec::<f32>()?, v);
    let bytes: Vec<u8> = (0..=255).collect();
    let u = Tensor::from_slice(&bytes, &[16, 16], dev)?;
    assert_eq!(u.to_vec::<u8>()?, bytes);
    assert_eq!(u.to_bytes()?, bytes);
    let z = Tensor::zeros(&[3, 0, 2], DType::BF16, dev)?;
    assert_eq!(z.numel(), 0);
    assert_eq!(z.to_vec::<bf16>()?, Vec::<bf16>::new());
    let z = Tensor::zeros(&[4, 4], DType::F16, dev)?;
    assert!(z.to_vec_f32()?.iter().all(|&x| x == 0.0));
    let r = Tensor::randn(&[64], 1.0, 42, DType::F32, dev)?;
    assert_eq!(
        r.to_vec::<f32>()?,
        Tensor::randn(&[64], 1.0, 42, DType::F32, Device::Cpu)?.to_vec::<f32>()?
    );
    Ok(())
}

fn bad_input_is_an_error(dev: Device) -> Result<()> {
    let a = Tensor::randn(&[3, 4], 1.0, 0, DType::F32, dev)?;
    let b = Tensor::randn(&[4, 3], 1.0, 0, DType::F32, dev)?;
    let h = a.to_dtype(DType::F16)?;
    let u = Tensor::zeros(&[3, 4], DType::U8, dev)?;
    let is_shape = |r: Result<Tensor>| matches!(r, Err(Error::Shape { .. }));
    let is_dtype = |r: Result<Tensor>| matches!(r, Err(Error::DType { .. }));
    assert!(is_shape(a.add(&b)));
    assert!(is_shape(a.sub(&b)));
    assert!(is_shape(a.mul(&b)));
    assert!(is_dtype(a.add(&h)));
    assert!(is_shape(a.matmul(&a)));
    assert!(is_shape(a.matmul_t(&b, false, true)));
    assert!(is_dtype(a.matmul(&b.to_dtype(DType::BF16)?)));
    assert!(is_dtype(u.matmul(&u)));
    assert!(is_shape(a.matmul_t(
        &Tensor::zeros(&[2, 3, 4], DType::F32, dev)?,
        true,
        false
    )));
    assert!(is_shape(a.reshape(&[5])));
    assert!(is_shape(Tensor::randn(&[2, 2, 2], 1.0, 0, DType::F32, dev)?.t()));
    assert!(is_dtype(u.to_dtype(DType::F32)));
    assert!(is_dtype(u.scale(2.0)));
    assert!(is_dtype(u.row_sums()));
    assert!(matches!(a.to_vec::<f16>(), Err(Error::DType { .. })));
    assert!(matches!(a.to_scalar(), Err(Error::Shape { .. })));
    assert!(is_shape(Tensor::from_slice(&[1f32, 2.0, 3.0], &[2, 2], dev)));
    assert!(matches!(
        Tensor::from_bytes(&[1, 2, 3], DType::F32, &[1], dev),
        Err(Error::Format { .. })
    ));
    assert!(matches!(
        Tensor::rand(&[2], 1.0, 0.0, 0, DType::F32, dev),
        Err(Error::InvalidArgument(_))
    ));
    let mut c = a.clone();
    assert!(c.add_scaled_(&b, 1.0).is_err());
    assert!(c.add_scaled_(&h.reshape(&[3, 4])?, 1.0).is_err());
    Ok(())
}

fn dropout(dev: Device) -> Result<()> {
    for &dt in &FLOATS {
        let x = Tensor::randn(&[67, 129], 1.0, 21, dt, dev)?;
        let xv = x.to_vec_f32()?;
        assert_eq!(x.dropout(0.0, 5)?.to_vec_f32()?, xv);
        for &p in &[0.1f32, 0.5, 0.9] {
            let y = x.dropout(p, 1234)?;
            let yv = y.to_vec_f32()?;
            // Same seed, same mask, on any device; another seed, another mask.
            assert_eq!(yv, x.dropout(p, 1234)?.to_vec_f32()?);
            assert_ne!(yv, x.dropout(p, 1235)?.to_vec_f32()?);
            let threshold = (p as f64 * 4_294_967_296.0).round() as u64;
            let mut kept = 0usize;
            for (i, (&a, &b)) in xv.iter().zip(&yv).enumerate() {
                let keep = peft_kernels::tensor::dropout_hash(1234, i as u64) as u64 >= threshold;
                let want = if keep { a * (1.0 / (1.0 - p)) } else { 0.0 };
                assert_eq!(b, round_to(&[want], dt)[0], "dropout {dt} p={p} index {i}");
                kept += keep as usize;
            }
            let frac = kept as f32 / xv.len() as f32;
            assert!((frac - (1.0 - p)).abs() < 0.03, "kept fraction {frac} for p={p}");
        }
        assert!(matches!(x.dropout(1.0, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(x.dropout(-0.1, 0), Err(Error::InvalidArgument(_))));
    }
    Ok(())
}

device_test!(dropout);
device_test!(
    casts,
    elementwise,
    affine_and_axpy_round_twice,
    reductions,
    transpose,
    matmul,
    transfers,
    bad_input_is_an_error
);

#[test]
fn missing_cuda_device_is_an_error() {
    let n = peft_kernels::cuda_device_count();
    let dev = Device::Cuda(n + 3);
    assert!(matches!(
        Tensor::zeros(&[2], DType::F32, dev),
        Err(Error::CudaUnavailable(_))
    ));
    assert!(matches!(dev.check(), Err(Error::CudaUnavailable(_))));
    assert!("cuda:x".parse::<Device>().is_err());
    assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random odd shapes and transposes against f64, on every device present.
    #[test]
    fn matmul_random_shapes(m in 1usize..70, n in 1usize..70, k in 1usize..150, ta: bool, tb: bool, dt in 0usize..3) {
        let dt = FLOATS[dt];
        matmul_case(Device::Cpu, dt, m, n, k, ta, tb).unwrap();
        if peft_kernels::cuda_device_count() > 0 {
            matmul_case(Device::Cuda(0), dt, m, n, k, ta, tb).unwrap();
        }
    }
}
