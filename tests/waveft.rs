//! WaveFT: torch-exact positions, PEFT parity (forward, merge, gradients), the sparse kernels against a
//! dense f64 oracle, finite differences, CUDA against CPU, and input validation.

mod common;

use common::{assert_close, matmul_f64};
use peft_kernels::adapters::waveft::{
    SPECTRUM_KEY, WaveFtConfig, WaveFtLayer, WaveFtPositions, randperm_prefix, randperm_torch,
    waveft_backward, waveft_forward, waveft_n_frequencies, wavelet_filters,
};
use peft_kernels::io::SafetensorsFile;
use peft_kernels::{DType, Device, Result, Tensor};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_sparse")
}

/// |a - e| <= rel·(|e| + max|e|): relative to the element, with a floor relative to the tensor's scale
/// (for entries that cancel to near zero).
#[track_caller]
fn close(actual: &[f32], expected: &[f32], rel: f32, what: &str) {
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_close(actual, expected, rel, rel * scale, what);
}

fn fnv1a64(v: &[i64]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

// ---------------------------------------------------------------- randperm

#[test]
fn randperm_matches_torch() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("randperm.json")).unwrap()).unwrap();
    let cases = j["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let n = c["n"].as_u64().unwrap() as usize;
        let seed = c["seed"].as_u64().unwrap();
        let first: Vec<i64> = c["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let full = randperm_torch(n, seed);
        assert_eq!(full[..first.len()], first[..], "n={n} seed={seed}: first entries");
        assert_eq!(
            fnv1a64(&full),
            c["fnv1a64"].as_str().unwrap(),
            "n={n} seed={seed}: whole permutation"
        );
        // The prefix path (sparse Fisher-Yates) gives the same entries.
        for k in [1, 7, first.len()] {
            assert_eq!(
                randperm_prefix(n, k, seed),
                first[..k.min(n)],
                "prefix n={n} k={k}"
            );
        }
    }
}

/// torch's second branch (n >= 2^32/20: inside-out shuffle with 64-bit draws) at its first n, and the
/// first branch at its last n. The prefix needs 2n = 429M Mersenne-Twister draws (about 2 s).
#[test]
fn randperm_large_branch_matches_torch() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("randperm.json")).unwrap()).unwrap();
    let big = j["big"].as_array().unwrap();
    assert_eq!(
        big.len(),
        2,
        "fixture lacks the large-n cases (regenerate without --skip-big)"
    );
    for c in big {
        let n = c["n"].as_u64().unwrap() as usize;
        let first: Vec<i64> = c["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(randperm_prefix(n, first.len(), 777), first, "n={n}");
    }
}

// ---------------------------------------------------------------- PEFT fixtures

struct Case {
    st: SafetensorsFile,
    adapter: SafetensorsFile,
    cfg: serde_json::Value,
}

fn case(name: &str) -> Case {
    let dir = fixtures();
    Case {
        st: SafetensorsFile::open(dir.join(format!("waveft_{name}.safetensors"))).unwrap(),
        adapter: SafetensorsFile::open(dir.join(format!("waveft_{name}/adapter_model.safetensors"))).unwrap(),
        cfg: serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("waveft_{name}/adapter_config.json"))).unwrap(),
        )
        .unwrap(),
    }
}

const LAYERS: [(&str, usize, usize); 3] = [("lin0", 20, 24), ("lin1", 15, 20), ("lin2", 9, 15)];

/// The layers PEFT built, reconstructed from adapter_config.json alone.
fn layers_from_config(c: &Case, dev: Device) -> Result<Vec<WaveFtLayer>> {
    let cfg = &c.cfg;
    assert_eq!(cfg["peft_type"], "WAVEFT");
    let base = WaveFtConfig {
        n_frequency: cfg["n_frequency"].as_u64().unwrap() as usize,
        scaling: cfg["scaling"].as_f64().unwrap() as f32,
        wavelet_family: cfg["wavelet_family"].as_str().unwrap().to_string(),
        use_idwt: cfg["use_idwt"].as_bool().unwrap(),
        random_loc_seed: cfg["random_loc_seed"].as_u64().unwrap(),
    };
    let pattern: BTreeMap<String, usize> = cfg["n_frequency_pattern"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
        .collect();
    let prop = cfg["proportional_parameters"].as_bool().unwrap();
    WaveFtLayer::for_modules(&LAYERS, &base, &pattern, prop, dev)
}

fn load(c: &Case, name: &str, dev: Device) -> Result<Tensor> {
    c.st.load(name, dev)
}

fn check_case(name: &str, dev: Device) -> Result<()> {
    let c = case(name);
    let layers = layers_from_config(&c, dev)?;
    for (layer, (lname, out, inp)) in layers.iter().zip(LAYERS) {
        let what = |s: &str| format!("{name}/{lname}: {s}");
        // Positions: PEFT's waveft_indices [2, n], bit for bit.
        let idx = load(&c, &format!("{lname}.indices"), Device::Cpu)?.to_vec::<i64>()?;
        let n = idx.len() / 2;
        assert_eq!(layer.config().n_frequency, n, "{}", what("n_frequency"));
        let (rows, cols) = layer.positions().coefficient_indices();
        assert_eq!(rows, &idx[..n], "{}", what("index rows"));
        assert_eq!(cols, &idx[n..], "{}", what("index cols"));

        // The spectrum from PEFT's adapter file.
        let key = format!("base_model.model.{lname}.{SPECTRUM_KEY}");
        let spectrum = layer
            .from_spectrum(&c.adapter.load(&key, Device::Cpu)?)?
            .to_device(dev)?;
        assert_eq!(
            spectrum.to_vec::<f32>()?,
            load(&c, &format!("{lname}.spectrum"), Device::Cpu)?.to_vec::<f32>()?
        );

        // Merge: ΔW and W + ΔW.
        let w = load(&c, &format!("{lname}.weight"), dev)?;
        let delta = layer.delta_weight(&spectrum)?;
        assert_eq!(delta.shape(), &[out, inp]);
        let peft_delta = load(&c, &format!("{lname}.delta"), Device::Cpu)?.to_vec::<f32>()?;
        close(&delta.to_vec::<f32>()?, &peft_delta, 1e-5, &what("delta weight"));
        let merged = w.add(&delta)?;
        close(
            &merged.to_vec::<f32>()?,
            &load(&c, &format!("{lname}.merged"), Device::Cpu)?.to_vec::<f32>()?,
            1e-5,
            &what("merged weight"),
        );

        // Forward: y = x·Wᵀ + x·ΔWᵀ through the sparse kernel.
        let x = load(&c, &format!("{lname}.x"), dev)?;
        let base = x.matmul_t(&w, false, true)?;
        let mut y = base.clone();
        layer.forward_delta_add(&x, &spectrum, &mut y)?;
        let peft_y = load(&c, &format!("{lname}.y"), Device::Cpu)?.to_vec::<f32>()?;
        close(&y.to_vec::<f32>()?, &peft_y, 1e-5, &what("forward"));
        let y2 = base.add(&layer.forward_delta(&x, &spectrum)?)?;
        close(
            &y2.to_vec::<f32>()?,
            &peft_y,
            1e-5,
            &what("forward (separate delta)"),
        );

        // Backward: dspectrum and dx = dy·W + dy·ΔW against PEFT's autograd.
        let dy = load(&c, &format!("{lname}.dy"), dev)?;
        let (dx, ds) = layer.backward_delta(&x, &dy, &spectrum, true)?;
        close(
            &ds.to_vec::<f32>()?,
            &load(&c, &format!("{lname}.dspectrum"), Device::Cpu)?.to_vec::<f32>()?,
            1e-5,
            &what("dspectrum"),
        );
        let dx_full = dy.matmul(&w)?.add(&dx.expect("need_dx"))?;
        let peft_dx = load(&c, &format!("{lname}.dx"), Device::Cpu)?.to_vec::<f32>()?;
        close(&dx_full.to_vec::<f32>()?, &peft_dx, 1e-5, &what("dx"));
        let mut dx_acc = dy.matmul(&w)?;
        let ds2 = layer.backward_delta_add_dx(&x, &dy, &spectrum, &mut dx_acc)?;
        close(
            &dx_acc.to_vec::<f32>()?,
            &peft_dx,
            1e-5,
            &what("dx (accumulated)"),
        );
        assert_eq!(
            ds2.to_vec::<f32>()?,
            ds.to_vec::<f32>()?,
            "{}",
            what("dspectrum is deterministic")
        );
    }
    Ok(())
}

fn peft_db1(dev: Device) -> Result<()> {
    check_case("db1", dev)
}
fn peft_noidwt(dev: Device) -> Result<()> {
    check_case("noidwt", dev)
}
fn peft_sym2(dev: Device) -> Result<()> {
    check_case("sym2", dev)
}
fn peft_db3(dev: Device) -> Result<()> {
    check_case("db3", dev)
}
fn peft_coif1(dev: Device) -> Result<()> {
    check_case("coif1", dev)
}
fn peft_proportional(dev: Device) -> Result<()> {
    check_case("prop", dev)
}
device_test!(
    peft_db1,
    peft_noidwt,
    peft_sym2,
    peft_db3,
    peft_coif1,
    peft_proportional
);

#[test]
fn budgets_follow_peft() -> Result<()> {
    let mods = [
        ("model.layers.0.q_proj", 4096, 4096),
        ("model.layers.0.v_proj", 1024, 4096),
        ("lm.x", 7, 3),
    ];
    let none = BTreeMap::new();
    assert_eq!(
        waveft_n_frequencies(&mods, 100, &none, false)?,
        vec![100, 100, 100]
    );
    let mut pat = BTreeMap::new();
    pat.insert("v_proj".to_string(), 7);
    pat.insert(r"layers\.0\.q_.*".to_string(), 9);
    assert_eq!(waveft_n_frequencies(&mods, 100, &pat, false)?, vec![9, 7, 100]);
    // Proportional: budget 300 split by out·in; Python's round() (half to even), at least 1.
    let p = waveft_n_frequencies(&mods, 100, &pat, true)?;
    let total = 4096.0 * 4096.0 + 1024.0 * 4096.0 + 21.0;
    let want: Vec<usize> = [4096.0 * 4096.0, 1024.0 * 4096.0, 21.0f64]
        .iter()
        .map(|s| ((s / total * 300.0f64).round_ties_even() as usize).max(1))
        .collect();
    assert_eq!(p, want);
    assert_eq!(p[2], 1);
    // Half-to-even: shares of exactly x.5 round to the even neighbour (2 layers of equal size, budget 5).
    let eq = [("a", 1, 1), ("b", 1, 1)];
    assert_eq!(waveft_n_frequencies(&eq, 1, &none, true)?, vec![1, 1]); // 0.5 -> 0 -> max 1
    assert!(waveft_n_frequencies(&[], 5, &none, true).is_err());
    pat.insert("(".into(), 1);
    assert!(waveft_n_frequencies(&mods, 5, &pat, false).is_err());
    Ok(())
}

// ---------------------------------------------------------------- dense oracle (PEFT's algorithm)

/// PEFT's get_delta_weight written out literally in f64: pad to even, place the spectrum centred,
/// split quadrants, conv_transpose2d(stride 2) with [ll, lh, hl, hh], waverec2d's crop, centre crop.
fn peft_dense_delta(
    out: usize,
    inp: usize,
    rows: &[i64],
    cols: &[i64],
    spec: &[f32],
    scaling: f32,
    family: Option<&str>,
) -> Vec<f64> {
    let Some(family) = family else {
        let mut d = vec![0f64; out * inp];
        for k in 0..rows.len() {
            d[rows[k] as usize * inp + cols[k] as usize] = spec[k] as f64 * scaling as f64;
        }
        return d;
    };
    let f = wavelet_filters(family).unwrap();
    let (lo, hi, taps, red) = (&f.rec_lo, &f.rec_hi, f.rec_lo.len(), f.reduction);
    let (mut ph, mut pw) = (out + red, inp + red);
    ph += ph % 2;
    pw += pw % 2;
    let (ro, co) = ((ph - out) / 2, (pw - inp) / 2);
    let mut grid = vec![0f64; ph * pw];
    for k in 0..rows.len() {
        grid[(rows[k] as usize + ro) * pw + cols[k] as usize + co] = spec[k] as f64;
    }
    let (h2, w2) = (ph / 2, pw / 2);
    // filters [c][ky][kx]: ll = lo⊗lo, lh = hi⊗lo, hl = lo⊗hi, hh = hi⊗hi (outer(a, b)[p][q] = a[p]·b[q])
    let pairs = [(lo, lo), (hi, lo), (lo, hi), (hi, hi)];
    let (fh, fw) = ((h2 - 1) * 2 + taps, (w2 - 1) * 2 + taps);
    let mut full = vec![0f64; fh * fw];
    for (c, (a, b)) in pairs.iter().enumerate() {
        let (qy, qx) = (c / 2, c % 2); // cA (0,0), cH (0,1) top-right, cV (1,0), cD (1,1)
        for i in 0..h2 {
            for j in 0..w2 {
                let v = grid[(qy * h2 + i) * pw + qx * w2 + j];
                if v == 0.0 {
                    continue;
                }
                for ky in 0..taps {
                    for kx in 0..taps {
                        full[(2 * i + ky) * fw + 2 * j + kx] += v * a[ky] * b[kx];
                    }
                }
            }
        }
    }
    let pad = (2 * taps - 3) / 2;
    let (ch, cw) = (fh - 2 * pad, fw - 2 * pad);
    assert!(ch >= out && cw >= inp);
    let (sr, sc) = ((ch - out) / 2, (cw - inp) / 2);
    let mut d = vec![0f64; out * inp];
    for y in 0..out {
        for x in 0..inp {
            d[y * inp + x] = full[(y + pad + sr) * fw + x + pad + sc] * scaling as f64;
        }
    }
    d
}

const FAMILIES: [&str; 8] = ["db1", "db2", "db5", "sym2", "sym7", "coif1", "coif4", "db10"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The precomputed structure, the merge path and PEFT's literal algorithm agree on random shapes.
    #[test]
    fn structure_matches_peft_algorithm(
        out in 1usize..23, inp in 1usize..23, fam in 0usize..9, seed in 0u64..1000, frac in 0.01f64..1.0,
    ) {
        let n = ((out * inp) as f64 * frac).ceil() as usize;
        let family = FAMILIES.get(fam).copied();
        let cfg = WaveFtConfig {
            n_frequency: n,
            scaling: 1.7,
            wavelet_family: family.unwrap_or("db1").into(),
            use_idwt: family.is_some(),
            random_loc_seed: seed,
        };
        let pos = WaveFtPositions::new(out, inp, &cfg, Device::Cpu).unwrap();
        let spec: Vec<f32> = (0..n).map(|k| ((k * 7919 + 13) % 101) as f32 / 50.0 - 1.0).collect();
        let (rows, cols) = pos.coefficient_indices();
        let want = peft_dense_delta(out, inp, rows, cols, &spec, 1.7, family);
        // Structure entries summed densely (f64).
        let mut got = vec![0f64; out * inp];
        for e in pos.entries() {
            got[e.row * inp + e.col] += e.weight as f64 * spec[e.coef] as f64 * 1.7;
        }
        let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        for i in 0..want.len() {
            prop_assert!((got[i] - want[i]).abs() <= 1e-6 * scale, "entries {i}: {} vs {}", got[i], want[i]);
        }
        // The merge path.
        let st = Tensor::from_vec(spec.clone(), &[n], Device::Cpu).unwrap();
        let d = peft_kernels::adapters::waveft::waveft_delta_weight(&pos, &st, 1.7).unwrap().to_vec::<f32>().unwrap();
        for i in 0..want.len() {
            prop_assert!((d[i] as f64 - want[i]).abs() <= 1e-6 * scale, "merge {i}");
        }
        // Haar touches at most 4 entries per coefficient; no IDWT exactly one.
        match family {
            Some("db1") => prop_assert!(pos.entries().len() <= 4 * n),
            None => prop_assert_eq!(pos.entries().len(), n),
            _ => {}
        }
    }
}

#[test]
fn haar_blocks_are_exact() -> Result<()> {
    // One coefficient per quadrant at the same (i, j): the 2x2 block holds ½(a±h±v±d) exactly.
    let (out, inp) = (6, 8);
    let (h2, w2) = (3, 4);
    let (i, j) = (1, 2);
    let rows = vec![i, i, h2 + i, h2 + i];
    let cols = vec![j, w2 + j, j, w2 + j];
    let cfg = WaveFtConfig {
        scaling: 1.0,
        ..Default::default()
    };
    let pos = WaveFtPositions::from_indices(out, inp, rows, cols, &cfg, Device::Cpu)?;
    let (a, h, v, d) = (1.0f32, 2.0, 4.0, 8.0);
    let s = Tensor::from_vec(vec![a, h, v, d], &[4], Device::Cpu)?;
    let dw = peft_kernels::adapters::waveft::waveft_delta_weight(&pos, &s, 1.0)?.to_vec::<f32>()?;
    let at = |y: i64, x: i64| dw[(y * inp as i64 + x) as usize];
    let (y0, x0) = (2 * i, 2 * j);
    assert_eq!(at(y0, x0), 0.5 * (a + h + v + d));
    assert_eq!(at(y0, x0 + 1), 0.5 * (a + h - v - d));
    assert_eq!(at(y0 + 1, x0), 0.5 * (a - h + v - d));
    assert_eq!(at(y0 + 1, x0 + 1), 0.5 * (a - h - v + d));
    assert_eq!(dw.iter().filter(|x| **x != 0.0).count(), 4);
    assert_eq!(pos.nnz(), 4);
    assert!(pos.entries().iter().all(|e| e.weight.abs() == 0.5));
    // Odd layer: PEFT pads to even and crops the last row/column, dropping half of a border block.
    let pos = WaveFtPositions::from_indices(5, 7, vec![2], vec![3], &cfg, Device::Cpu)?;
    // cA at (2, 3) of the padded 6x8 grid would touch rows 4-5 and cols 6-7; row 5 and col 7 are cropped.
    let e = pos.entries();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].row, e[0].col, e[0].coef, e[0].weight), (4, 6, 0, 0.5));
    Ok(())
}

// ---------------------------------------------------------------- kernels vs the dense oracle

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = peft_kernels::rng::Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// Sparse forward/backward on `dev` against dense ΔW (f64) and plain matmuls.
fn sparse_vs_dense(
    dev: Device,
    out: usize,
    inp: usize,
    tokens: usize,
    family: Option<&str>,
    n: usize,
    seed: u64,
) -> Result<()> {
    let cfg = WaveFtConfig {
        n_frequency: n,
        scaling: 3.0,
        wavelet_family: family.unwrap_or("db1").into(),
        use_idwt: family.is_some(),
        random_loc_seed: seed,
    };
    let pos = WaveFtPositions::new(out, inp, &cfg, dev)?;
    let spec = rand_vec(n, seed + 1);
    let x = rand_vec(tokens * inp, seed + 2);
    let dy = rand_vec(tokens * out, seed + 3);
    let (rows, cols) = pos.coefficient_indices();
    let dw: Vec<f32> = peft_dense_delta(out, inp, rows, cols, &spec, 3.0, family)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let st = Tensor::from_vec(spec.clone(), &[n], dev)?;
    let xt = Tensor::from_vec(x.clone(), &[tokens, inp], dev)?;
    let dyt = Tensor::from_vec(dy.clone(), &[tokens, out], dev)?;
    let what = format!("[{out}x{inp}] T={tokens} {family:?} n={n}");
    // y = x·ΔWᵀ
    let y = waveft_forward(&pos, &xt, &st, 3.0)?;
    close(
        &y.to_vec::<f32>()?,
        &matmul_f64(&x, &dw, tokens, out, inp, false, true),
        1e-5,
        &format!("{what} forward"),
    );
    // dx = dy·ΔW; dΔW = dyᵀ·x, dspectrum = scaling · Σ w · dΔW[pos] (from the entries, in f64).
    let (dx, ds) = waveft_backward(&pos, &xt, &dyt, &st, 3.0, true)?;
    close(
        &dx.unwrap().to_vec::<f32>()?,
        &matmul_f64(&dy, &dw, tokens, inp, out, false, false),
        1e-5,
        &format!("{what} dx"),
    );
    let gw = matmul_f64(&dy, &x, out, inp, tokens, true, false);
    let mut want = vec![0f64; n];
    for e in pos.entries() {
        want[e.coef] += 3.0 * e.weight as f64 * gw[e.row * inp + e.col] as f64;
    }
    let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
    close(&ds.to_vec::<f32>()?, &want, 1e-5, &format!("{what} dspectrum"));
    // need_dx = false gives the same dspectrum and no dx.
    let (none, ds2) = waveft_backward(&pos, &xt, &dyt, &st, 3.0, false)?;
    assert!(none.is_none());
    assert_eq!(ds2.to_vec::<f32>()?, ds.to_vec::<f32>()?);
    Ok(())
}

fn kernels_vs_dense(dev: Device) -> Result<()> {
    // Token counts around the 16-token block and the backward partitioning; odd shapes; all-zero rows.
    for (i, &(out, inp, tokens, fam, n)) in [
        (1, 1, 1, Some("db1"), 1),
        (7, 5, 17, Some("db1"), 9),
        (33, 19, 31, Some("db1"), 200),
        (16, 16, 16, None, 256),
        (9, 15, 40, Some("sym2"), 30),
        (20, 11, 3, Some("coif2"), 20),
        (64, 48, 1030, Some("db1"), 300),
        (5, 300, 2, Some("db1"), 3),
    ]
    .iter()
    .enumerate()
    {
        sparse_vs_dense(dev, out, inp, tokens, fam, n, 100 + i as u64)?;
    }
    Ok(())
}
device_test!(kernels_vs_dense);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn kernels_vs_dense_random(
        out in 1usize..40, inp in 1usize..40, tokens in 1usize..70, fam in 0usize..4, frac in 0.0f64..0.6,
        seed in 0u64..10_000,
    ) {
        let n = ((out * inp) as f64 * frac).ceil().max(1.0) as usize;
        let family = [Some("db1"), None, Some("db2"), Some("sym3")][fam];
        sparse_vs_dense(Device::Cpu, out, inp, tokens, family, n, seed).unwrap();
    }
}

// ---------------------------------------------------------------- finite differences

/// L(s, x) = Σ R ⊙ (x·ΔW(s)ᵀ) is bilinear, so central differences with a unit step are exact up to
/// rounding: check our analytic dspectrum and dx against them.
fn finite_differences(dev: Device) -> Result<()> {
    let (out, inp, t, n) = (13, 10, 9, 25);
    let layer = WaveFtLayer::new(
        out,
        inp,
        &WaveFtConfig {
            n_frequency: n,
            ..Default::default()
        },
        dev,
    )?;
    let s = Tensor::from_vec(rand_vec(n, 1), &[n], dev)?;
    let x = Tensor::from_vec(rand_vec(t * inp, 2), &[t, inp], dev)?;
    let r = rand_vec(t * out, 3);
    let rt = Tensor::from_vec(r.clone(), &[t, out], dev)?;
    let loss = |x: &Tensor, s: &Tensor| -> Result<f64> {
        let y = layer.forward_delta(x, s)?.to_vec::<f32>()?;
        Ok(y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum())
    };
    let (dx, ds) = layer.backward_delta(&x, &rt, &s, true)?;
    let (dx, ds) = (dx.unwrap().to_vec::<f32>()?, ds.to_vec::<f32>()?);
    let sv = s.to_vec::<f32>()?;
    for k in [0, 3, 11, n - 1] {
        let mut p = sv.clone();
        p[k] += 1.0;
        let lp = loss(&x, &Tensor::from_vec(p.clone(), &[n], dev)?)?;
        p[k] -= 2.0;
        let lm = loss(&x, &Tensor::from_vec(p, &[n], dev)?)?;
        let fd = (lp - lm) / 2.0;
        assert!(
            (fd - ds[k] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
            "dspectrum[{k}]: fd {fd} vs {}",
            ds[k]
        );
    }
    let xv = x.to_vec::<f32>()?;
    for i in [0, 5, 44, t * inp - 1] {
        let mut p = xv.clone();
        p[i] += 1.0;
        let lp = loss(&Tensor::from_vec(p.clone(), &[t, inp], dev)?, &s)?;
        p[i] -= 2.0;
        let lm = loss(&Tensor::from_vec(p, &[t, inp], dev)?, &s)?;
        let fd = (lp - lm) / 2.0;
        assert!(
            (fd - dx[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
            "dx[{i}]: fd {fd} vs {}",
            dx[i]
        );
    }
    Ok(())
}
device_test!(finite_differences);

// ---------------------------------------------------------------- dtypes, devices, determinism

fn half_precision(dev: Device) -> Result<()> {
    let (out, inp, t) = (24, 40, 21);
    let layer = WaveFtLayer::new(
        out,
        inp,
        &WaveFtConfig {
            n_frequency: 100,
            ..Default::default()
        },
        dev,
    )?;
    let s = Tensor::from_vec(rand_vec(100, 4), &[100], dev)?;
    for dt in [DType::F16, DType::BF16] {
        let x = Tensor::randn(&[3, 7, inp], 1.0, 5, dt, dev)?;
        let dy = Tensor::randn(&[3, 7, out], 1.0, 6, dt, dev)?;
        let y = layer.forward_delta(&x, &s)?;
        assert_eq!((y.dtype(), y.shape()), (dt, &[3, 7, out][..]));
        // Same math on the exactly widened inputs, rounded once at the end.
        let y32 = layer.forward_delta(&x.to_dtype(DType::F32)?, &s)?;
        let tol = if dt == DType::F16 { 1e-3 } else { 8e-3 };
        close(
            &y.to_vec_f32()?,
            &y32.to_dtype(dt)?.to_vec_f32()?,
            tol,
            "half forward",
        );
        let (dx, ds) = layer.backward_delta(&x, &dy, &s, true)?;
        let (dx32, ds32) =
            layer.backward_delta(&x.to_dtype(DType::F32)?, &dy.to_dtype(DType::F32)?, &s, true)?;
        assert_eq!(dx.as_ref().unwrap().dtype(), dt);
        close(
            &dx.unwrap().to_vec_f32()?,
            &dx32.unwrap().to_dtype(dt)?.to_vec_f32()?,
            tol,
            "half dx",
        );
        close(
            &ds.to_vec::<f32>()?,
            &ds32.to_vec::<f32>()?,
            1e-5,
            "half dspectrum",
        );
        let _ = t;
    }
    Ok(())
}
device_test!(half_precision);

fn cuda_matches_cpu(dev: Device) -> Result<()> {
    // On the CPU this compares the CPU with itself (trivially); with a GPU it is the kernel check.
    for (out, inp, t, fam) in [
        (130, 77, 45, Some("db1")),
        (64, 96, 200, None),
        (33, 21, 5, Some("sym4")),
    ] {
        let cfg = WaveFtConfig {
            n_frequency: 600.min(out * inp),
            wavelet_family: fam.unwrap_or("db1").into(),
            use_idwt: fam.is_some(),
            ..Default::default()
        };
        let cpu = WaveFtLayer::new(out, inp, &cfg, Device::Cpu)?;
        let gpu = cpu.to_device(dev)?;
        let s = Tensor::from_vec(rand_vec(cfg.n_frequency, 7), &[cfg.n_frequency], Device::Cpu)?;
        for dt in [DType::F32, DType::BF16] {
            let x = Tensor::randn(&[t, inp], 1.0, 8, dt, Device::Cpu)?;
            let dy = Tensor::randn(&[t, out], 1.0, 9, dt, Device::Cpu)?;
            let y = cpu.forward_delta(&x, &s)?.to_vec_f32()?;
            let yg = gpu
                .forward_delta(&x.to_device(dev)?, &s.to_device(dev)?)?
                .to_vec_f32()?;
            let tol = if dt == DType::F32 { 1e-5 } else { 8e-3 };
            close(&yg, &y, tol, "device forward");
            let (dx, ds) = cpu.backward_delta(&x, &dy, &s, true)?;
            let (dxg, dsg) =
                gpu.backward_delta(&x.to_device(dev)?, &dy.to_device(dev)?, &s.to_device(dev)?, true)?;
            close(
                &dxg.unwrap().to_vec_f32()?,
                &dx.unwrap().to_vec_f32()?,
                tol,
                "device dx",
            );
            close(
                &dsg.to_vec::<f32>()?,
                &ds.to_vec::<f32>()?,
                1e-4,
                "device dspectrum",
            );
            let dw = gpu.delta_weight(&s.to_device(dev)?)?;
            assert_eq!(dw.device(), dev);
            assert_eq!(dw.to_vec::<f32>()?, cpu.delta_weight(&s)?.to_vec::<f32>()?);
        }
    }
    Ok(())
}
device_test!(cuda_matches_cpu);

#[test]
fn backward_is_deterministic() -> Result<()> {
    let layer = WaveFtLayer::new(
        96,
        80,
        &WaveFtConfig {
            n_frequency: 900,
            ..Default::default()
        },
        Device::Cpu,
    )?;
    let s = Tensor::randn(&[900], 1.0, 1, DType::F32, Device::Cpu)?;
    let x = Tensor::randn(&[1500, 80], 1.0, 2, DType::F32, Device::Cpu)?;
    let dy = Tensor::randn(&[1500, 96], 1.0, 3, DType::F32, Device::Cpu)?;
    let (_, a) = layer.backward_delta(&x, &dy, &s, false)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (_, b) = pool.install(|| layer.backward_delta(&x, &dy, &s, false))?;
    assert_eq!(
        a.to_vec::<f32>()?,
        b.to_vec::<f32>()?,
        "thread count must not change the result"
    );
    Ok(())
}

// ---------------------------------------------------------------- errors

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = |n: usize, fam: &str, idwt: bool| WaveFtConfig {
        n_frequency: n,
        wavelet_family: fam.into(),
        use_idwt: idwt,
        ..Default::default()
    };
    assert!(
        WaveFtLayer::new(4, 5, &cfg(0, "db1", true), dev).is_err(),
        "n_frequency == 0"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(21, "db1", true), dev).is_err(),
        "n_frequency > out*in"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(20, "db1", true), dev).is_ok(),
        "n_frequency == out*in"
    );
    assert!(
        WaveFtLayer::new(0, 5, &cfg(1, "db1", true), dev).is_err(),
        "zero dim"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(3, "coif5", true), dev).is_err(),
        "coif5 (broken in PEFT)"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(3, "db11", true), dev).is_err(),
        "db11 has no filters"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(3, "db11", false), dev).is_ok(),
        "without IDWT PEFT accepts db11"
    );
    assert!(
        WaveFtLayer::new(4, 5, &cfg(3, "haar", false), dev).is_err(),
        "haar is not a PEFT family name"
    );
    assert!(WaveFtLayer::new(4, 5, &cfg(3, "db01", false), dev).is_err());
    let bad_scale = WaveFtConfig {
        scaling: f32::NAN,
        ..cfg(3, "db1", true)
    };
    assert!(WaveFtLayer::new(4, 5, &bad_scale, dev).is_err());
    assert!(
        WaveFtPositions::from_indices(4, 5, vec![0, 0], vec![1, 1], &cfg(2, "db1", true), dev).is_err(),
        "duplicate index"
    );
    assert!(WaveFtPositions::from_indices(4, 5, vec![4], vec![0], &cfg(1, "db1", true), dev).is_err());

    let layer = WaveFtLayer::new(6, 8, &cfg(10, "db1", true), dev)?;
    let s = Tensor::zeros(&[10], DType::F32, dev)?;
    let x = Tensor::zeros(&[3, 8], DType::F32, dev)?;
    assert!(
        layer
            .forward_delta(&Tensor::zeros(&[3, 7], DType::F32, dev)?, &s)
            .is_err(),
        "x width"
    );
    assert!(
        layer
            .forward_delta(&x, &Tensor::zeros(&[9], DType::F32, dev)?)
            .is_err(),
        "spectrum length"
    );
    assert!(
        layer
            .forward_delta(&x, &Tensor::zeros(&[10], DType::F16, dev)?)
            .is_err(),
        "spectrum dtype"
    );
    assert!(
        layer
            .forward_delta(&Tensor::zeros(&[3, 8], DType::I32, dev)?, &s)
            .is_err(),
        "int x"
    );
    let dy = Tensor::zeros(&[3, 6], DType::F32, dev)?;
    assert!(
        layer
            .backward_delta(&x, &Tensor::zeros(&[2, 6], DType::F32, dev)?, &s, true)
            .is_err(),
        "dy rows"
    );
    assert!(
        layer
            .backward_delta(&x, &dy.to_dtype(DType::BF16)?, &s, true)
            .is_err(),
        "dy dtype"
    );
    let mut y = Tensor::zeros(&[3, 5], DType::F32, dev)?;
    assert!(layer.forward_delta_add(&x, &s, &mut y).is_err(), "y width");
    let mut dx = Tensor::zeros(&[3, 7], DType::F32, dev)?;
    assert!(
        layer.backward_delta_add_dx(&x, &dy, &s, &mut dx).is_err(),
        "dx shape"
    );
    assert!(
        layer
            .from_spectrum(&Tensor::zeros(&[11], DType::F32, dev)?)
            .is_err()
    );
    // Zero spectrum: an identity adapter.
    assert!(
        layer
            .forward_delta(&x, &layer.init_spectrum(true, 0)?)?
            .to_vec::<f32>()?
            .iter()
            .all(|v| *v == 0.0)
    );
    Ok(())
}
