//! `peftk` through the real binary: file safety (device nodes, symlinks, permissions, same-file,
//! signals, stale temp files), no silent drops, actionable errors, `inspect` hardening, flag
//! validation and documentation. Unix only (device nodes, modes, signals).
#![cfg(target_os = "linux")]

use assert_cmd::Command;
use peft_kernels::io::{SafetensorsFile, TensorBytes, write_safetensors};
use peft_kernels::quant::io as qio;
use peft_kernels::quant::{QuantizeOptions, QuantizedTensor};
use peft_kernels::{DType, Device, Tensor};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn model_fp() -> PathBuf {
    fixture("bnb/model_fp.safetensors")
}

fn model_nf4() -> PathBuf {
    fixture("bnb/model_nf4.safetensors")
}

fn peftk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peftk"))
}

/// Runs `peftk ARGS` and returns (exit code, stdout, stderr).
fn run<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let o: Output = peftk()
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn temps_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".peftk-tmp"))
        .map(|e| e.path())
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn mknod_null(p: &Path) -> bool {
    std::process::Command::new("mknod")
        .args(["-m", "666"])
        .arg(p)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A minimal adapter directory (a copy of the LoRA fixture).
fn copy_adapter(to: &Path) -> PathBuf {
    let src = fixture("peft/lora/adapter");
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

fn lora_base() -> PathBuf {
    fixture("peft/lora/base.safetensors")
}

// ------------------------------------------------------------------------------------ destinations

#[test]
fn device_node_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("mynull");
    if !mknod_null(&dev) {
        println!("SKIPPED (mknod not permitted)");
        return;
    }
    let q = dir.path().join("q.safetensors");
    assert_eq!(
        run(["quantize".as_ref(), model_fp().as_os_str(), q.as_os_str()]).0,
        0
    );
    let adapter = fixture("peft/lora/adapter");
    for args in [
        vec![
            "quantize".into(),
            model_fp().into_os_string(),
            dev.clone().into_os_string(),
        ],
        vec![
            "dequantize".into(),
            q.clone().into_os_string(),
            dev.clone().into_os_string(),
        ],
        vec![
            "merge".into(),
            "--base".into(),
            lora_base().into_os_string(),
            "--adapter".into(),
            adapter.into_os_string(),
            "--out".into(),
            dev.clone().into_os_string(),
        ],
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("character device") && err.contains("refusing"),
            "{err}"
        );
        let m = std::fs::metadata(&dev).unwrap();
        assert!(
            m.file_type().is_char_device(),
            "{args:?} replaced the device node"
        );
    }
    // A directory (and `.`) as output: "is a directory", not EBUSY.
    for out in [dir.path().to_path_buf(), PathBuf::from(".")] {
        let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), out.as_os_str()]);
        assert_eq!(code, 1);
        assert!(err.contains("is a directory"), "{err}");
    }
    // A FIFO as output.
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), fifo.as_os_str()]);
    assert_eq!(code, 1);
    assert!(err.contains("FIFO"), "{err}");
    assert!(temps_in(dir.path()).is_empty());
}

#[test]
fn symlink_outputs_are_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.safetensors");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("real.safetensors", &link).unwrap();
    let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), link.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    let f = SafetensorsFile::open(&real).unwrap();
    assert_eq!(qio::quantized_names(&f).len(), 2);
    // A dangling symlink: its target is created.
    let dangling = dir.path().join("dangling.safetensors");
    std::os::unix::fs::symlink("sub/new.safetensors", &dangling).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), dangling.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(dir.path().join("sub/new.safetensors").is_file());
    assert!(temps_in(dir.path()).is_empty() && temps_in(&dir.path().join("sub")).is_empty());
}

#[test]
fn new_files_honour_the_umask_and_replaced_files_keep_their_mode() {
    let dir = tempfile::tempdir().unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_peftk"));
    let with_umask = |umask: &str, out: &Path| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(&exe)
            .arg("quantize")
            .arg(model_fp())
            .arg(out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    };
    for (umask, want) in [("022", 0o644), ("027", 0o640), ("002", 0o664), ("077", 0o600)] {
        let out = dir.path().join(format!("new_{umask}.safetensors"));
        with_umask(umask, &out);
        assert_eq!(mode(&out), want, "umask {umask}");
    }
    // An existing 0664 file keeps 0664 even under umask 077; an unusual 0604 stays 0604.
    for keep in [0o664, 0o604] {
        let out = dir.path().join(format!("existing_{keep:o}.safetensors"));
        std::fs::write(&out, b"x").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(keep)).unwrap();
        with_umask("077", &out);
        assert_eq!(mode(&out), keep);
        assert!(SafetensorsFile::open(&out).is_ok());
    }
}

#[test]
fn an_output_that_is_an_input_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    std::fs::copy(model_fp(), &a).unwrap();
    let original = std::fs::read(&a).unwrap();
    let hard = dir.path().join("hard.safetensors");
    std::fs::hard_link(&a, &hard).unwrap();
    let soft = dir.path().join("soft.safetensors");
    std::os::unix::fs::symlink(&a, &soft).unwrap();
    let dotted = dir.path().join(".").join("a.safetensors");
    for out in [&a, &hard, &soft, &dotted] {
        let (code, _, err) = run(["quantize".as_ref(), a.as_os_str(), out.as_os_str()]);
        assert_eq!(code, 1, "{out:?}");
        assert!(
            err.contains("same file as the input") && err.contains("--force"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), original);
    // dequantize A A.
    let q = dir.path().join("q.safetensors");
    std::fs::copy(model_nf4(), &q).unwrap();
    let (code, _, err) = run(["dequantize".as_ref(), q.as_os_str(), q.as_os_str()]);
    assert!(code == 1 && err.contains("same file"), "{err}");
    assert_eq!(std::fs::read(&q).unwrap(), std::fs::read(model_nf4()).unwrap());
    // merge --out ADAPTER/adapter_model.safetensors, and --out BASE.
    let adapter = copy_adapter(&dir.path().join("adapter"));
    let weights = adapter.join("adapter_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let base = dir.path().join("base.safetensors");
    std::fs::copy(lora_base(), &base).unwrap();
    for out in [&weights, &base] {
        let (code, _, err) = run([
            "merge".as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(code == 1 && err.contains("same file"), "{err}");
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    // --force: replaced only once complete, from the original contents.
    let (code, _, err) = run([
        "quantize".as_ref(),
        a.as_os_str(),
        a.as_os_str(),
        "--force".as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(qio::quantized_names(&SafetensorsFile::open(&a).unwrap()).len(), 2);
    // The hard link still holds the original (the rename made a new inode).
    assert_eq!(std::fs::read(&hard).unwrap(), original);
    assert!(temps_in(dir.path()).is_empty());
}

// ------------------------------------------------------------------------------------ signals

/// A 4-bit checkpoint whose dequantized output is `n` f32 tensors of `side * side` elements.
fn big_quantized(path: &Path, n: usize, side: usize) {
    let w = Tensor::randn(&[side, side], 1.0, 7, DType::F32, Device::Cpu).unwrap();
    let q = QuantizedTensor::quantize(&w, &QuantizeOptions::default()).unwrap();
    let mut entries = Vec::new();
    for i in 0..n {
        entries.extend(qio::to_safetensors_entries(&q, &format!("layers.{i}.weight")).unwrap());
    }
    write_safetensors(path, &entries, None).unwrap();
}

/// Starts `peftk dequantize IN OUT`, waits for its temp file to appear, sends `signal`; returns the exit
/// status and whether the temp file was seen.
fn interrupt(input: &Path, out: &Path, signal: &str) -> (std::process::ExitStatus, bool) {
    let dir = out.parent().unwrap();
    let mut child = std::process::Command::new(PathBuf::from(env!("CARGO_BIN_EXE_peftk")))
        .arg("dequantize")
        .arg(input)
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut seen = false;
    while start.elapsed() < Duration::from_secs(60) {
        if !temps_in(dir).is_empty() {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if seen {
        let st = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    (child.wait().unwrap(), seen)
}

#[test]
fn interrupted_writes_leave_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    big_quantized(&input, 48, 1024);
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("dq.safetensors");

    // SIGTERM and SIGINT: the handler removes the temp file and exits with 128 + signal.
    for (sig, code) in [("-TERM", 143), ("-INT", 130)] {
        let (st, seen) = interrupt(&input, &out, sig);
        assert!(seen, "the temp file never appeared");
        assert_eq!(st.code(), Some(code), "{sig}");
        assert!(temps_in(&outdir).is_empty(), "{sig} left {:?}", temps_in(&outdir));
        assert!(!out.exists());
    }

    // SIGKILL cannot be handled: the temp file stays, and the next write to that directory sweeps it.
    let (st, seen) = interrupt(&input, &out, "-KILL");
    assert!(seen && st.code().is_none());
    let left = temps_in(&outdir);
    assert_eq!(left.len(), 1, "{left:?}");
    // A foreign file that merely looks similar, and a temp of a live process (ours), are kept.
    let foreign = outdir.join(".peftk-tmpX-keep");
    std::fs::write(&foreign, b"x").unwrap();
    let live = outdir.join(format!(".peftk-tmp-{}-abcdef", std::process::id()));
    std::fs::write(&live, b"x").unwrap();
    let small = outdir.join("small.safetensors");
    let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), small.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(!left[0].exists(), "the stale temp file was not swept");
    assert!(foreign.exists() && live.exists());
}

// ------------------------------------------------------------------------------------ silent drops

fn raw_entries(path: &Path) -> Vec<(String, TensorBytes<'static>)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .iter()
        .map(|n| {
            let (d, s, b) = f.raw(n).unwrap();
            (n.clone(), TensorBytes::borrowed(d, s, b).into_owned())
        })
        .collect()
}

trait IntoOwned {
    fn into_owned(self) -> TensorBytes<'static>;
}

impl IntoOwned for TensorBytes<'_> {
    fn into_owned(self) -> TensorBytes<'static> {
        TensorBytes {
            dtype: self.dtype,
            shape: self.shape,
            data: std::borrow::Cow::Owned(self.data.into_owned()),
        }
    }
}

#[test]
fn dequantize_never_drops_a_weight_silently() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // lm_head.weight's packed data is missing; its five companions are there.
    let mut e = raw_entries(&model_nf4());
    e.retain(|(n, _)| n != "lm_head.weight");
    write_safetensors(p("broken.safetensors"), &e, None).unwrap();
    let (code, out, err) = run([
        "dequantize".as_ref(),
        p("broken.safetensors").as_os_str(),
        p("o").as_os_str(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("lm_head.weight") && err.contains("missing"), "{err}");
    assert!(!p("o").exists());
    // The same file is INVALID for inspect, which now exits non-zero too.
    let (code, out, err) = run(["inspect".as_ref(), p("broken.safetensors").as_os_str()]);
    assert_eq!(code, 1);
    assert!(out.contains("INVALID") && err.contains("INVALID"), "{out}{err}");

    // Only quant-state tensors: an error, not "passed 18446744073709551615 through".
    let mut e = raw_entries(&model_nf4());
    e.retain(|(n, _)| n.contains("quant_state"));
    write_safetensors(p("states.safetensors"), &e, None).unwrap();
    let (code, out, err) = run([
        "dequantize".as_ref(),
        p("states.safetensors").as_os_str(),
        p("o").as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(!out.contains("18446744073709551615") && !err.contains("18446744073709551615"));
    assert!(!p("o").exists());

    // No 4-bit weight at all.
    let (code, _, err) = run(["dequantize".as_ref(), model_fp().as_os_str(), p("o").as_os_str()]);
    assert!(code == 1 && err.contains("no bitsandbytes 4-bit weight"), "{err}");

    // A NaN nested_absmax: an error naming the weight and the flag; with the flag, NaNs are written.
    let mut e = raw_entries(&model_nf4());
    for (n, t) in e.iter_mut() {
        if n == "lm_head.weight.nested_absmax" {
            t.data.to_mut()[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    write_safetensors(p("nan.safetensors"), &e, None).unwrap();
    let (code, _, err) = run([
        "dequantize".as_ref(),
        p("nan.safetensors").as_os_str(),
        p("o").as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("lm_head.weight") && err.contains("--allow-non-finite"),
        "{err}"
    );
    assert!(!p("o").exists());
    let (code, _, err) = run([
        "dequantize".as_ref(),
        p("nan.safetensors").as_os_str(),
        p("o").as_os_str(),
        "--allow-non-finite".as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
    let t = SafetensorsFile::open(p("o"))
        .unwrap()
        .load("lm_head.weight", Device::Cpu)
        .unwrap();
    assert!(t.to_vec_f32().unwrap().iter().any(|v| v.is_nan()));

    // A good file: the counts add up to the input's tensors.
    let (code, out, err) = run([
        "dequantize".as_ref(),
        model_nf4().as_os_str(),
        p("ok").as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dequantized 3 tensors, passed 5 through"), "{out}");
    assert_eq!(SafetensorsFile::open(p("ok")).unwrap().names().len(), 8);
}

#[test]
fn quantize_that_selects_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let (code, _, err) = run([
        "quantize".as_ref(),
        model_fp().as_os_str(),
        out.as_os_str(),
        "--only".as_ref(),
        "no_such_tensor".as_ref(),
    ]);
    assert!(
        code == 1 && err.contains("matches no") && err.contains("no_such_tensor"),
        "{err}"
    );
    // No float `*.weight` at all (only a 1-D norm and integers).
    let e: Vec<_> = raw_entries(&model_fp())
        .into_iter()
        .filter(|(n, _)| n == "model.norm.weight" || n == "step_counts")
        .collect();
    let input = dir.path().join("in.safetensors");
    write_safetensors(&input, &e, None).unwrap();
    let (code, _, err) = run(["quantize".as_ref(), input.as_os_str(), out.as_os_str()]);
    assert!(code == 1 && err.contains("nothing to quantize"), "{err}");
    // Everything is already 4-bit.
    let (code, _, err) = run(["quantize".as_ref(), model_nf4().as_os_str(), out.as_os_str()]);
    assert!(code == 1 && err.contains("already bitsandbytes 4-bit"), "{err}");
    assert!(!out.exists());
}

#[test]
fn default_targets_are_the_linears_transformers_quantizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let (code, _, err) = run(["quantize".as_ref(), model_fp().as_os_str(), out.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        qio::quantized_names(&SafetensorsFile::open(&out).unwrap()),
        [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight"
        ]
    );
    let (code, _, err) = run([
        "quantize".as_ref(),
        model_fp().as_os_str(),
        out.as_os_str(),
        "--include".as_ref(),
        "lm_head|embed_tokens".as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        qio::quantized_names(&SafetensorsFile::open(&out).unwrap()).len(),
        4
    );
    // `--only` and `--include` do not mix.
    let (code, _, _) = run([
        "quantize".as_ref(),
        model_fp().as_os_str(),
        out.as_os_str(),
        "--include".as_ref(),
        "x".as_ref(),
        "--only".as_ref(),
        "y".as_ref(),
    ]);
    assert_eq!(code, 2);
}

// ------------------------------------------------------------------------------------ errors

#[test]
fn errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let out = p("o.safetensors");
    // A directory as input.
    let (code, _, err) = run(["quantize".as_ref(), dir.path().as_os_str(), out.as_os_str()]);
    assert!(code == 1 && err.contains("is a directory"), "{err}");
    // Not safetensors: each kind is named.
    for (name, bytes, expect) in [
        (
            "m.gguf",
            b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00".to_vec(),
            "GGUF",
        ),
        ("p.bin", b"\x80\x02}q\x00(X\x05\x00\x00\x00".to_vec(), "pickle"),
        ("z.bin", b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec(), "zip"),
        ("c.json", b"{\"r\": 8, \"lora_alpha\": 16}".to_vec(), "JSON"),
    ] {
        std::fs::write(p(name), &bytes).unwrap();
        for sub in ["inspect", "quantize", "dequantize"] {
            let mut args = vec![sub.into(), p(name).into_os_string()];
            if sub != "inspect" {
                args.push(out.clone().into_os_string());
            }
            let (code, _, err) = run(&args);
            assert!(
                code == 1 && err.contains("not a safetensors file") && err.contains(expect),
                "{err}"
            );
        }
    }
    // A missing file: the cause once, not twice.
    let (code, _, err) = run(["inspect", "/nonexistent.safetensors"]);
    assert!(code == 1 && err.contains("/nonexistent.safetensors"));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // --adapter pointing at a file.
    let (code, _, err) = run([
        "merge".as_ref(),
        "--base".as_ref(),
        lora_base().as_os_str(),
        "--adapter".as_ref(),
        lora_base().as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        code == 1 && err.contains("is a file") && err.contains("adapter directory"),
        "{err}"
    );
    // The non-finite error names the flag that allows it.
    let mut e = raw_entries(&model_fp());
    for (n, t) in e.iter_mut() {
        if n == "model.layers.0.mlp.up_proj.weight" {
            t.data.to_mut()[6..8].copy_from_slice(&half::bf16::INFINITY.to_le_bytes());
        }
    }
    write_safetensors(p("inf.safetensors"), &e, None).unwrap();
    let (code, _, err) = run([
        "quantize".as_ref(),
        p("inf.safetensors").as_os_str(),
        out.as_os_str(),
    ]);
    assert!(
        code == 1 && err.contains("--allow-non-finite") && err.contains("up_proj"),
        "{err}"
    );
    // A quant-state JSON error names the file; a huge offset is printed briefly.
    let mut e = raw_entries(&model_nf4());
    for (n, t) in e.iter_mut() {
        if n == "lm_head.weight.quant_state.bitsandbytes__nf4" {
            let s = String::from_utf8(t.data.to_vec()).unwrap();
            let i = s.find("\"nested_offset\": ").unwrap() + 17;
            let s = format!("{}1e300}}", &s[..i]);
            t.shape = vec![s.len()];
            t.data = std::borrow::Cow::Owned(s.into_bytes());
        }
    }
    write_safetensors(p("off.safetensors"), &e, None).unwrap();
    let (code, out_, _) = run(["inspect".as_ref(), p("off.safetensors").as_os_str()]);
    assert_eq!(code, 1);
    let line = out_.lines().find(|l| l.contains("INVALID")).unwrap();
    assert!(
        line.contains("off.safetensors") && line.contains("1e300") && line.len() < 400,
        "{line}"
    );
}

#[test]
fn fifo_inputs_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f.safetensors");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for sub in ["inspect", "quantize", "dequantize"] {
        let mut args = vec![sub.into(), fifo.clone().into_os_string()];
        if sub != "inspect" {
            args.push(dir.path().join("o").into_os_string());
        }
        // A hang would hit the timeout and fail the unwrap in `run`'s output (exit code -1).
        let (code, _, err) = run(&args);
        assert!(code == 1 && err.contains("FIFO"), "{sub}: {err}");
    }
}

#[test]
fn inspect_escapes_control_characters_and_aligns_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("evil.safetensors");
    let t = |n: usize| TensorBytes {
        dtype: safetensors::Dtype::F32,
        shape: vec![n],
        data: std::borrow::Cow::Owned(vec![0u8; 4 * n]),
    };
    let long = format!("model.{}.weight", "very_long_module_name.".repeat(4));
    let entries = vec![
        ("evil\x1b[31m\x1b]0;pwned\x07name".to_string(), t(1)),
        (long.clone(), t(2)),
        ("b".to_string(), t(3)),
    ];
    let meta = [("k\x1b[2J".to_string(), "v\u{202e}x\r".to_string())].into();
    write_safetensors(&p, &entries, Some(meta)).unwrap();
    let o = peftk().arg("inspect").arg(&p).output().unwrap();
    assert!(o.status.success());
    assert!(
        !o.stdout.iter().any(|&b| b == 0x1b || b == 0x07 || b == b'\r'),
        "raw control bytes reach the terminal"
    );
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(!text.contains('\u{202e}'));
    assert!(text.contains("evil\\u{1b}[31m"), "{text}");
    // Every row of the table puts its dtype in the same column, the long name included.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" f32 ") || l.contains(" dtype "))
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    let col = |l: &str| l.find(" f32 ").or_else(|| l.find(" dtype ")).unwrap();
    assert!(rows.iter().all(|l| col(l) == col(rows[0])), "{text}");
    assert!(rows.iter().any(|l| l.contains(&long)));
}

#[test]
fn inspect_shows_adapter_details_and_warns_on_non_positive_alpha() {
    // The WaveFT details of `inspect-adapter` (with the base) through `inspect`.
    let case = fixture("peft_sparse/waveft_db1");
    let (code, out, err) = run(["inspect".as_ref(), case.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("WaveFT: wavelet") && out.contains("n_frequency"),
        "{out}"
    );
    let (code, out2, err) = run(["inspect-adapter".as_ref(), case.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, out2);
    // --base is only for adapters.
    let (code, _, err) = run([
        "inspect".as_ref(),
        model_fp().as_os_str(),
        "--base".as_ref(),
        model_fp().as_os_str(),
    ]);
    assert!(code == 1 && err.contains("--base"), "{err}");

    // lora_alpha <= 0: a warning (PEFT accepts it), not an error.
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter(&dir.path().join("a"));
    let cfg = adapter.join("adapter_config.json");
    for (alpha, word) in [("-16", "negated"), ("0", "zero"), ("16", "")] {
        let text = std::fs::read_to_string(&cfg).unwrap();
        let i = text.find("\"lora_alpha\": ").unwrap() + 14;
        let j = i + text[i..].find(',').unwrap();
        std::fs::write(&cfg, format!("{}{alpha}{}", &text[..i], &text[j..])).unwrap();
        let (code, _, err) = run(["inspect".as_ref(), adapter.as_os_str()]);
        assert_eq!(code, 0, "{err}");
        if word.is_empty() {
            assert!(!err.contains("warning"), "{err}");
        } else {
            assert!(
                err.contains("warning") && err.contains("lora_alpha") && err.contains(word),
                "{err}"
            );
        }
        let out = dir.path().join("merged.safetensors");
        let (code, _, err) = run([
            "merge".as_ref(),
            "--base".as_ref(),
            lora_base().as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(err.contains("warning"), !word.is_empty(), "{err}");
    }
}

// ------------------------------------------------------------------------------------ flags

#[test]
fn merge_validates_dtype_and_device_while_parsing_like_quantize() {
    for (sub, flag, value) in [
        ("merge", "--dtype", "u8"),
        ("merge", "--device", "tpu"),
        ("quantize", "--device", "tpu"),
        ("dequantize", "--dtype", "i32"),
        ("dequantize", "--device", "tpu"),
    ] {
        let mut args = vec![sub, flag, value];
        if sub == "merge" {
            args.extend(["--base", "b", "--adapter", "a", "--out", "o"]);
        } else {
            args.extend(["in", "out"]);
        }
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains(value), "{err}");
    }
}

#[test]
fn every_flag_is_documented() {
    for sub in ["quantize", "dequantize", "inspect", "merge", "inspect-adapter"] {
        let (code, out, _) = run([sub, "--help"]);
        assert_eq!(code, 0);
        let mut flags = 0;
        let lines: Vec<&str> = out.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if t.starts_with("--") || (t.starts_with('-') && t.len() > 1 && t.as_bytes()[1] != b'-') {
                flags += 1;
                // The help is on the same line after the flag, or on the next, indented further.
                let same = t.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
                let next = lines.get(i + 1).is_some_and(|n| {
                    let n_t = n.trim_start();
                    !n_t.is_empty() && !n_t.starts_with('-') && n.len() - n_t.len() > l.len() - t.len()
                });
                assert!(same || next, "{sub}: undocumented flag {t:?}\n{out}");
            }
        }
        assert!(flags >= 2, "{sub}: {out}");
    }
}

// ------------------------------------------------------------------------------------ memory

/// Peak RSS of `peftk dequantize` on a large output stays under 1.3x the largest tensor plus the
/// mapped input (and the fixed cost of a process), measured by `/usr/bin/time`.
#[test]
fn dequantize_streams_its_output() {
    if !Path::new("/usr/bin/time").exists() {
        println!("SKIPPED (no /usr/bin/time)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    // 6 weights of 4M elements, 16 MiB of f32 each: a 96 MiB output, 13 MiB of input.
    big_quantized(&input, 6, 2048);
    // The fixed cost of a process that does the same work (thread pool, buffers) on a tiny file.
    let tiny = dir.path().join("tiny.safetensors");
    let base_kib = peak_kib(&[
        "dequantize".into(),
        model_nf4().into_os_string(),
        tiny.into_os_string(),
    ]);
    let out = dir.path().join("out.safetensors");
    let kib = peak_kib(&[
        "dequantize".into(),
        input.clone().into_os_string(),
        out.into_os_string(),
    ]);
    let largest = 16 << 10; // KiB
    let input_kib = std::fs::metadata(&input).unwrap().len() / 1024;
    let budget = base_kib + (1.3 * largest as f64) as u64 + input_kib;
    println!(
        "peak {kib} KiB, budget {budget} KiB (process {base_kib}, largest tensor {largest}, input {input_kib})"
    );
    assert!(
        kib <= budget,
        "peak {kib} KiB over {budget} KiB: the output is not streamed"
    );
    // Stricter: the input pages of used tensors are released, so at most about half the map is resident.
    let strict = base_kib + (1.3 * largest as f64) as u64 + input_kib / 2;
    assert!(
        kib <= strict,
        "peak {kib} KiB over {strict} KiB: the input map is not released"
    );
}

fn peak_kib(args: &[std::ffi::OsString]) -> u64 {
    let o = std::process::Command::new("/usr/bin/time")
        .args(["-f", "PEAK %M"])
        .arg(PathBuf::from(env!("CARGO_BIN_EXE_peftk")))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("PEAK "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

// ------------------------------------------------------------------------------------ round trips

/// quantize -> dequantize -> quantize with double quantization: the 4-bit codes never change, the
/// absmax codes and the nested absmax drift slightly every round and never settle, exactly as in
/// bitsandbytes (see tests/fixtures/README.md, "Double quantization round trips", for the numbers
/// measured with bitsandbytes 0.50.2). The bounds here are those measured drifts, with margin.
#[test]
fn double_quant_round_trips_drift_like_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let w = Tensor::randn(&[1024, 1024], 0.02, 11, DType::F32, Device::Cpu).unwrap();
    write_safetensors(
        p("q0.safetensors").with_extension("fp"),
        &[("l.weight".into(), TensorBytes::from_tensor(&w).unwrap())],
        None,
    )
    .unwrap();
    let mut prev = p("q0.fp");
    let mut last: Option<(Vec<u8>, Vec<u8>, f32)> = None;
    let (mut changed_codes, mut nblocks) = (0, 0);
    for r in 0..4 {
        let q = p(&format!("q{r}.safetensors"));
        let (code, _, err) = run(["quantize".as_ref(), prev.as_os_str(), q.as_os_str()]);
        assert_eq!(code, 0, "{err}");
        let f = SafetensorsFile::open(&q).unwrap();
        let qt = qio::load_quantized(&f, "l.weight", Device::Cpu).unwrap();
        let packed = f.raw("l.weight").unwrap().2.to_vec();
        let codes = f.raw("l.weight.absmax").unwrap().2.to_vec();
        let nested = qt.absmax_f32().unwrap().to_vec::<f32>().unwrap();
        let mean = nested.iter().sum::<f32>() / nested.len() as f32;
        if let Some((pp, pc, pm)) = &last {
            assert_eq!(&packed, pp, "round {r}: the 4-bit codes changed");
            let n = codes.iter().zip(pc).filter(|(a, b)| a != b).count();
            changed_codes += n;
            nblocks += codes.len();
            assert!(
                n * 50 < codes.len(),
                "round {r}: {n} of {} absmax codes changed",
                codes.len()
            );
            assert!(
                ((mean - pm) / pm).abs() < 1e-4,
                "round {r}: mean absmax {pm} -> {mean}"
            );
        }
        last = Some((packed, codes, mean));
        let dq = p(&format!("dq{r}.safetensors"));
        let (code, _, err) = run(["dequantize".as_ref(), q.as_os_str(), dq.as_os_str()]);
        assert_eq!(code, 0, "{err}");
        prev = dq;
    }
    println!("absmax codes changed over 3 rounds: {changed_codes} of {nblocks}");
}

/// Config errors show JSON values as JSON, not as Rust debug output (`Int("-4")`, `Some("[…]")`).
#[test]
fn config_errors_show_json_not_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter(&dir.path().join("a"));
    let cfg = adapter.join("adapter_config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    let with = |from: &str, to: &str| {
        assert!(orig.contains(from), "{from}");
        std::fs::write(&cfg, orig.replacen(from, to, 1)).unwrap();
        let (code, _, err) = run(["inspect".as_ref(), adapter.as_os_str()]);
        assert_eq!(code, 1, "{err}");
        assert!(
            !err.contains("Int(") && !err.contains("Some(") && !err.contains("Float("),
            "{err}"
        );
        err
    };
    let err = with("\"rank_pattern\": {}", "\"rank_pattern\": {\"q_proj\": -4}");
    assert!(err.contains("got -4"), "{err}");
    let err = with(
        "\"layers_to_transform\": null",
        "\"layers_to_transform\": [1, \"x\"]",
    );
    assert!(err.contains("got \"x\""), "{err}");
    // A module the config does not target: its settings are printed plainly.
    let err = with("\"exclude_modules\": [", "\"exclude_modules\": [\"v_proj\", ");
    assert!(
        err.contains("does not target") && err.contains("target_modules=[\""),
        "{err}"
    );
}
