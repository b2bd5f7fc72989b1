//! VB-LoRA (arXiv 2405.15179; HF PEFT `tuners/vblora`): LoRA factors mixed from one shared vector bank.
//!
//! One bank `[num_vectors, L]` is shared by every adapted layer. A layer has logits
//! `A: [r, in/L, V]` and `B: [out/L, r, V]`; every length-L sub-vector is the softmax over its top-k
//! logits times the selected bank rows. `A` is the mix of the A logits reshaped to `[r, in]`; `B` is the
//! mix of the B logits `[out/L, r, L]`, transposed on its last two dims and reshaped to `[out, r]`. The
//! adapter adds `x·Aᵀ·Bᵀ`, with no scaling.
//!
//! The composition is tiny next to the layer (microseconds, see `vblora/cpu.rs`); it runs once per step
//! and layer, then the adapter is an ordinary rank-r product. Gradients flow to the logits through the
//! top-k softmax (zero for unselected logits) and to the bank by a scatter-add over the selections,
//! reduced deterministically (bucketed by bank row on the CPU; one CUDA block per bank row scanning
//! the selections in a fixed order, no atomics).
//!
//! Top-k ties follow `torch.topk` on the CPU exactly (see `vblora/topk.rs`).
//!
//! `save_only_topk_weights`: PEFT stores `<logits>_topk_indices` (u8/i16/i32/i64 by `num_vectors`) and
//! `<logits>_topk_weights` (the softmax of the top-k logits without its last column). Loading rebuilds
//! logits as `log(w)` at the indices and `-inf` elsewhere ([`vblora_logits_from_topk`]), which gives the
//! same A and B for inference; training from such logits is refused, as in PEFT.
//!
//! [`VbLoraLinear`] is the whole layer (a frozen dense or 4-bit base through [`crate::qmatmul`] plus the
//! adapter, fused like LoRA), on one shared [`VbLoraBank`] registered once in a
//! [`crate::autograd::ParamStore`].

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "vblora/cuda_stub.rs"]
mod cuda;
mod linear;
mod topk;

pub use linear::{VbLoraBank, VbLoraContext, VbLoraLinear, VbLoraLinearGrads, VbLoraOptions, logits_key};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The saved key of the shared bank (`base_model.vblora_vector_bank`: it lives on the tuner, not under
/// `base_model.model.`).
pub const BANK_KEY: &str = "base_model.vblora_vector_bank";

/// How composed rows are written (and how gradients are read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `[rows, L]` row-major (A, and the public functions).
    Plain,
    /// B: rows are `(ob, j)` of `[out/L, r]`; element `l` lands at `B[ob·L + l, j]` of `[out, r]`.
    BTransposed { r: usize },
}

/// VB-LoRA settings (PEFT's `VBLoRAConfig` fields that shape the tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VbLoraConfig {
    /// Rank of A and B.
    pub r: usize,
    /// Rows of the shared bank.
    pub num_vectors: usize,
    /// Length L of a bank row; `in` and `out` must be multiples of it.
    pub vector_length: usize,
    /// Bank rows mixed per sub-vector.
    pub topk: usize,
}

/// The tensor-shaping part of a PEFT adapter file's VB-LoRA config.
impl From<&crate::io::peft::VbLoraConfig> for VbLoraConfig {
    fn from(c: &crate::io::peft::VbLoraConfig) -> Self {
        VbLoraConfig {
            r: c.r,
            num_vectors: c.num_vectors,
            vector_length: c.vector_length,
            topk: c.topk,
        }
    }
}

impl Default for VbLoraConfig {
    /// PEFT's defaults: `r=4, num_vectors=256, vector_length=256, topk=2`.
    /// (those of the file config, [`crate::io::peft::VbLoraConfig`]).
    fn default() -> Self {
        (&crate::io::peft::VbLoraConfig::default()).into()
    }
}

impl VbLoraConfig {
    /// Checks the settings that do not depend on a layer.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("VB-LoRA r must be a positive integer (as PEFT)"));
        }
        if self.topk == 0 {
            return Err(Error::invalid(
                "VB-LoRA topk must be a positive integer (as PEFT)",
            ));
        }
        if self.num_vectors == 0 || self.vector_length == 0 {
            return Err(Error::invalid(format!(
                "VB-LoRA bank [{}, {}] has a zero dimension",
                self.num_vectors, self.vector_length
            )));
        }
        if self.topk > self.num_vectors {
            return Err(Error::invalid(format!(
                "VB-LoRA topk {} exceeds num_vectors {} (torch.topk would fail)",
                self.topk, self.num_vectors
            )));
        }
        if self.num_vectors > u32::MAX as usize {
            return Err(Error::invalid("VB-LoRA num_vectors exceeds u32"));
        }
        Ok(())
    }

    /// A bank `U(-bound, bound)` (PEFT `init_vector_bank_bound`, default 0.02) from our seeded generator.
    pub fn init_bank(&self, bound: f32, seed: u64, device: Device) -> Result<Tensor> {
        self.validate()?;
        Tensor::rand(
            &[self.num_vectors, self.vector_length],
            -bound,
            bound,
            seed,
            DType::F32,
            device,
        )
    }
}

// ---------------------------------------------------------------- pure functions

fn check_compose(
    bank: &Tensor,
    logits: &Tensor,
    topk: usize,
    op: &'static str,
) -> Result<(usize, usize, usize)> {
    for (t, what) in [(bank, "bank"), (logits, "logits")] {
        if t.dtype() != DType::F32 {
            return Err(Error::dtype(op, format!("f32 {what}"), t.dtype()));
        }
    }
    bank.check_same_device(logits, op)?;
    let (v, len) = match bank.shape() {
        [v, l] => (*v, *l),
        s => {
            return Err(Error::shape(
                op,
                format!("bank must be [num_vectors, L], got {s:?}"),
            ));
        }
    };
    let (rows, lv) = logits.dims2(op)?;
    if lv != v {
        return Err(Error::shape(
            op,
            format!(
                "logits {:?} must end in num_vectors = {v} (bank {:?})",
                logits.shape(),
                bank.shape()
            ),
        ));
    }
    if topk == 0 || topk > v {
        return Err(Error::invalid(format!(
            "{op}: topk {topk} must be in 1..={v} (num_vectors)"
        )));
    }
    if v == 0 || len == 0 {
        return Err(Error::shape(
            op,
            format!("bank {:?} has a zero dimension", bank.shape()),
        ));
    }
    Ok((rows, v, len))
}

fn compose_impl(
    bank: &Tensor,
    logits: &Tensor,
    topk: usize,
    layout: Layout,
    shape: &[usize],
) -> Result<Tensor> {
    let op = "vblora_compose";
    let (_, v, len) = check_compose(bank, logits, topk, op)?;
    // The bank and the logits are on one device (checked above).
    match bank.device() {
        Device::Cpu => {
            let sel = cpu::select(logits.cpu_data::<f32>(op)?, v, topk);
            let out = cpu::compose(bank.cpu_data::<f32>(op)?, len, &sel, topk, layout);
            Tensor::from_vec(out, shape, Device::Cpu)
        }
        Device::Cuda(_) => cuda::compose(bank, logits, topk, layout, shape),
    }
}

fn compose_backward_impl(
    bank: &Tensor,
    logits: &Tensor,
    topk: usize,
    grad: &Tensor,
    layout: Layout,
) -> Result<(Tensor, Tensor)> {
    let op = "vblora_compose_backward";
    let (rows, v, len) = check_compose(bank, logits, topk, op)?;
    if grad.dtype() != DType::F32 {
        return Err(Error::dtype(op, "f32 grad_out", grad.dtype()));
    }
    grad.check_same_device(bank, op)?;
    if grad.numel() != rows * len {
        return Err(Error::shape(
            op,
            format!(
                "grad_out {:?} must hold {rows}x{len} elements (logits {:?})",
                grad.shape(),
                logits.shape()
            ),
        ));
    }
    let refuse = || {
        Error::invalid(
            "VB-LoRA logits contain non-finite values (-inf marks logits restored from a \
             save_only_topk_weights checkpoint); training from them is not supported, as in PEFT",
        )
    };
    match bank.device() {
        Device::Cpu => {
            let sel = cpu::select(logits.cpu_data::<f32>(op)?, v, topk);
            if sel.nonfinite {
                return Err(refuse());
            }
            let (dl, db) = cpu::compose_backward(
                bank.cpu_data::<f32>(op)?,
                len,
                v,
                &sel,
                topk,
                grad.cpu_data::<f32>(op)?,
                layout,
            );
            Ok((
                Tensor::from_vec(dl, logits.shape(), Device::Cpu)?,
                Tensor::from_vec(db, &[v, len], Device::Cpu)?,
            ))
        }
        Device::Cuda(_) => {
            let (dl, db, nonfinite) = cuda::compose_backward(bank, logits, topk, grad, layout)?;
            if nonfinite {
                return Err(refuse());
            }
            Ok((dl, db))
        }
    }
}

/// Mixes sub-vectors: `logits [.., V]` (f32) with the bank `[V, L]` → `[.., L]` f32, each row being
/// `Σ_j softmax(top-k logits)_j · bank[idx_j]` with torch's top-k order.
pub fn vblora_compose(bank: &Tensor, logits: &Tensor, topk: usize) -> Result<Tensor> {
    let mut shape = logits.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = bank.shape().get(1).copied().unwrap_or(0);
    }
    compose_impl(bank, logits, topk, Layout::Plain, &shape)
}

/// Backward of [`vblora_compose`]: `(dlogits [.., V], dbank [V, L])`, both f32. Logits outside the
/// top-k get zero gradient. Fails on non-finite logits (top-k-only checkpoints cannot be trained).
pub fn vblora_compose_backward(
    bank: &Tensor,
    logits: &Tensor,
    topk: usize,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    compose_backward_impl(bank, logits, topk, grad_out, Layout::Plain)
}

/// torch.topk(logits, topk) on the CPU for every row: `(indices [rows·k] as i64, softmax weights [rows·k])`,
/// in torch's output order (ties included).
pub fn vblora_topk(logits: &Tensor, topk: usize) -> Result<(Vec<i64>, Vec<f32>)> {
    let op = "vblora_topk";
    if logits.dtype() != DType::F32 {
        return Err(Error::dtype(op, "f32 logits", logits.dtype()));
    }
    let (_, v) = logits.dims2(op)?;
    if topk == 0 || topk > v {
        return Err(Error::invalid(format!("{op}: topk {topk} must be in 1..={v}")));
    }
    let host = logits.to_vec::<f32>()?;
    let sel = cpu::select(&host, v, topk);
    Ok((sel.idx.into_iter().map(i64::from).collect(), sel.w))
}

/// PEFT's `save_only_topk_weights` form of a logits tensor `[.., V]`: indices `[.., k]` (i64 here;
/// see [`TopkIndexDtype`] for the file dtype) and weights `[.., k-1]` (f32), on the CPU.
pub fn vblora_topk_for_save(logits: &Tensor, topk: usize) -> Result<(Tensor, Tensor)> {
    let (idx, w) = vblora_topk(logits, topk)?;
    let lead = &logits.shape()[..logits.rank() - 1];
    let mut is = lead.to_vec();
    is.push(topk);
    let mut ws = lead.to_vec();
    ws.push(topk - 1);
    let w_kept: Vec<f32> = w
        .chunks(topk)
        .flat_map(|c| c[..topk - 1].iter().copied())
        .collect();
    Ok((
        Tensor::from_vec(idx, &is, Device::Cpu)?,
        Tensor::from_vec(w_kept, &ws, Device::Cpu)?,
    ))
}

/// Logits `[rows, V]` (f32, on `device`) rebuilt from a 2-D top-k checkpoint as PEFT does on load
/// ([`vblora_expand_topk`] with f32 weights and `k <= num_vectors` required).
pub fn vblora_logits_from_topk(
    indices: &Tensor,
    weights: &Tensor,
    num_vectors: usize,
    device: Device,
) -> Result<Tensor> {
    let op = "vblora_logits_from_topk";
    if weights.dtype() != DType::F32 {
        return Err(Error::dtype(op, "f32 weights", weights.dtype()));
    }
    let (_, k) = indices.dims2(op)?;
    weights.dims2(op)?;
    if k > num_vectors {
        return Err(Error::invalid(format!(
            "{op}: k = {k} exceeds num_vectors {num_vectors}"
        )));
    }
    vblora_expand_topk(indices, weights, num_vectors)?.to_device(device)
}

/// The index dtype PEFT writes for `_topk_indices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkIndexDtype {
    U8,
    I16,
    I32,
    I64,
}

impl TopkIndexDtype {
    /// PEFT: u8 if `num_vectors < 2^8`, i16 if `< 2^15`, i32 if `< 2^31`, else i64.
    pub fn for_num_vectors(num_vectors: usize) -> TopkIndexDtype {
        if num_vectors < 1 << 8 {
            TopkIndexDtype::U8
        } else if num_vectors < 1 << 15 {
            TopkIndexDtype::I16
        } else if num_vectors < 1 << 31 {
            TopkIndexDtype::I32
        } else {
            TopkIndexDtype::I64
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            TopkIndexDtype::U8 => safetensors::Dtype::U8,
            TopkIndexDtype::I16 => safetensors::Dtype::I16,
            TopkIndexDtype::I32 => safetensors::Dtype::I32,
            TopkIndexDtype::I64 => safetensors::Dtype::I64,
        }
    }
}

/// Little-endian bytes of `indices` in PEFT's dtype for `num_vectors` (for writing `_topk_indices`,
/// including the i16 that the tensor type lacks).
pub fn encode_topk_indices(indices: &[i64], num_vectors: usize) -> Result<(safetensors::Dtype, Vec<u8>)> {
    if let Some(&bad) = indices.iter().find(|&&i| i < 0 || i as usize >= num_vectors) {
        return Err(Error::invalid(format!(
            "top-k index {bad} outside 0..{num_vectors}"
        )));
    }
    let d = TopkIndexDtype::for_num_vectors(num_vectors);
    let bytes = match d {
        TopkIndexDtype::U8 => indices.iter().map(|&i| i as u8).collect(),
        TopkIndexDtype::I16 => indices.iter().flat_map(|&i| (i as i16).to_le_bytes()).collect(),
        TopkIndexDtype::I32 => indices.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect(),
        TopkIndexDtype::I64 => indices.iter().flat_map(|&i| i.to_le_bytes()).collect(),
    };
    Ok((d.safetensors(), bytes))
}

/// Decodes `_topk_indices` bytes of any integer dtype PEFT may write, checking the range.
pub fn decode_topk_indices(dtype: safetensors::Dtype, bytes: &[u8], num_vectors: usize) -> Result<Vec<i64>> {
    use safetensors::Dtype as D;
    let ctx = "vblora _topk_indices";
    let size = match dtype {
        D::U8 | D::I8 => 1,
        D::I16 | D::U16 => 2,
        D::I32 | D::U32 => 4,
        D::I64 | D::U64 => 8,
        other => return Err(Error::format(ctx, format!("unsupported index dtype {other:?}"))),
    };
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::format(
            ctx,
            format!("{} bytes is not a multiple of {size}", bytes.len()),
        ));
    }
    let v: Vec<i64> = bytes
        .chunks_exact(size)
        .map(|b| match dtype {
            D::U8 => b[0] as i64,
            D::I8 => b[0] as i8 as i64,
            D::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            D::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            D::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            D::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        })
        .collect();
    if let Some(&bad) = v.iter().find(|&&i| i < 0 || i as usize >= num_vectors) {
        return Err(Error::format(
            ctx,
            format!("index {bad} outside 0..{num_vectors}"),
        ));
    }
    Ok(v)
}

// ---------------------------------------------------------------- the layer

/// Gradients of one VB-LoRA layer.
#[derive(Clone, Debug)]
pub struct VbLoraGrads {
    /// Gradient of the adapter term w.r.t. x (x's dtype and shape), when asked for.
    pub dx: Option<Tensor>,
    /// `[r, in/L, V]` f32.
    pub dlogits_a: Tensor,
    /// `[out/L, r, V]` f32.
    pub dlogits_b: Tensor,
    /// This layer's contribution to the shared bank's gradient, `[V, L]` f32 (sum over layers).
    pub dbank: Tensor,
}

/// One VB-LoRA-adapted linear layer (`y = x·Wᵀ + x·Aᵀ·Bᵀ`). Holds shapes and settings only; the bank
/// and logits are passed in (the bank is shared across layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VbLoraLayer {
    out: usize,
    inp: usize,
    cfg: VbLoraConfig,
}

impl VbLoraLayer {
    /// Validates the layer: `in` and `out` must be multiples of `vector_length` (as PEFT).
    pub fn new(out: usize, inp: usize, cfg: &VbLoraConfig) -> Result<VbLoraLayer> {
        cfg.validate()?;
        let l = cfg.vector_length;
        if inp == 0 || out == 0 {
            return Err(Error::invalid(format!(
                "VB-LoRA layer [{out}, {inp}] has a zero dimension"
            )));
        }
        if !inp.is_multiple_of(l) {
            return Err(Error::invalid(format!(
                "`in_features` {inp} must be divisible by `vector_length` {l}"
            )));
        }
        if !out.is_multiple_of(l) {
            return Err(Error::invalid(format!(
                "`out_features` {out} must be divisible by `vector_length` {l}"
            )));
        }
        Ok(VbLoraLayer { out, inp, cfg: *cfg })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    pub fn config(&self) -> &VbLoraConfig {
        &self.cfg
    }

    /// `[r, in/L, V]`.
    pub fn logits_a_shape(&self) -> [usize; 3] {
        [
            self.cfg.r,
            self.inp / self.cfg.vector_length,
            self.cfg.num_vectors,
        ]
    }

    /// `[out/L, r, V]`.
    pub fn logits_b_shape(&self) -> [usize; 3] {
        [
            self.out / self.cfg.vector_length,
            self.cfg.r,
            self.cfg.num_vectors,
        ]
    }

    /// Fresh logits `N(0, std²)` (PEFT `init_logits_std`, default 0.1) from our seeded generator.
    pub fn init_logits(&self, std: f32, seed: u64, device: Device) -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::randn(&self.logits_a_shape(), std, seed, DType::F32, device)?,
            Tensor::randn(
                &self.logits_b_shape(),
                std,
                seed.wrapping_add(1),
                DType::F32,
                device,
            )?,
        ))
    }

    fn check_logits(&self, bank: &Tensor, la: &Tensor, lb: &Tensor, op: &'static str) -> Result<()> {
        if bank.shape() != [self.cfg.num_vectors, self.cfg.vector_length] {
            return Err(Error::shape(
                op,
                format!(
                    "bank must be [{}, {}], got {:?}",
                    self.cfg.num_vectors,
                    self.cfg.vector_length,
                    bank.shape()
                ),
            ));
        }
        if la.shape() != self.logits_a_shape() || lb.shape() != self.logits_b_shape() {
            return Err(Error::shape(
                op,
                format!(
                    "logits must be A {:?} and B {:?}, got {:?} and {:?}",
                    self.logits_a_shape(),
                    self.logits_b_shape(),
                    la.shape(),
                    lb.shape()
                ),
            ));
        }
        Ok(())
    }

    /// `(A [r, in], B [out, r])`, f32, as PEFT's `_get_lora_matrices`.
    pub fn compose_ab(
        &self,
        bank: &Tensor,
        logits_a: &Tensor,
        logits_b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.check_logits(bank, logits_a, logits_b, "vblora compose_ab")?;
        let k = self.cfg.topk;
        let a = compose_impl(bank, logits_a, k, Layout::Plain, &[self.cfg.r, self.inp])?;
        let b = compose_impl(
            bank,
            logits_b,
            k,
            Layout::BTransposed { r: self.cfg.r },
            &[self.out, self.cfg.r],
        )?;
        Ok((a, b))
    }

    fn check_ab(&self, a: &Tensor, b: &Tensor, op: &'static str) -> Result<()> {
        if a.shape() != [self.cfg.r, self.inp] || b.shape() != [self.out, self.cfg.r] {
            return Err(Error::shape(
                op,
                format!(
                    "A must be [{}, {}] and B [{}, {}], got {:?} and {:?}",
                    self.cfg.r,
                    self.inp,
                    self.out,
                    self.cfg.r,
                    a.shape(),
                    b.shape()
                ),
            ));
        }
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return Err(Error::dtype(
                op,
                "f32 A and B",
                if a.dtype() != DType::F32 {
                    a.dtype()
                } else {
                    b.dtype()
                },
            ));
        }
        Ok(())
    }

    fn check_x(&self, x: &Tensor, dim: usize, what: &str, op: &'static str) -> Result<usize> {
        x.dtype().expect_float(op)?;
        x.rows_with_cols(dim, what, op)
    }

    /// `x·Aᵀ·Bᵀ` for `x [.., in]`: `[.., out]` in x's dtype (computed in f32, as PEFT casts x to the
    /// bank's dtype).
    pub fn forward_delta(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let op = "vblora forward";
        self.check_ab(a, b, op)?;
        self.check_x(x, self.inp, "x", op)?;
        let xf = x.to_dtype(DType::F32)?;
        let y = xf.matmul_t(a, false, true)?.matmul_t(b, false, true)?;
        y.to_dtype(x.dtype())
    }

    /// Backward of the adapter term, recomputing A and B from the logits.
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        bank: &Tensor,
        logits_a: &Tensor,
        logits_b: &Tensor,
        need_dx: bool,
    ) -> Result<VbLoraGrads> {
        let (a, b) = self.compose_ab(bank, logits_a, logits_b)?;
        self.backward_with_ab(x, dy, &a, &b, bank, logits_a, logits_b, need_dx)
    }

    /// Backward with A and B from the forward pass (saves the recomposition).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with_ab(
        &self,
        x: &Tensor,
        dy: &Tensor,
        a: &Tensor,
        b: &Tensor,
        bank: &Tensor,
        logits_a: &Tensor,
        logits_b: &Tensor,
        need_dx: bool,
    ) -> Result<VbLoraGrads> {
        let op = "vblora backward";
        self.check_logits(bank, logits_a, logits_b, op)?;
        self.check_ab(a, b, op)?;
        let t = self.check_x(x, self.inp, "x", op)?;
        let td = self.check_x(dy, self.out, "dy", op)?;
        if td != t || dy.dtype() != x.dtype() {
            return Err(super::mismatch_with_x(op, "dy", dy, x));
        }
        let xf = x.to_dtype(DType::F32)?.reshape(&[t, self.inp])?;
        let dyf = dy.to_dtype(DType::F32)?.reshape(&[t, self.out])?;
        let h = xf.matmul_t(a, false, true)?; // [T, r]
        let dh = dyf.matmul(b)?; // [T, r]
        let db = dyf.matmul_t(&h, true, false)?; // [out, r]
        let da = dh.matmul_t(&xf, true, false)?; // [r, in]
        let dx = if need_dx {
            Some(dh.matmul(a)?.reshape(x.shape())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let k = self.cfg.topk;
        let (dla, dbank_a) = compose_backward_impl(bank, logits_a, k, &da, Layout::Plain)?;
        let (dlb, dbank_b) =
            compose_backward_impl(bank, logits_b, k, &db, Layout::BTransposed { r: self.cfg.r })?;
        Ok(VbLoraGrads {
            dx,
            dlogits_a: dla,
            dlogits_b: dlb,
            dbank: dbank_a.add(&dbank_b)?,
        })
    }

    /// The chain rule through the composition alone: from `dA [r, in]` and `dB [out, r]` (f32, however
    /// the caller computed them, e.g. with dropout or a fused kernel) to
    /// `(dlogits_a [r, in/L, V], dlogits_b [out/L, r, V], dbank [V, L])`, all f32. Fails on non-finite
    /// logits (top-k-only checkpoints cannot be trained, as in PEFT).
    pub fn compose_backward(
        &self,
        bank: &Tensor,
        logits_a: &Tensor,
        logits_b: &Tensor,
        da: &Tensor,
        db: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "vblora compose_backward";
        self.check_logits(bank, logits_a, logits_b, op)?;
        self.check_ab(da, db, op)?;
        let k = self.cfg.topk;
        let (dla, dbank_a) = compose_backward_impl(bank, logits_a, k, da, Layout::Plain)?;
        let (dlb, dbank_b) =
            compose_backward_impl(bank, logits_b, k, db, Layout::BTransposed { r: self.cfg.r })?;
        Ok((dla, dlb, dbank_a.add(&dbank_b)?))
    }

    /// Dense `ΔW = B·A` `[out, in]` f32 for merging.
    pub fn delta_weight(&self, bank: &Tensor, logits_a: &Tensor, logits_b: &Tensor) -> Result<Tensor> {
        let (a, b) = self.compose_ab(bank, logits_a, logits_b)?;
        b.matmul(&a)
    }
}

// ------------------------------------------------------------------------------ save_only_topk_weights

/// Rebuilds VB-LoRA logits from the `save_only_topk_weights` form, as PEFT does on load: the stored
/// weights are the softmax of the top-k logits without its last column; the last weight is `1 - sum`, the
/// logits are `ln(w)` at the indices and `-inf` elsewhere. `indices`: integer `[.., k]`; `weights`: float
/// `[.., k-1]`. Returns f32 `[.., num_vectors]` on the indices' device. Computed in f32 like PEFT.
pub fn vblora_expand_topk(indices: &Tensor, weights: &Tensor, num_vectors: usize) -> Result<Tensor> {
    let op = "vblora_expand_topk";
    let (si, sw) = (indices.shape(), weights.shape());
    let k = *si
        .last()
        .ok_or_else(|| Error::shape(op, "indices must have at least 1 dim"))?;
    if k == 0 || sw.len() != si.len() || sw[..sw.len() - 1] != si[..si.len() - 1] || sw[sw.len() - 1] + 1 != k
    {
        return Err(Error::shape(
            op,
            format!("indices {si:?} and weights {sw:?} do not form a top-k pair"),
        ));
    }
    weights.dtype().expect_float(op)?;
    let idx = crate::io::peft::int_values(indices)?;
    let w = weights.to_vec_f32()?;
    let rows = idx.len() / k;
    let mut out = vec![f32::NEG_INFINITY; rows * num_vectors];
    for row in 0..rows {
        let ws = &w[row * (k - 1)..(row + 1) * (k - 1)];
        let last = 1.0f32 - ws.iter().sum::<f32>();
        for j in 0..k {
            let v = idx[row * k + j];
            if v < 0 || v as u64 >= num_vectors as u64 {
                return Err(Error::invalid(format!(
                    "{op}: index {v} outside [0, {num_vectors})"
                )));
            }
            let wj = if j + 1 < k { ws[j] } else { last };
            out[row * num_vectors + v as usize] = wj.ln();
        }
    }
    let mut shape = si[..si.len() - 1].to_vec();
    shape.push(num_vectors);
    Tensor::from_vec(out, &shape, indices.device())
}

/// The `save_only_topk_weights` form of VB-LoRA logits `[.., num_vectors]`, as PEFT writes it: the indices
/// of the `topk` largest logits (descending; ties to the lower index) as I64, and the softmax over those
/// logits without its last column, f32 `[.., topk - 1]`.
pub fn vblora_compress_topk(logits: &Tensor, topk: usize) -> Result<(Tensor, Tensor)> {
    let op = "vblora_compress_topk";
    let n = *logits
        .shape()
        .last()
        .ok_or_else(|| Error::shape(op, "logits must have at least 1 dim"))?;
    if topk == 0 || topk > n {
        return Err(Error::invalid(format!("{op}: topk {topk} must be in [1, {n}]")));
    }
    // torch.topk's exact selection and tie order (see `cpu::select`), so a file written from these equals
    // the one PEFT would write from the same logits.
    let (idx, w) = vblora_topk_for_save(&logits.to_dtype(DType::F32)?, topk)?;
    Ok((idx.to_device(logits.device())?, w.to_device(logits.device())?))
}
