//! bitsandbytes 4-bit checkpoints in safetensors (the layout `Linear4bit._save_to_state_dict` and
//! transformers write), read and written byte-for-byte compatibly.
//!
//! A quantized weight `<name>` is stored as:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `<name>` | u8 (or the `quant_storage` dtype bf16/f16/f32, same bytes) | `[(n+1)/2, 1]` |
//! | `<name>.absmax` | f32, or u8 codes with double quantization | `[nblocks]` |
//! | `<name>.quant_map` | f32 | `[16]` |
//! | `<name>.nested_absmax` | f32 (double quantization) | `[ceil(nblocks/256)]` |
//! | `<name>.nested_quant_map` | f32 (double quantization) | `[256]` |
//! | `<name>.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8: UTF-8 JSON | `[len]` |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize",
//! "nested_dtype", "nested_offset"]}`, in that order, with `nested_offset` written as Python's `repr` of
//! the f32 offset widened to a Python float ([`py_float_repr`]). Every field is validated on load.

use super::{Absmax, QuantState, QuantType, QuantizedTensor};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorBytes, from_st_dtype, write_safetensors};
use crate::tensor::{DType, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::path::Path;

/// The key suffix that marks a bitsandbytes 4-bit weight (followed by `nf4` or `fp4`).
pub const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__";

/// The JSON keys bitsandbytes accepts in a quant state.
const JSON_KEYS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];

/// Something that holds named safetensors tensors: a memory-mapped file or bytes in memory.
trait RawSource {
    fn has(&self, name: &str) -> bool;
    fn raw(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])>;
    fn tensor_names(&self) -> Vec<&str>;
    fn context(&self) -> String;
}

impl RawSource for SafetensorsFile {
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn raw(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])> {
        SafetensorsFile::raw(self, name)
    }
    fn tensor_names(&self) -> Vec<&str> {
        self.names().iter().map(String::as_str).collect()
    }
    fn context(&self) -> String {
        self.path().display().to_string()
    }
}

struct MemSource<'a> {
    st: SafeTensors<'a>,
}

impl RawSource for MemSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }
    fn raw(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])> {
        let v = self
            .st
            .tensor(name)
            .map_err(|_| Error::format(self.context(), format!("missing tensor {name:?}")))?;
        Ok((v.dtype(), v.shape().to_vec(), v.data()))
    }
    fn tensor_names(&self) -> Vec<&str> {
        self.st.names()
    }
    fn context(&self) -> String {
        "<memory>".into()
    }
}

/// Names of the bitsandbytes 4-bit weights in `file` (every `<name>` that has a
/// `<name>.quant_state.bitsandbytes__nf4|fp4` tensor), sorted.
pub fn quantized_names(file: &SafetensorsFile) -> Vec<String> {
    names_in(file)
}

fn names_in(src: &impl RawSource) -> Vec<String> {
    let mut v: Vec<String> = src
        .tensor_names()
        .into_iter()
        .filter_map(|k| {
            let (base, qt) = k.rsplit_once(QUANT_STATE_SUFFIX)?;
            (matches!(qt, "nf4" | "fp4") && !base.is_empty()).then(|| base.to_string())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Every tensor name that belongs to the quantized weight `name` and exists in `file` (the weight and
/// its companions), in bitsandbytes' order.
pub fn companion_names(file: &SafetensorsFile, name: &str) -> Vec<String> {
    companion_keys(name)
        .into_iter()
        .filter(|k| file.contains(k))
        .collect()
}

fn companion_keys(name: &str) -> Vec<String> {
    let mut v = vec![name.to_string()];
    for s in ["absmax", "quant_map", "nested_absmax", "nested_quant_map"] {
        v.push(format!("{name}.{s}"));
    }
    for qt in ["nf4", "fp4"] {
        v.push(format!("{name}{QUANT_STATE_SUFFIX}{qt}"));
    }
    v
}

/// Loads the bitsandbytes 4-bit weight `name` from `file` onto `device`, validating every field.
pub fn load_quantized(file: &SafetensorsFile, name: &str, device: Device) -> Result<QuantizedTensor> {
    load_from(file, name, device)
}

/// The parsed quant-state JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateJson {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` with double quantization.
    pub nested: Option<(usize, f32)>,
}

/// Parses and validates the quant-state JSON of a weight (`what` names it in errors).
pub fn parse_quant_state_json(bytes: &[u8], what: &str) -> Result<QuantStateJson> {
    let ctx = || format!("quant state of {what:?}");
    let text = std::str::from_utf8(bytes).map_err(|e| Error::format(ctx(), format!("not UTF-8: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::format(ctx(), format!("bad JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(ctx(), "the JSON is not an object"))?;
    if let Some(k) = obj.keys().find(|k| !JSON_KEYS.contains(&k.as_str())) {
        return Err(Error::format(ctx(), format!("unknown key {k:?}")));
    }
    let get = |k: &str| {
        obj.get(k)
            .ok_or_else(|| Error::format(ctx(), format!("missing key {k:?}")))
    };
    let uint = |k: &str| -> Result<usize> {
        get(k)?
            .as_u64()
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| Error::format(ctx(), format!("{k:?} must be a non-negative integer")))
    };
    let quant_type: QuantType = get("quant_type")?
        .as_str()
        .ok_or_else(|| Error::format(ctx(), "\"quant_type\" must be a string"))?
        .parse()
        .map_err(|_| Error::format(ctx(), format!("unknown quant_type {}", obj["quant_type"])))?;
    let blocksize = uint("blocksize")?;
    if !super::BLOCKSIZES.contains(&blocksize) {
        return Err(Error::format(
            ctx(),
            format!("blocksize {blocksize} is not one of {:?}", super::BLOCKSIZES),
        ));
    }
    let dtype_s = get("dtype")?
        .as_str()
        .ok_or_else(|| Error::format(ctx(), "\"dtype\" must be a string"))?;
    let dtype = DType::from_torch_name(dtype_s)
        .ok()
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::format(
                ctx(),
                format!("dtype {dtype_s:?} is not float32, float16 or bfloat16"),
            )
        })?;
    let shape = get("shape")?
        .as_array()
        .ok_or_else(|| Error::format(ctx(), "\"shape\" must be a list of integers"))?
        .iter()
        .map(|d| d.as_u64().and_then(|u| usize::try_from(u).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| Error::format(ctx(), "\"shape\" must be a list of non-negative integers"))?;
    let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
    let present = nested_keys.iter().filter(|k| obj.contains_key(**k)).count();
    let nested = match present {
        0 => None,
        3 => {
            let nbs = uint("nested_blocksize")?;
            if !nbs.is_power_of_two() || !(64..=4096).contains(&nbs) {
                return Err(Error::format(
                    ctx(),
                    format!("nested_blocksize {nbs} is not a power of two in 64..=4096"),
                ));
            }
            if get("nested_dtype")?.as_str() != Some("float32") {
                return Err(Error::format(
                    ctx(),
                    format!("nested_dtype must be \"float32\", got {}", obj["nested_dtype"]),
                ));
            }
            let off = get("nested_offset")?
                .as_f64()
                .ok_or_else(|| Error::format(ctx(), "\"nested_offset\" must be a number"))?;
            let off32 = off as f32;
            if !off32.is_finite() {
                return Err(Error::format(
                    ctx(),
                    format!("nested_offset {off:e} is not a finite f32"),
                ));
            }
            Some((nbs, off32))
        }
        _ => {
            return Err(Error::format(
                ctx(),
                format!("needs all of {nested_keys:?} or none of them"),
            ));
        }
    };
    Ok(QuantStateJson {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// The quant-state JSON exactly as bitsandbytes writes it (`json.dumps`, insertion order).
pub fn quant_state_json(state: &QuantState) -> String {
    let shape: Vec<String> = state.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        state.quant_type,
        state.blocksize,
        state.dtype.torch_name(),
        shape.join(", ")
    );
    if let Absmax::Double {
        offset,
        nested_blocksize,
        ..
    } = &state.absmax
    {
        s.push_str(&format!(
            ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            py_float_repr(*offset as f64)
        ));
    }
    s.push('}');
    s
}

/// Python's `json.dumps` of a float: `repr` (the shortest string that round-trips, fixed notation for
/// decimal exponents in [-4, 16), otherwise `d.ddde±XX`), and `NaN` / `Infinity` / `-Infinity`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let (digits, exp) = shortest_digits(x.abs());
    let sign = if x < 0.0 { "-" } else { "" };
    let decpt = exp + 1; // value = 0.DIGITS * 10^decpt
    let nd = digits.len() as i32;
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let m = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let e = decpt - 1;
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= nd {
        format!("{digits}{}.0", "0".repeat((decpt - nd) as usize))
    } else {
        let (a, b) = digits.split_at(decpt as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// Scientific-notation digits `"d.ddd" -> ("dddd", exp)` of a printed float.
fn split_sci(sci: &str) -> (String, i32) {
    let (mant, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    (digits, exp.parse().unwrap_or(0))
}

/// The shortest digits that round-trip `x > 0` (value = `d.ddd * 10^exp`), nearest to `x`, and on an
/// exact tie between two such strings the one ending in an even digit (David Gay's `dtoa` mode 0, as
/// Python's `repr`). Rust's `{:e}` gives the shortest nearest digits but may break the tie upwards.
fn shortest_digits(x: f64) -> (String, i32) {
    let (digits, exp) = split_sci(&format!("{x:e}"));
    // The exact decimal expansion (every f64 has one with at most 767 significant digits).
    let (exact, eexp) = split_sci(&format!("{x:.800e}"));
    let exact = exact.trim_end_matches('0');
    let k = digits.len();
    if eexp != exp || exact.len() != k + 1 || !exact.ends_with('5') {
        return (digits, exp);
    }
    let down = exact[..k].to_string();
    // `down` + one unit in the last place, with carry.
    let mut up: Vec<u8> = down.clone().into_bytes();
    let mut i = k;
    loop {
        if i == 0 {
            up.insert(0, b'1');
            break;
        }
        i -= 1;
        if up[i] == b'9' {
            up[i] = b'0';
        } else {
            up[i] += 1;
            break;
        }
    }
    let (up, up_exp) = if up.len() > k {
        (String::from_utf8_lossy(&up[..k]).into_owned(), exp + 1)
    } else {
        (String::from_utf8_lossy(&up).into_owned(), exp)
    };
    let even = if (down.as_bytes()[k - 1] - b'0').is_multiple_of(2) {
        (down, exp)
    } else {
        (up, up_exp)
    };
    let parse = |d: &str, e: i32| format!("{}.{}e{e}", &d[..1], &d[1..]).parse::<f64>().ok();
    let trimmed = even.0.trim_end_matches('0');
    let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
    if parse(&format!("{trimmed}0"), even.1) == Some(x) {
        (trimmed.to_string(), even.1)
    } else {
        (digits, exp)
    }
}

fn load_from(src: &impl RawSource, name: &str, device: Device) -> Result<QuantizedTensor> {
    let ctx = |msg: String| Error::format(src.context(), format!("quantized weight {name:?}: {msg}"));
    let qs_keys: Vec<String> = ["nf4", "fp4"]
        .iter()
        .map(|q| format!("{name}{QUANT_STATE_SUFFIX}{q}"))
        .filter(|k| src.has(k))
        .collect();
    let qs_key = match qs_keys.as_slice() {
        [k] => k.clone(),
        [] => {
            return Err(ctx(format!(
                "no {name}{QUANT_STATE_SUFFIX}nf4 or ...fp4 tensor: not a bitsandbytes 4-bit weight"
            )));
        }
        _ => return Err(ctx("both an nf4 and an fp4 quant state are present".into())),
    };
    let fetch = |key: &str| -> Result<(StDtype, Vec<usize>, &[u8])> {
        if !src.has(key) {
            return Err(ctx(format!("missing companion tensor {key:?}")));
        }
        src.raw(key)
    };

    // The JSON.
    let (dt, _, bytes) = fetch(&qs_key)?;
    if dt != StDtype::U8 {
        return Err(ctx(format!("{qs_key:?} must be uint8 (JSON bytes), got {dt:?}")));
    }
    let js = parse_quant_state_json(bytes, name).map_err(|e| match e {
        Error::Format { context, msg } => Error::format(format!("{}: {context}", src.context()), msg),
        e => e,
    })?;
    let suffix_qt = if qs_key.ends_with("nf4") {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    if js.quant_type != suffix_qt {
        return Err(ctx(format!(
            "the JSON says quant_type {} but the key {qs_key:?} says {suffix_qt}",
            js.quant_type
        )));
    }
    let n = js
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n > 0 && n <= (i64::MAX as usize) / 8)
        .ok_or_else(|| ctx(format!("shape {:?} is empty or too large", js.shape)))?;
    let nb = n.div_ceil(js.blocksize);

    // The packed nibbles, in u8 or reinterpreted from a bf16/f16/f32 `quant_storage`.
    let (dt, shape, packed) = fetch(name)?;
    if !matches!(dt, StDtype::U8 | StDtype::BF16 | StDtype::F16 | StDtype::F32) {
        return Err(ctx(format!(
            "packed data must be uint8 (or a bf16/f16/f32 quant_storage), got {dt:?}"
        )));
    }
    if shape.len() > 2 {
        return Err(ctx(format!(
            "packed data must be 1-D or 2-D, got shape {shape:?}"
        )));
    }
    if packed.len() != n.div_ceil(2) {
        return Err(ctx(format!(
            "shape {:?} ({n} elements) needs {} packed bytes, the {dt:?} tensor of shape {shape:?} has {}",
            js.shape,
            n.div_ceil(2),
            packed.len()
        )));
    }

    // quant_map.
    let qmap = f32_tensor(&fetch(&format!("{name}.quant_map"))?, 16, "quant_map").map_err(ctx)?;
    let mut code = [0f32; 16];
    code.copy_from_slice(&qmap);

    // absmax, plain or double-quantized.
    let (adt, ashape, abytes) = fetch(&format!("{name}.absmax"))?;
    let has_nested =
        src.has(&format!("{name}.nested_absmax")) || src.has(&format!("{name}.nested_quant_map"));
    let absmax = match (js.nested, has_nested) {
        (None, false) => {
            let v = f32_tensor(&(adt, ashape, abytes), nb, "absmax").map_err(ctx)?;
            Absmax::F32(Tensor::from_vec(v, &[nb], Device::Cpu)?)
        }
        (Some((nbs, offset)), true) => {
            if adt != StDtype::U8 || numel(&ashape) != Some(nb) || abytes.len() != nb {
                return Err(ctx(format!(
                    "with double quantization absmax must be uint8 [{nb}], got {adt:?} {ashape:?}"
                )));
            }
            let nn = nb.div_ceil(nbs);
            let nested =
                f32_tensor(&fetch(&format!("{name}.nested_absmax"))?, nn, "nested_absmax").map_err(ctx)?;
            let nested_code = f32_tensor(
                &fetch(&format!("{name}.nested_quant_map"))?,
                256,
                "nested_quant_map",
            )
            .map_err(ctx)?;
            Absmax::Double {
                codes: Tensor::from_bytes(abytes, DType::U8, &[nb], Device::Cpu)?,
                nested_absmax: Tensor::from_vec(nested, &[nn], Device::Cpu)?,
                offset,
                nested_code,
                nested_blocksize: nbs,
            }
        }
        (Some(_), false) => {
            return Err(ctx(format!(
                "the JSON describes double quantization but {name}.nested_absmax / .nested_quant_map are missing"
            )));
        }
        (None, true) => {
            return Err(ctx(format!(
                "{name}.nested_absmax / .nested_quant_map are present but the JSON has no nested_* fields"
            )));
        }
    };
    let state = QuantState {
        quant_type: js.quant_type,
        blocksize: js.blocksize,
        code,
        dtype: js.dtype,
        shape: js.shape,
        absmax,
    };
    let data = Tensor::from_bytes(packed, DType::U8, &[packed.len()], Device::Cpu)?;
    let q = QuantizedTensor::from_parts(data, state).map_err(|e| ctx(e.to_string()))?;
    if device == Device::Cpu {
        Ok(q)
    } else {
        q.to_device(device)
    }
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// An f32 tensor of exactly `want` elements (any shape), decoded.
fn f32_tensor(
    t: &(StDtype, Vec<usize>, &[u8]),
    want: usize,
    what: &str,
) -> std::result::Result<Vec<f32>, String> {
    let (dt, shape, bytes) = t;
    if *dt != StDtype::F32 {
        return Err(format!("{what} must be float32, got {dt:?}"));
    }
    if numel(shape) != Some(want) || bytes.len() != want * 4 {
        return Err(format!("{what} must have {want} elements, got shape {shape:?}"));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn f32_bytes(v: &[f32], shape: Vec<usize>) -> TensorBytes<'static> {
    TensorBytes {
        dtype: StDtype::F32,
        shape,
        data: Cow::Owned(bytemuck::cast_slice(v).to_vec()),
    }
}

/// The safetensors entries of `q` under `name`, in bitsandbytes' layout (see the module docs).
pub fn to_safetensors_entries(
    q: &QuantizedTensor,
    name: &str,
) -> Result<Vec<(String, TensorBytes<'static>)>> {
    let st = &q.state;
    let packed = q.data.to_bytes()?;
    let np = packed.len();
    let mut v = vec![(
        name.to_string(),
        TensorBytes {
            dtype: StDtype::U8,
            shape: vec![np, 1],
            data: Cow::Owned(packed),
        },
    )];
    match &st.absmax {
        Absmax::F32(t) => {
            v.push((format!("{name}.absmax"), TensorBytes::from_tensor(t)?));
            v.push((format!("{name}.quant_map"), f32_bytes(&st.code, vec![16])));
        }
        Absmax::Double {
            codes,
            nested_absmax,
            nested_code,
            ..
        } => {
            v.push((format!("{name}.absmax"), TensorBytes::from_tensor(codes)?));
            v.push((format!("{name}.quant_map"), f32_bytes(&st.code, vec![16])));
            v.push((
                format!("{name}.nested_absmax"),
                TensorBytes::from_tensor(nested_absmax)?,
            ));
            v.push((
                format!("{name}.nested_quant_map"),
                f32_bytes(nested_code, vec![nested_code.len()]),
            ));
        }
    }
    let json = quant_state_json(st).into_bytes();
    v.push((
        format!("{name}{QUANT_STATE_SUFFIX}{}", st.quant_type),
        TensorBytes {
            dtype: StDtype::U8,
            shape: vec![json.len()],
            data: Cow::Owned(json),
        },
    ));
    Ok(v)
}

/// Writes quantized tensors to `path` atomically, in bitsandbytes' layout.
pub fn save_quantized<S: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: &[(S, &QuantizedTensor)],
) -> Result<()> {
    let mut entries = Vec::new();
    for (name, q) in tensors {
        entries.extend(to_safetensors_entries(q, name.as_ref())?);
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((dup, _)) = entries.iter().find(|(k, _)| !seen.insert(k.clone())) {
        return Err(Error::invalid(format!("duplicate tensor name {dup:?}")));
    }
    write_safetensors(path, &entries, None)
}

/// Fuzzing entry point: parses `bytes` as a safetensors file, loads every bitsandbytes 4-bit weight in
/// it and dequantizes the ones that load. Returns how many loaded. Never panics, whatever the bytes.
pub fn fuzz_load(bytes: &[u8]) -> usize {
    let Ok(st) = SafeTensors::deserialize(bytes) else {
        return 0;
    };
    let src = MemSource { st };
    let mut ok = 0;
    for name in names_in(&src) {
        if let Ok(q) = load_from(&src, &name, Device::Cpu) {
            // Bounded: the packed bytes are part of `bytes`, so the output is at most 8x their size.
            if q.dequantize(DType::F32).is_ok() && q.absmax_f32().is_ok() {
                ok += 1;
            }
            let _ = to_safetensors_entries(&q, &name);
        }
    }
    // Plain tensors too: the dtype mapping must not panic either.
    for name in src.tensor_names() {
        if let Ok((dt, shape, data)) = src.raw(name)
            && let Some(d) = from_st_dtype(dt)
        {
            let _ = Tensor::from_bytes(data, d, &shape, Device::Cpu);
        }
    }
    ok
}
