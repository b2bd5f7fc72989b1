//! The zero-copy general op on the host. A layer call whose input and parameters are contiguous
//! f32/f16/bf16 CPU tensors (DoRA, WaveFT, VB-LoRA: one to three parameters) runs our layer's
//! `forward_values` / `backward_values` on candle's buffers in place: the input, the parameters and
//! the output gradient become our tensors over candle's memory ([`Tensor::from_external`]), and our
//! results (the output, the input and parameter gradients) move to candle as the `Vec`s our kernels
//! wrote ([`cpu_out`]). Nothing is copied; [`super::boundary_copies`] checks it, and it also counts any
//! copy our layer makes of a borrowed buffer because it needed it owned or mutable.
//!
//! **Two ops per call.** candle's custom ops take at most three tensors and DoRA / VB-LoRA read three
//! parameters besides the input, so instead of packing the parameters into one tensor (a copy) the
//! call is a *ticket* op over the parameters ([`Ticket`]: `CustomOp1/2/3`, its output one f32 zero)
//! followed by the layer op ([`HostOp`]: `CustomOp2` of the input and the ticket). The layer op holds
//! clones of the parameter tensors and reads them itself. Its backward pass returns the input gradient
//! and a zero for the ticket, and leaves the parameter gradients in a slot shared with the ticket,
//! whose backward pass (which candle runs after the layer op's, the ticket being its input) hands them
//! to the parameters.
//!
//! **Soundness.** A borrowed tensor holds a pointer into a candle storage's `Vec` and a clone of the
//! candle tensor (which keeps the storage alive). The invariant: *a borrowed tensor is read only while
//! this thread holds a read guard of a candle storage that holds exactly that buffer (address, length,
//! dtype)*. A buffer belongs to one live `Vec` of one storage, and candle writes a storage only under
//! its write lock (`Var::set`, `slice_set`, the in-place ops, `zero_set`...), so under the guard the
//! memory is allocated and nothing writes it, which is what [`Tensor::from_external`] asks. The forward
//! pass reads the input under candle's own guard of the op's input storage and the parameters under
//! guards it takes itself; its context (which keeps borrowed tensors for the backward pass) is only
//! ever read again by the backward pass, which first takes read guards of the input, the parameters
//! and the output gradient and checks that they still hold the buffers the forward pass borrowed (an
//! error, not a read, if one was replaced). Between the two passes nothing is read, so candle may
//! mutate the tensors in place then: normal training (forward, backward, optimizer step, next forward)
//! is sound, and so is a step between a forward and its backward or a second backward after a step, but
//! those compute the gradient from the *new* values of the input and parameters (the context is the old
//! forward's), so don't: mutate a layer's input or parameters in place (`Var::set`, `slice_set`, an
//! optimizer step) only after that call's backward pass, or drop the graph first. No borrowed tensor
//! leaves the op: results that are not owned `Vec`s are copied (and booked) while the guards are held,
//! and our layers keep the tensors they are given only in the context they return (the rule on
//! [`TapeLinear`]; DoRA's cached `Wᵀ` is built from the frozen base, never from these).

use super::convert::{contiguous, contiguous_range, cpu_out, from_candle_err, to_candle, to_candle_err};
use super::op::{cast_like, layer_backward, poisoned};
use crate::adapters::linear::TapeLinear;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use candle_core as cc;
use candle_core::Var;
use std::any::Any;
use std::sync::{Arc, Mutex};

/// The buffer a candle host storage holds: its address, element count and dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BufId {
    addr: usize,
    len: usize,
    dtype: u8,
}

fn cpu_buf_id(c: &cc::CpuStorage) -> Option<BufId> {
    let id = |addr: usize, len: usize, dtype: u8| Some(BufId { addr, len, dtype });
    match c {
        cc::CpuStorage::F32(v) => id(v.as_ptr().addr(), v.len(), 0),
        cc::CpuStorage::F16(v) => id(v.as_ptr().addr(), v.len(), 1),
        cc::CpuStorage::BF16(v) => id(v.as_ptr().addr(), v.len(), 2),
        _ => None,
    }
}

fn buf_id(s: &cc::Storage) -> Option<BufId> {
    match s {
        cc::Storage::Cpu(c) => cpu_buf_id(c),
        _ => None,
    }
}

/// The buffer of `t`'s storage (a brief read lock).
fn buf_of(t: &cc::Tensor) -> Option<BufId> {
    let (g, _) = t.storage_and_layout();
    buf_id(&g)
}

fn unsupported() -> Error {
    Error::invalid("candle: the in-place op needs f32, f16 or bf16 CPU tensors")
}

fn changed() -> Error {
    Error::invalid(
        "candle: a tensor's buffer changed under the adapter op (it was replaced between the forward and \
         the backward pass)",
    )
}

/// Read guards of the storages of `ts`, one per distinct buffer (taken in address order, so two
/// tensors sharing a storage never lock it twice), and for each tensor the index of its guard. A buffer
/// that changes between the first look and the lock is an error.
pub(super) fn lock_all<'a>(ts: &[&'a cc::Tensor]) -> Result<(Vec<cc::StorageRef<'a>>, Vec<usize>)> {
    let ids = ts
        .iter()
        .map(|t| buf_of(t).ok_or_else(unsupported))
        .collect::<Result<Vec<_>>>()?;
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut guards = Vec::with_capacity(distinct.len());
    for id in &distinct {
        let first = ids.iter().position(|i| i == id).ok_or_else(changed)?;
        let (g, _) = ts[first].storage_and_layout();
        if buf_id(&g) != Some(*id) {
            return Err(changed());
        }
        guards.push(g);
    }
    let which = ids
        .iter()
        .map(|id| distinct.binary_search(id).map_err(|_| changed()))
        .collect::<Result<Vec<_>>>()?;
    Ok((guards, which))
}

/// The region of host storage `s` that `layout` (contiguous) selects, as our tensor of the layout's
/// shape over candle's memory, kept alive by a clone of `owner`.
///
/// # Safety
///
/// The returned tensor and everything sharing its storage may only be read while this thread holds a
/// read guard of a candle storage that holds the buffer of `s` (the same address, length and dtype),
/// and must not leave the caller's control (see the module docs and [`Tensor::from_external`]).
unsafe fn borrow(s: &cc::CpuStorage, layout: &cc::Layout, owner: &cc::Tensor) -> Result<Tensor> {
    let r = contiguous_range(layout)?;
    let shape = layout.dims();
    let keep: Arc<dyn Any + Send + Sync> = Arc::new(owner.clone());
    let bad = || Error::invalid("candle: storage region out of bounds");
    // SAFETY: the caller reads the tensor only under a read guard of a storage holding this very
    // buffer, i.e. while it is allocated and unwritten, and keeps the tensor to itself: that is
    // `from_external`'s contract.
    unsafe {
        match s {
            cc::CpuStorage::F32(v) => Tensor::from_external(v.get(r).ok_or_else(bad)?, shape, keep),
            cc::CpuStorage::F16(v) => Tensor::from_external(v.get(r).ok_or_else(bad)?, shape, keep),
            cc::CpuStorage::BF16(v) => Tensor::from_external(v.get(r).ok_or_else(bad)?, shape, keep),
            _ => Err(unsupported()),
        }
    }
}

/// [`borrow`] of the storage a guard holds.
///
/// # Safety
///
/// As for [`borrow`], with `g` the guard.
unsafe fn borrow_guarded(g: &cc::Storage, layout: &cc::Layout, owner: &cc::Tensor) -> Result<Tensor> {
    match g {
        // SAFETY: forwarded to the caller.
        cc::Storage::Cpu(c) => unsafe { borrow(c, layout, owner) },
        _ => Err(unsupported()),
    }
}

/// The parameter gradients the layer op's backward pass leaves for the ticket's.
type Slot = Arc<Mutex<Option<Vec<cc::Tensor>>>>;

/// What the forward pass leaves for the backward pass: our layer's context (which may hold borrowed
/// tensors) and the buffers it borrowed (input first, then the parameters).
struct State<C> {
    ctx: C,
    bufs: Vec<BufId>,
}

/// The layer op of one call (see the module docs).
pub(crate) struct HostOp<L: TapeLinear> {
    layer: Arc<L>,
    seed: Option<u64>,
    /// The input (keeps its buffer alive for the borrowed input in the context).
    x: cc::Tensor,
    /// The parameters in `tape_params` order (read in place by both passes).
    params: Vec<cc::Tensor>,
    slot: Slot,
    state: Mutex<Option<State<L::Ctx>>>,
}

/// The ticket op of one call: its output stands for the parameters in candle's graph.
struct Ticket(Slot);

impl Ticket {
    fn fwd() -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        Ok((cc::CpuStorage::F32(vec![0.0]), cc::Shape::from_dims(&[1])))
    }

    fn grads(&self, n: usize) -> cc::Result<Vec<Option<cc::Tensor>>> {
        let g = self
            .0
            .lock()
            .map_err(|_| to_candle_err(poisoned()))?
            .take()
            .filter(|g| g.len() == n)
            .ok_or_else(|| {
                to_candle_err(Error::invalid(
                    "candle: the adapter parameters' backward ran before the layer's",
                ))
            })?;
        Ok(g.into_iter().map(Some).collect())
    }
}

const TICKET: &str = "adapter_params";

impl cc::CustomOp1 for Ticket {
    fn name(&self) -> &'static str {
        TICKET
    }
    fn cpu_fwd(&self, _: &cc::CpuStorage, _: &cc::Layout) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        Ticket::fwd()
    }
    fn bwd(&self, _: &cc::Tensor, _: &cc::Tensor, _: &cc::Tensor) -> cc::Result<Option<cc::Tensor>> {
        let [a] = <[_; 1]>::try_from(self.grads(1)?).map_err(|_| to_candle_err(changed()))?;
        Ok(a)
    }
}

impl cc::CustomOp2 for Ticket {
    fn name(&self) -> &'static str {
        TICKET
    }
    fn cpu_fwd(
        &self,
        _: &cc::CpuStorage,
        _: &cc::Layout,
        _: &cc::CpuStorage,
        _: &cc::Layout,
    ) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        Ticket::fwd()
    }
    fn bwd(
        &self,
        _: &cc::Tensor,
        _: &cc::Tensor,
        _: &cc::Tensor,
        _: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>)> {
        let [a, b] = <[_; 2]>::try_from(self.grads(2)?).map_err(|_| to_candle_err(changed()))?;
        Ok((a, b))
    }
}

impl cc::CustomOp3 for Ticket {
    fn name(&self) -> &'static str {
        TICKET
    }
    fn cpu_fwd(
        &self,
        _: &cc::CpuStorage,
        _: &cc::Layout,
        _: &cc::CpuStorage,
        _: &cc::Layout,
        _: &cc::CpuStorage,
        _: &cc::Layout,
    ) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        Ticket::fwd()
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        _: &cc::Tensor,
        _: &cc::Tensor,
        _: &cc::Tensor,
        _: &cc::Tensor,
        _: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>, Option<cc::Tensor>)> {
        let [a, b, c] = <[_; 3]>::try_from(self.grads(3)?).map_err(|_| to_candle_err(changed()))?;
        Ok((a, b, c))
    }
}

fn float(d: cc::DType) -> bool {
    matches!(d, cc::DType::F32 | cc::DType::F16 | cc::DType::BF16)
}

/// `x` (contiguous) through `layer` on the in-place path, or `None` when it does not apply (not on the
/// CPU, not f32/f16/bf16, no or more than three parameters, a parameter sharing the input's storage):
/// the caller then takes the general (copying) op.
pub(crate) fn apply<L: TapeLinear>(
    layer: &Arc<L>,
    vars: &[Var],
    x: &cc::Tensor,
    seed: Option<u64>,
    record: bool,
) -> Option<cc::Result<cc::Tensor>> {
    let params: Vec<cc::Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let plain = |t: &cc::Tensor| t.device().is_cpu() && float(t.dtype()) && t.is_contiguous();
    if params.is_empty() || params.len() > 3 || !plain(x) || !params.iter().all(plain) {
        return None;
    }
    // The forward pass runs under candle's guard of x's storage and locks the parameters' storages
    // itself: a parameter in x's storage would be locked twice.
    let xb = buf_of(x)?;
    if params.iter().any(|p| buf_of(p).is_none_or(|b| b == xb)) {
        return None;
    }
    let slot = Slot::default();
    let ticket = Ticket(slot.clone());
    let ticket = match (params.as_slice(), record) {
        ([a], true) => a.apply_op1(ticket),
        ([a], false) => a.apply_op1_no_bwd(&ticket),
        ([a, b], true) => a.apply_op2(b, ticket),
        ([a, b], false) => a.apply_op2_no_bwd(b, &ticket),
        ([a, b, c], true) => a.apply_op3(b, c, ticket),
        ([a, b, c], false) => a.apply_op3_no_bwd(b, c, &ticket),
        _ => return None,
    };
    let ticket = match ticket {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let op = HostOp {
        layer: layer.clone(),
        seed,
        x: x.clone(),
        params,
        slot,
        state: Mutex::new(None),
    };
    Some(if record {
        x.apply_op2(&ticket, op)
    } else {
        x.apply_op2_no_bwd(&ticket, &op)
    })
}

impl<L: TapeLinear> HostOp<L> {
    fn forward(&self, s1: &cc::CpuStorage, l1: &cc::Layout) -> Result<(cc::CpuStorage, cc::Shape)> {
        let x_buf = cpu_buf_id(s1).ok_or_else(unsupported)?;
        let owners: Vec<&cc::Tensor> = self.params.iter().collect();
        let (guards, which) = lock_all(&owners)?;
        // SAFETY: `s1` is the storage candle locked for this call (read) until `cpu_fwd` returns; the
        // borrowed input is read below within that time, and afterwards only through the context by
        // `backward`, which first re-locks the input's storage and checks that it still holds this
        // buffer. It never leaves the op (see the module docs).
        let x = unsafe { borrow(s1, l1, &self.x) }?;
        let params = self
            .params
            .iter()
            .zip(&which)
            // SAFETY: `guards[w]` is a read guard of the storage holding `p`'s buffer, held until the
            // forward pass below is done; later reads go through `backward`, which re-locks and checks
            // the buffer first. The tensors never leave the op.
            .map(|(p, &w)| unsafe { borrow_guarded(&guards[w], p.layout(), p) })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = params.iter().collect();
        let (y, ctx) = self.layer.forward_values(&refs, &x, self.seed)?;
        let bufs = std::iter::once(Some(x_buf))
            .chain(which.iter().map(|&w| buf_id(&guards[w])))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(unsupported)?;
        *self.state.lock().map_err(|_| poisoned())? = Some(State { ctx, bufs });
        let shape = cc::Shape::from_dims(y.shape());
        // A `y` that is not an owned Vec (sharing a borrowed buffer) is copied here, under the guards.
        Ok((cpu_out(y)?, shape))
    }

    /// The input gradient (when `x` is tracked); the parameter gradients go to the slot.
    fn backward(&self, x: &cc::Tensor, grad: &cc::Tensor) -> Result<Option<cc::Tensor>> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        let st = state
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: backward before forward", L::OP)))?;
        let grad = contiguous(grad).map_err(from_candle_err)?;
        let n = self.params.len();
        let mut owners: Vec<&cc::Tensor> = vec![x];
        owners.extend(self.params.iter());
        owners.push(&grad);
        let (guards, which) = lock_all(&owners)?;
        // The context's borrowed tensors point at the buffers the forward pass recorded: they may be
        // read only if the locked storages still hold exactly those.
        if st.bufs.len() != n + 1
            || st
                .bufs
                .iter()
                .zip(&which)
                .any(|(b, &w)| buf_id(&guards[w]) != Some(*b))
        {
            return Err(changed());
        }
        let params = self
            .params
            .iter()
            .zip(&which[1..])
            // SAFETY: `guards[w]` is a read guard of `p`'s storage, held until the gradients below are
            // computed and converted; the tensors are dropped before this function returns.
            .map(|(p, &w)| unsafe { borrow_guarded(&guards[w], p.layout(), p) })
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: as above, `guards[which[n + 1]]` guards the output gradient's storage.
        let dy = unsafe { borrow_guarded(&guards[which[n + 1]], grad.layout(), &grad) }?;
        let refs: Vec<&Tensor> = params.iter().collect();
        // The context is read here, under the guards checked above. Results that share a borrowed
        // buffer are copied by `cpu_out` (inside `to_candle`), still under the guards.
        let (dx, grads) = layer_backward(&*self.layer, &st.ctx, &refs, &dy, x)?;
        let pgrads = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| cast_like(to_candle(g, p.device())?, p))
            .collect::<Result<Vec<_>>>()?;
        if pgrads.len() != n {
            return Err(Error::invalid(format!(
                "{}: a parameter gradient is missing",
                L::OP
            )));
        }
        *self.slot.lock().map_err(|_| poisoned())? = Some(pgrads);
        Ok(dx)
    }
}

impl<L: TapeLinear> cc::CustomOp2 for HostOp<L> {
    fn name(&self) -> &'static str {
        L::OP
    }

    fn cpu_fwd(
        &self,
        s1: &cc::CpuStorage,
        l1: &cc::Layout,
        _ticket: &cc::CpuStorage,
        _: &cc::Layout,
    ) -> cc::Result<(cc::CpuStorage, cc::Shape)> {
        self.forward(s1, l1).map_err(to_candle_err)
    }

    fn bwd(
        &self,
        arg1: &cc::Tensor,
        arg2: &cc::Tensor,
        _res: &cc::Tensor,
        grad_res: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>)> {
        let dx = self.backward(arg1, grad_res).map_err(to_candle_err)?;
        // The ticket's gradient only routes candle to its backward pass (which hands out the slot).
        let dticket = cc::Tensor::zeros(arg2.shape(), arg2.dtype(), arg2.device())?;
        Ok((dx, Some(dticket)))
    }
}
