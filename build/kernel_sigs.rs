//! Reads the `extern "C" __global__` signatures of `kernels/*.cu` and writes typed Rust launchers for
//! them, so that a launcher cannot push its arguments in another order or with other types than the
//! kernel declares.
//!
//! The kernels are instantiated through C preprocessor macros (`CE(f16, f16)` pastes `ce_fwd_f16`), so
//! this file runs a small preprocessor first: comments, line continuations, `#include "…"` of the
//! kernel headers, object- and function-like `#define`s with `##` pasting. Two names are kept instead
//! of expanded: `NULLABLE` (common.cuh: this pointer may be null, so the launcher takes an `Option`)
//! and object-like macros whose name ends in `_PARAMS` (a parameter group such as q4.cuh's
//! `Q4_PARAMS`, which becomes one Rust struct, e.g. `Q4Params`, pushed field by field).
//!
//! Kernels whose names differ only in dtype tokens (`f32`, `f16`, `bf16`) and numbered variant tokens
//! (`dq1`, `al0`, `nt2`) and whose parameters agree up to those dtypes form one generic launcher:
//! `q4_gemv_simt::<T0, T1>(backend, cfg, dq_flag, al_flag, x, q4, ...)` picks the instantiation from
//! the element types and flags, and returns an error for a combination the .cu file does not
//! instantiate. Every other kernel gets a launcher of its own name.
//!
//! Used by build.rs (generation) and by tests/kernel_signatures.rs (the preprocessor and the parser on
//! their own).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

/// A preprocessor macro.
#[derive(Clone, Debug)]
struct Macro {
    params: Option<Vec<String>>,
    body: Vec<String>,
}

/// One parameter of a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// A parameter group macro (`Q4_PARAMS`), pushed from one generated struct.
    Group(String),
    /// A device pointer; `elem` is the Rust element type.
    Ptr {
        name: String,
        elem: String,
        konst: bool,
        nullable: bool,
    },
    /// A value; `ty` is the Rust type.
    Val { name: String, ty: String },
}

/// One `extern "C" __global__` kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
}

/// The kernels of one .cu file and the parameter groups they use.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub kernels: Vec<Kernel>,
    pub groups: BTreeMap<String, Vec<Param>>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident(t: &str) -> bool {
    t.chars().next().is_some_and(is_ident_start)
}

/// Comments removed (strings kept), line continuations joined.
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '/' && b.get(i + 1) == Some(&'/') {
            while i < b.len() && b[i] != '\n' {
                // A `\` before the newline would continue a // comment; the kernels never do that.
                i += 1;
            }
        } else if c == '/' && b.get(i + 1) == Some(&'*') {
            i += 2;
            while i < b.len() && !(b[i] == '*' && b.get(i + 1) == Some(&'/')) {
                if b[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if c == '"' || c == '\'' {
            out.push(c);
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == '\\' {
                    out.push(b[i]);
                    i += 1;
                }
                if i < b.len() {
                    out.push(b[i]);
                }
                i += 1;
            }
            out.push(c);
            i += 1;
        } else if c == '\\' && b.get(i + 1) == Some(&'\n') {
            out.push(' ');
            i += 2;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// C tokens: identifiers, numbers, string and char literals, `##`, and single punctuation characters.
fn tokenize(s: &str) -> Vec<String> {
    let b: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_ident_start(c) || c.is_ascii_digit() {
            let st = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == '_' || (c.is_ascii_digit() && b[i] == '.'))
            {
                i += 1;
            }
            out.push(b[st..i].iter().collect());
        } else if c == '"' || c == '\'' {
            let st = i;
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(b[st..i.min(b.len())].iter().collect());
        } else if c == '#' && b.get(i + 1) == Some(&'#') {
            out.push("##".into());
            i += 2;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// The preprocessor state: macros seen so far.
#[derive(Default)]
struct Pp {
    macros: HashMap<String, Macro>,
}

fn is_group(name: &str) -> bool {
    name.ends_with("_PARAMS")
}

impl Pp {
    /// Reads `text` (a file in `dir`): records its macros, follows `#include "…"`, returns the tokens
    /// of everything that is not a directive.
    fn file(&mut self, dir: &Path, text: &str, depth: usize) -> Result<Vec<String>, String> {
        if depth > 8 {
            return Err("#include nesting deeper than 8".into());
        }
        let mut src = String::new();
        for line in strip(text).lines() {
            let t = line.trim_start();
            let Some(d) = t.strip_prefix('#') else {
                src.push_str(line);
                src.push('\n');
                continue;
            };
            let d = d.trim_start();
            if let Some(rest) = d.strip_prefix("define") {
                self.define(rest)?;
            } else if let Some(rest) = d.strip_prefix("include") {
                let rest = rest.trim();
                if let Some(name) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                    let path = dir.join(name);
                    let inc =
                        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    // Only the macros of a header matter here (headers declare no extern "C" kernels).
                    self.file(dir, &inc, depth + 1)?;
                }
            } else if d.starts_with("if") || d.starts_with("el") || d.starts_with("endif") {
                return Err(format!(
                    "conditional directive `#{d}` is not supported by build/kernel_sigs.rs"
                ));
            }
        }
        Ok(tokenize(&src))
    }

    fn define(&mut self, rest: &str) -> Result<(), String> {
        let rest = rest.trim_start();
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..name_len].to_string();
        if name.is_empty() {
            return Err(format!("bad #define {rest}"));
        }
        let after = &rest[name_len..];
        let m = if let Some(p) = after.strip_prefix('(') {
            let close = p.find(')').ok_or_else(|| format!("#define {name}: no `)`"))?;
            let params = p[..close]
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            Macro {
                params: Some(params),
                body: tokenize(&p[close + 1..]),
            }
        } else {
            Macro {
                params: None,
                body: tokenize(after),
            }
        };
        self.macros.insert(name, m);
        Ok(())
    }

    fn expand(&self, toks: &[String], hide: &HashSet<String>, depth: usize) -> Result<Vec<String>, String> {
        if depth > 64 {
            return Err("macro expansion deeper than 64".into());
        }
        let mut out = Vec::with_capacity(toks.len());
        let mut i = 0;
        while i < toks.len() {
            let t = &toks[i];
            let m = match self.macros.get(t) {
                Some(m) if !hide.contains(t) && t != "NULLABLE" && !(is_group(t) && m.params.is_none()) => m,
                _ => {
                    out.push(t.clone());
                    i += 1;
                    continue;
                }
            };
            let mut h = hide.clone();
            h.insert(t.clone());
            match &m.params {
                None => {
                    out.extend(self.expand(&m.body, &h, depth + 1)?);
                    i += 1;
                }
                Some(params) => {
                    if toks.get(i + 1).map(String::as_str) != Some("(") {
                        out.push(t.clone());
                        i += 1;
                        continue;
                    }
                    let (args, next) = split_args(toks, i + 1)?;
                    let args = if params.is_empty() && args.len() == 1 && args[0].is_empty() {
                        Vec::new()
                    } else {
                        args
                    };
                    if args.len() != params.len() {
                        return Err(format!(
                            "macro {t}: {} arguments for {} parameters",
                            args.len(),
                            params.len()
                        ));
                    }
                    let body = self.substitute(&m.body, params, &args, hide, depth)?;
                    out.extend(self.expand(&body, &h, depth + 1)?);
                    i = next;
                }
            }
        }
        Ok(out)
    }

    /// The body with parameters replaced: raw arguments beside `##` (then pasted), expanded ones
    /// elsewhere.
    fn substitute(
        &self,
        body: &[String],
        params: &[String],
        args: &[Vec<String>],
        hide: &HashSet<String>,
        depth: usize,
    ) -> Result<Vec<String>, String> {
        let arg = |t: &str| params.iter().position(|p| p == t).map(|k| &args[k]);
        let mut out: Vec<String> = Vec::new();
        let mut j = 0;
        while j < body.len() {
            let t = &body[j];
            if t == "##" {
                let next = body.get(j + 1).ok_or("`##` at the end of a macro body")?;
                let rhs: Vec<String> = arg(next).cloned().unwrap_or_else(|| vec![next.clone()]);
                let mut rhs = rhs.into_iter();
                match (out.pop(), rhs.next()) {
                    (Some(l), Some(r)) => out.push(l + &r),
                    (Some(l), None) => out.push(l),
                    (None, Some(r)) => out.push(r),
                    (None, None) => {}
                }
                out.extend(rhs);
                j += 2;
                continue;
            }
            match arg(t) {
                Some(a) if body.get(j + 1).map(String::as_str) == Some("##") => out.extend(a.iter().cloned()),
                Some(a) => out.extend(self.expand(a, hide, depth + 1)?),
                None => out.push(t.clone()),
            }
            j += 1;
        }
        Ok(out)
    }
}

/// The comma-separated arguments of the parenthesis at `open`, and the index after its `)`.
fn split_args(toks: &[String], open: usize) -> Result<(Vec<Vec<String>>, usize), String> {
    let mut args = vec![Vec::new()];
    let mut depth = 0usize;
    let mut i = open + 1;
    while i < toks.len() {
        let t = toks[i].as_str();
        match t {
            "(" => depth += 1,
            ")" if depth == 0 => return Ok((args, i + 1)),
            ")" => depth -= 1,
            "," if depth == 0 => {
                args.push(Vec::new());
                i += 1;
                continue;
            }
            _ => {}
        }
        if let Some(last) = args.last_mut() {
            last.push(t.to_string());
        }
        i += 1;
    }
    Err("unbalanced parentheses".into())
}

/// The Rust element or value type of a C type.
fn rust_type(c: &str) -> Option<&'static str> {
    Some(match c {
        "float" => "f32",
        "double" => "f64",
        "f16" | "__half" => "half::f16",
        "bf16" | "__nv_bfloat16" => "half::bf16",
        "int" | "int32_t" => "i32",
        "int64_t" | "long long" => "i64",
        "uint8_t" | "unsigned char" | "void" => "u8",
        "uint16_t" | "unsigned short" => "u16",
        "uint32_t" | "unsigned int" | "unsigned" => "u32",
        "uint64_t" | "unsigned long long" => "u64",
        "Lut16" => "[f32; 16]",
        "Lut256" => "[f32; 256]",
        _ => return None,
    })
}

fn parse_params(toks: &[String], what: &str) -> Result<Vec<Param>, String> {
    if toks.is_empty() || toks == ["void"] {
        return Ok(Vec::new());
    }
    let (args, _) = {
        let mut t = vec!["(".to_string()];
        t.extend(toks.iter().cloned());
        t.push(")".into());
        split_args(&t, 0)?
    };
    args.iter().map(|a| parse_param(a, what)).collect()
}

fn parse_param(a: &[String], what: &str) -> Result<Param, String> {
    if let [g] = a
        && is_group(g)
    {
        return Ok(Param::Group(g.clone()));
    }
    let nullable = a.iter().any(|t| t == "NULLABLE");
    let toks: Vec<&str> = a
        .iter()
        .map(String::as_str)
        .filter(|t| !matches!(*t, "NULLABLE" | "__restrict__" | "__grid_constant__"))
        .collect();
    let name = match toks.last() {
        Some(n) if is_ident(n) => n.to_string(),
        _ => return Err(format!("{what}: parameter `{}` has no name", a.join(" "))),
    };
    let stars = toks.iter().filter(|t| **t == "*").count();
    let err = |m: &str| format!("{what}: parameter `{}`: {m}", a.join(" "));
    let before: Vec<&str> = match toks.iter().position(|t| *t == "*") {
        Some(p) => toks[..p].to_vec(),
        None => toks[..toks.len() - 1].to_vec(),
    };
    let konst = before.contains(&"const");
    let base: Vec<&str> = before.into_iter().filter(|t| *t != "const").collect();
    let base = base.join(" ");
    let ty =
        rust_type(&base).ok_or_else(|| err(&format!("unknown C type `{base}` (add it to rust_type)")))?;
    match stars {
        0 if nullable => Err(err("NULLABLE on a value")),
        0 => Ok(Param::Val { name, ty: ty.into() }),
        1 if ty.starts_with('[') => Err(err("pointer to a code-book struct")),
        1 => Ok(Param::Ptr {
            name,
            elem: ty.into(),
            konst,
            nullable,
        }),
        _ => Err(err("pointer to pointer")),
    }
}

/// The kernels of one .cu file (its text; headers are read from `dir`).
pub fn parse(dir: &Path, text: &str) -> Result<Parsed, String> {
    let mut pp = Pp::default();
    let toks = pp.file(dir, text, 0)?;
    let toks = pp.expand(&toks, &HashSet::new(), 0)?;
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i + 1 < toks.len() {
        if !(toks[i] == "extern" && toks[i + 1] == "\"C\"") {
            i += 1;
            continue;
        }
        // extern "C" [__global__ …] void [__launch_bounds__(…)] name ( params )
        let mut j = i + 2;
        let mut global = false;
        while j < toks.len() && toks[j] != "void" {
            global |= toks[j] == "__global__";
            j += 1;
        }
        j += 1;
        if !global {
            i = j;
            continue;
        }
        if toks.get(j).map(String::as_str) == Some("__launch_bounds__") {
            let (_, next) = split_args(&toks, j + 1)?;
            j = next;
        }
        let name = toks
            .get(j)
            .cloned()
            .ok_or("extern \"C\" at the end of the file")?;
        if !is_ident(&name) || toks.get(j + 1).map(String::as_str) != Some("(") {
            return Err(format!("cannot read the kernel declaration near `{name}`"));
        }
        let (args, next) = split_args(&toks, j + 1)?;
        let flat: Vec<String> = args.join(&",".to_string());
        let params = parse_params(&flat, &name)?;
        for p in &params {
            if let Param::Group(g) = p
                && !parsed.groups.contains_key(g)
            {
                let m = pp
                    .macros
                    .get(g)
                    .ok_or_else(|| format!("{name}: unknown group {g}"))?;
                let body = pp.expand(&m.body, &HashSet::from([g.clone()]), 0)?;
                let gp = parse_params(&body, g)?;
                if gp
                    .iter()
                    .any(|p| !matches!(p, Param::Val { .. } | Param::Ptr { konst: true, .. }))
                {
                    return Err(format!(
                        "{g}: a parameter group holds only values and const pointers"
                    ));
                }
                parsed.groups.insert(g.clone(), gp);
            }
        }
        if parsed.kernels.iter().any(|k| k.name == name) {
            return Err(format!("kernel {name} declared twice"));
        }
        parsed.kernels.push(Kernel { name, params });
        i = next;
    }
    Ok(parsed)
}

// ------------------------------------------------------------------------------------------------
// Families and code generation

const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

fn dtype_rust(t: &str) -> &'static str {
    match t {
        "f32" => "f32",
        "f16" => "half::f16",
        _ => "half::bf16",
    }
}

/// A numbered variant token (`dq1`, `nt2`): its prefix and number.
fn flag(tok: &str) -> Option<(&str, u32)> {
    let split = tok.find(|c: char| c.is_ascii_digit())?;
    let (p, n) = tok.split_at(split);
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    Some((p, n.parse().ok()?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Type,
    Flag,
}

/// Kernels sharing a launcher: the name pattern, its variable slots, the members' slot values.
#[derive(Debug)]
pub struct Family {
    /// The launcher's name.
    pub name: String,
    /// Name tokens; `None` where a slot goes.
    pattern: Vec<Option<String>>,
    slots: Vec<(Slot, String)>,
    members: Vec<(String, Vec<String>)>,
    /// Parameters with generic element types written `T0`, `T1`, … (slot order among type slots).
    params: Vec<Param>,
}

fn slot_key(tok: &str) -> Option<(Slot, String)> {
    if DTYPES.contains(&tok) {
        Some((Slot::Type, String::new()))
    } else {
        flag(tok).map(|(p, _)| (Slot::Flag, p.to_string()))
    }
}

/// Groups the kernels of one file into launcher families.
pub fn families(kernels: &[Kernel]) -> Result<Vec<Family>, String> {
    // Group by the name with every slot-like token replaced.
    let mut groups: BTreeMap<String, Vec<&Kernel>> = BTreeMap::new();
    for k in kernels {
        let key: Vec<String> = k
            .name
            .split('_')
            .map(|t| match slot_key(t) {
                Some((Slot::Type, _)) => "{T}".to_string(),
                Some((Slot::Flag, p)) => format!("{p}{{}}"),
                None => t.to_string(),
            })
            .collect();
        groups.entry(key.join("_")).or_default().push(k);
    }
    let mut out = Vec::new();
    for members in groups.values() {
        match family_of(members) {
            Some(f) => out.push(f),
            None => out.extend(members.iter().map(|k| single(k))),
        }
    }
    let mut seen = HashSet::new();
    for f in &out {
        if !seen.insert(f.name.clone()) {
            return Err(format!("two launchers would be named {}", f.name));
        }
    }
    Ok(out)
}

fn single(k: &Kernel) -> Family {
    Family {
        name: k.name.clone(),
        pattern: vec![Some(k.name.clone())],
        slots: Vec::new(),
        members: vec![(k.name.clone(), Vec::new())],
        params: k.params.clone(),
    }
}

/// One generic launcher for `members`, or `None` when their parameters do not unify.
fn family_of(members: &[&Kernel]) -> Option<Family> {
    if members.len() < 2 {
        return None;
    }
    let toks: Vec<Vec<&str>> = members.iter().map(|k| k.name.split('_').collect()).collect();
    let n = toks[0].len();
    // Positions whose token differs between members become slots; the rest stay literal.
    let mut pattern = Vec::new();
    let mut slots = Vec::new();
    let mut slot_pos = Vec::new();
    for p in 0..n {
        let first = toks[0][p];
        if toks.iter().all(|t| t[p] == first) {
            pattern.push(Some(first.to_string()));
        } else {
            let (kind, prefix) = slot_key(first)?;
            pattern.push(None);
            slots.push((kind, prefix));
            slot_pos.push(p);
        }
    }
    let values: Vec<Vec<String>> = toks
        .iter()
        .map(|t| {
            slot_pos
                .iter()
                .zip(&slots)
                .map(|(&p, (kind, prefix))| match kind {
                    Slot::Type => t[p].to_string(),
                    Slot::Flag => t[p][prefix.len()..].to_string(),
                })
                .collect()
        })
        .collect();
    let type_slots: Vec<usize> = (0..slots.len()).filter(|&s| slots[s].0 == Slot::Type).collect();
    // Unify the parameters: equal everywhere, or following one type slot in every member.
    let first = &members[0].params;
    if members.iter().any(|k| k.params.len() != first.len()) {
        return None;
    }
    let mut params = Vec::new();
    for (pi, p0) in first.iter().enumerate() {
        let all: Vec<&Param> = members.iter().map(|k| &k.params[pi]).collect();
        match p0 {
            Param::Ptr {
                name,
                konst,
                nullable,
                ..
            } => {
                let elems: Vec<&str> = all
                    .iter()
                    .map(|p| match p {
                        Param::Ptr {
                            name: n2,
                            elem,
                            konst: k2,
                            nullable: u2,
                        } if n2 == name && k2 == konst && u2 == nullable => Some(elem.as_str()),
                        _ => None,
                    })
                    .collect::<Option<_>>()?;
                let elem = if elems.iter().all(|e| *e == elems[0]) {
                    elems[0].to_string()
                } else {
                    let g = type_slots
                        .iter()
                        .position(|&s| elems.iter().zip(&values).all(|(e, v)| *e == dtype_rust(&v[s])))?;
                    format!("T{g}")
                };
                params.push(Param::Ptr {
                    name: name.clone(),
                    elem,
                    konst: *konst,
                    nullable: *nullable,
                });
            }
            other => {
                if all.iter().any(|p| *p != other) {
                    return None;
                }
                params.push(other.clone());
            }
        }
    }
    let name: Vec<&str> = pattern.iter().flatten().map(String::as_str).collect();
    Some(Family {
        name: name.join("_"),
        pattern,
        slots,
        members: members.iter().map(|k| k.name.clone()).zip(values).collect(),
        params,
    })
}

/// The group macro's struct name: `Q4_PARAMS` → `Q4Params`.
pub fn group_struct(g: &str) -> String {
    g.split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect()
}

const RUST_KEYWORDS: [&str; 12] = [
    "in", "type", "ref", "fn", "mod", "loop", "match", "move", "self", "use", "where", "impl",
];

fn rust_name(c: &str) -> String {
    // Keywords, and the generated launchers' own names.
    if RUST_KEYWORDS.contains(&c) || ["backend", "cfg", "k_name", "k_fn", "k_args", "v"].contains(&c) {
        format!("{c}_")
    } else {
        c.to_string()
    }
}

fn ptr_type(elem: &str, konst: bool, lt: &str) -> String {
    if konst {
        format!("CudaView<{lt}, {elem}>")
    } else {
        format!("CudaViewMut<{lt}, {elem}>")
    }
}

/// The generated launchers of one module (`kernels/<module>.cu`), as Rust source.
pub fn launchers(module: &str, variant: &str, fams: &[Family]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "/// Launchers of `kernels/{module}.cu`.");
    let _ = writeln!(
        s,
        "#[allow(dead_code, non_snake_case, clippy::too_many_arguments)]"
    );
    let _ = writeln!(s, "pub(crate) mod {module} {{");
    let _ = writeln!(s, "    use super::*;");
    for f in fams {
        let ntypes = f.slots.iter().filter(|s| s.0 == Slot::Type).count();
        let generics: Vec<String> = (0..ntypes).map(|g| format!("T{g}: KernelElem")).collect();
        let pattern: Vec<String> = {
            let mut si = 0;
            let mut tn = 0;
            f.pattern
                .iter()
                .map(|t| match t {
                    Some(t) => t.clone(),
                    None => {
                        let (kind, prefix) = &f.slots[si];
                        si += 1;
                        match kind {
                            Slot::Type => {
                                tn += 1;
                                format!("{{T{}}}", tn - 1)
                            }
                            Slot::Flag => format!("{prefix}{{{prefix}_flag}}"),
                        }
                    }
                })
                .collect()
        };
        let c_sig: Vec<String> = f.params.iter().map(c_param).collect();
        let _ = writeln!(s);
        let _ = writeln!(s, "    /// `{}({})`", pattern.join("_"), c_sig.join(", "));
        if !f.slots.is_empty() {
            let inst: Vec<String> = f
                .members
                .iter()
                .map(|(_, v)| format!("({})", v.join(", ")))
                .collect();
            let _ = writeln!(s, "    /// for {}.", inst.join(", "));
        }
        let _ = writeln!(s, "    ///");
        let _ = writeln!(
            s,
            "    /// # Safety\n    /// The caller vouches for what the types cannot show: every pointer addresses as many elements\n    /// as the kernel reads or writes for these sizes, and `cfg` is the grid the kernel expects."
        );
        let generic_list = if generics.is_empty() {
            String::new()
        } else {
            format!("<{}>", generics.join(", "))
        };
        let mut args = vec![
            "backend: &CudaBackend".to_string(),
            "cfg: LaunchConfig".to_string(),
        ];
        for (kind, prefix) in &f.slots {
            if *kind == Slot::Flag {
                args.push(format!("{prefix}_flag: u32"));
            }
        }
        for p in &f.params {
            args.push(match p {
                Param::Group(g) => format!(
                    "{}: &{}<'_>",
                    g.to_ascii_lowercase().trim_end_matches("_params"),
                    group_struct(g)
                ),
                Param::Ptr {
                    name,
                    elem,
                    konst,
                    nullable,
                } => {
                    let r = if *konst { "&" } else { "&mut " };
                    let t = format!("{r}{}", ptr_type(elem, *konst, "'_"));
                    if *nullable {
                        format!("{}: Option<{t}>", rust_name(name))
                    } else {
                        format!("{}: {t}", rust_name(name))
                    }
                }
                Param::Val { name, ty } if ty.starts_with('[') => format!("{}: &{ty}", rust_name(name)),
                Param::Val { name, ty } => format!("{}: {ty}", rust_name(name)),
            });
        }
        let _ = writeln!(s, "    pub(crate) unsafe fn {}{generic_list}(", f.name);
        for a in &args {
            let _ = writeln!(s, "        {a},");
        }
        let _ = writeln!(s, "    ) -> Result<()> {{");
        if f.slots.is_empty() {
            let _ = writeln!(s, "        let k_name = {:?};", f.members[0].0);
        } else {
            let mut tn = 0;
            let keys: Vec<String> = f
                .slots
                .iter()
                .map(|(k, p)| match k {
                    Slot::Type => {
                        tn += 1;
                        format!("T{}::NAME", tn - 1)
                    }
                    Slot::Flag => format!("{p}_flag"),
                })
                .collect();
            let _ = writeln!(s, "        let k_name = match ({},) {{", keys.join(", "));
            for (kname, vals) in &f.members {
                let pats: Vec<String> = vals
                    .iter()
                    .zip(&f.slots)
                    .map(|(v, (k, _))| match k {
                        Slot::Type => format!("{v:?}"),
                        Slot::Flag => v.clone(),
                    })
                    .collect();
                let _ = writeln!(s, "            ({},) => {kname:?},", pats.join(", "));
            }
            let (tys, flags): (Vec<&String>, Vec<&String>) = keys.iter().partition(|k| k.ends_with("::NAME"));
            let list = |v: &[&String]| v.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                s,
                "            _ => return Err(no_kernel({:?}, &[{}], &[{}])),",
                f.name,
                list(&tys),
                list(&flags)
            );
            let _ = writeln!(s, "        }};");
        }
        let _ = writeln!(s, "        let k_fn = backend.func(Module::{variant}, k_name)?;");
        let _ = writeln!(
            s,
            "        let mut k_args = backend.stream.launch_builder(&k_fn);"
        );
        for p in &f.params {
            let _ = writeln!(
                s,
                "        {}",
                push_stmt(p, "")
                    .replace("l.arg(", "k_args.arg(")
                    .replace("(&mut l)", "(&mut k_args)")
            );
        }
        let _ = writeln!(
            s,
            "        // SAFETY: the arguments are pushed in the order and with the types of the kernel's C\n        // signature (this launcher is generated from it); sizes and grid are the caller's contract."
        );
        let _ = writeln!(s, "        unsafe {{ k_args.launch(cfg) }}?;");
        let _ = writeln!(s, "        Ok(())");
        let _ = writeln!(s, "    }}");
    }
    let _ = writeln!(s, "}}");
    s
}

fn c_param(p: &Param) -> String {
    match p {
        Param::Group(g) => g.clone(),
        Param::Ptr {
            name,
            elem,
            konst,
            nullable,
        } => format!(
            "{}{}{}* {name}",
            if *nullable { "NULLABLE " } else { "" },
            if *konst { "const " } else { "" },
            elem.trim_start_matches("half::")
        ),
        Param::Val { name, ty } => format!("{ty} {name}"),
    }
}

fn push_stmt(p: &Param, prefix: &str) -> String {
    match p {
        Param::Group(g) => format!(
            "{}.push(&mut l);",
            g.to_ascii_lowercase().trim_end_matches("_params")
        ),
        Param::Ptr { name, nullable, .. } => {
            let n = format!("{prefix}{}", rust_name(name));
            if *nullable {
                let r = if prefix.is_empty() { "" } else { "&" };
                format!("match {r}{n} {{ Some(v) => l.arg(v), None => l.arg(&NULL_PTR) }};")
            } else if prefix.is_empty() {
                format!("l.arg({n});")
            } else {
                format!("l.arg(&{n});")
            }
        }
        Param::Val { name, ty } if ty.starts_with('[') && prefix.is_empty() => {
            format!("l.arg({});", rust_name(name))
        }
        Param::Val { name, .. } => format!("l.arg(&{prefix}{});", rust_name(name)),
    }
}

/// The struct of a parameter group and its `push`.
pub fn group_code(g: &str, params: &[Param]) -> String {
    let st = group_struct(g);
    let mut s = String::new();
    let sig: Vec<String> = params.iter().map(c_param).collect();
    let _ = writeln!(
        s,
        "/// The kernel parameter group `{g}` ({}), pushed in this order.",
        sig.join(", ")
    );
    let _ = writeln!(s, "pub(crate) struct {st}<'a> {{");
    for p in params {
        match p {
            Param::Ptr {
                name, elem, nullable, ..
            } => {
                let t = ptr_type(elem, true, "'a");
                if *nullable {
                    let _ = writeln!(s, "    pub(crate) {}: Option<{t}>,", rust_name(name));
                } else {
                    let _ = writeln!(s, "    pub(crate) {}: {t},", rust_name(name));
                }
            }
            Param::Val { name, ty } => {
                let _ = writeln!(s, "    pub(crate) {}: {ty},", rust_name(name));
            }
            Param::Group(_) => {}
        }
    }
    let _ = writeln!(s, "}}\n");
    let _ = writeln!(s, "impl<'a> {st}<'a> {{");
    let _ = writeln!(s, "    /// Pushes the group's arguments in the kernel's order.");
    let _ = writeln!(
        s,
        "    pub(crate) fn push<'b>(&'b self, l: &mut LaunchArgs<'b>) {{"
    );
    for p in params {
        let _ = writeln!(s, "        {}", push_stmt(p, "self."));
    }
    let _ = writeln!(s, "    }}\n}}");
    s
}
