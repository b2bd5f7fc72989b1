//! Launches of the fused optimizer kernels of `kernels/optim.cu`, one per parameter tensor, through the
//! typed launchers generated from the kernels' C signatures (`crate::device::cuda::kernels::optim`).

use super::{AdamWScalars, BnbScalars};
use crate::device::cuda::kernels as k;
use crate::error::{Error, Result};
use crate::tensor::cuda::{CudaStorage, storage, typed};
use crate::tensor::{Storage, Tensor};
use cudarc::driver::LaunchConfig;

const THREADS: u32 = 256;
/// Grid cap: 4096 blocks x 256 threads x 4 elements = 4M elements per sweep, more than enough to
/// saturate HBM on any current GPU; larger tensors grid-stride.
const MAX_BLOCKS: usize = 4096;

fn storage_mut<'a>(t: &'a mut Tensor, what: &'static str) -> Result<&'a mut CudaStorage> {
    match t.storage_mut()? {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(what, "expected a CUDA tensor, got a CPU tensor")),
    }
}

/// `blocks` (at least one, at most [`MAX_BLOCKS`]) of [`THREADS`] threads.
fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// In-place AdamW on CUDA tensors: `p` (f32/f16/bf16), `g`, `m`, `v` (f32), all of `p`'s element
/// count on one device (checked by the caller).
pub(crate) fn adamw(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    s: &AdamWScalars,
) -> Result<()> {
    let n = p.numel();
    if n == 0 {
        return Ok(());
    }
    let dtype = p.dtype();
    let gs = storage(g, "AdamW gradient")?;
    let b = gs.backend.clone();
    let cfg = grid(n.div_ceil(4).div_ceil(THREADS as usize));
    let gv = gs.view::<f32>()?;
    let mut mv = storage_mut(m, "AdamW state m")?.view_mut::<f32>()?;
    let mut vv = storage_mut(v, "AdamW state v")?.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW parameter")?;
    typed!(dtype, "AdamW", |T| {
        let mut pv = ps.view_mut::<T>()?;
        // SAFETY: adamw_<T>(T* p, const float* g, float* m, float* v, int64 n, 7 x float): p, g, m and v
        // each hold n elements (the caller checked that the gradient and both moments have the
        // parameter's element count, dtype f32, on this device). The kernel grid-strides over [0, n) and
        // its vector path checks pointer alignment itself, falling back to scalar accesses.
        unsafe {
            k::optim::adamw::<T>(
                &b, cfg, &mut pv, &gv, &mut mv, &mut vv, n as i64, s.decay, s.w1, s.beta2, s.w2, s.neg_step,
                s.bc2_sqrt, s.eps,
            )
        }
    })
}

/// bitsandbytes' 32-bit Adam (`adam_bnb32_<T>`) on CUDA tensors of `p`'s element count (checked by the
/// caller).
pub(crate) fn adam_bnb32(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    s: &BnbScalars,
) -> Result<()> {
    let n = p.numel();
    if n == 0 {
        return Ok(());
    }
    let dtype = p.dtype();
    let gs = storage(g, "AdamW8bit gradient")?;
    let b = gs.backend.clone();
    let cfg = grid(n.div_ceil(THREADS as usize));
    let gv = gs.view::<f32>()?;
    let mut mv = storage_mut(m, "AdamW8bit state m")?.view_mut::<f32>()?;
    let mut vv = storage_mut(v, "AdamW8bit state v")?.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW8bit parameter")?;
    typed!(dtype, "AdamW8bit", |T| {
        let mut pv = ps.view_mut::<T>()?;
        // SAFETY: adam_bnb32_<T>(T* p, const float* g, float* m, float* v, int64 n, 7 x float, int):
        // p, g, m and v each hold n elements on this device (checked by the caller); the kernel
        // grid-strides over [0, n).
        unsafe {
            k::optim::adam_bnb32::<T>(
                &b,
                cfg,
                &mut pv,
                &gv,
                &mut mv,
                &mut vv,
                n as i64,
                s.beta1,
                s.w1,
                s.beta2,
                s.w2,
                s.step_size,
                s.eps_c2,
                s.decay,
                s.weight_decay as i32,
            )
        }
    })
}

/// The two dynamic maps of AdamW8bit (signed for m, unsigned for v; 256 f32 each) on one device.
type DeviceMaps = (cudarc::driver::CudaSlice<f32>, cudarc::driver::CudaSlice<f32>);

/// The dynamic maps on `b`'s device: uploaded by the first 8-bit step on that device (2 KB) and kept
/// for the life of the process, instead of one upload per step.
fn device_maps(b: &crate::device::cuda::CudaBackend) -> Result<std::sync::Arc<DeviceMaps>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static MAPS: OnceLock<Mutex<HashMap<usize, Arc<DeviceMaps>>>> = OnceLock::new();
    let mut maps = MAPS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::device("cuda", "AdamW8bit map cache poisoned"))?;
    if let Some(m) = maps.get(&b.ordinal) {
        return Ok(m.clone());
    }
    let t = super::eightbit::tables();
    let m = Arc::new((b.stream.clone_htod(&t.code_m)?, b.stream.clone_htod(&t.code_v)?));
    maps.insert(b.ordinal, m.clone());
    Ok(m)
}

/// bitsandbytes' blockwise 8-bit Adam (`adam8bit_<T>`): one block of 256 threads per quantization
/// block. `codes` are the u8 codes of m and v (n each), `absmax` their f32 block maxima (ceil(n/256)
/// each), all on `p`'s device (checked by the caller). The two dynamic maps come from [`device_maps`].
pub(crate) fn adam8bit(
    p: &mut Tensor,
    g: &Tensor,
    codes: [&mut Tensor; 2],
    absmax: [&mut Tensor; 2],
    s: &BnbScalars,
) -> Result<()> {
    let n = p.numel();
    if n == 0 {
        return Ok(());
    }
    let dtype = p.dtype();
    let [cm, cv] = codes;
    let [am, av] = absmax;
    let nb = super::eightbit::nblocks(n);
    if cm.numel() != n || cv.numel() != n || am.numel() != nb || av.numel() != nb {
        return Err(Error::invalid(
            "AdamW8bit: state sizes do not match the parameter",
        ));
    }
    let gs = storage(g, "AdamW8bit gradient")?;
    let b = gs.backend.clone();
    let maps = device_maps(&b)?;
    let cfg = LaunchConfig {
        grid_dim: (nb.min(1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let gv = gs.view::<f32>()?;
    let (cmv_s, cvv_s) = (maps.0.as_view(), maps.1.as_view());
    let mut cmv = storage_mut(cm, "AdamW8bit codes m")?.view_mut::<u8>()?;
    let mut cvv = storage_mut(cv, "AdamW8bit codes v")?.view_mut::<u8>()?;
    let mut amv = storage_mut(am, "AdamW8bit absmax m")?.view_mut::<f32>()?;
    let mut avv = storage_mut(av, "AdamW8bit absmax v")?.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW8bit parameter")?;
    typed!(dtype, "AdamW8bit", |T| {
        let mut pv = ps.view_mut::<T>()?;
        // SAFETY: adam8bit_<T>(T* p, const float* g, u8* cm, u8* cv, float* am, float* av, int64 n,
        // 7 x float, int, const float* code_m, const float* code_v): p, g, cm, cv hold n elements, am
        // and av ceil(n/256) (checked above), both codes 256 floats, all on this device. 256 threads
        // per block, as the kernel's shared-memory code load and reduction require; the kernel
        // grid-strides over the quantization blocks.
        unsafe {
            k::optim::adam8bit::<T>(
                &b,
                cfg,
                &mut pv,
                &gv,
                &mut cmv,
                &mut cvv,
                &mut amv,
                &mut avv,
                n as i64,
                s.beta1,
                s.w1,
                s.beta2,
                s.w2,
                s.step_size,
                s.eps_c2,
                s.decay,
                s.weight_decay as i32,
                &cmv_s,
                &cvv_s,
            )
        }
    })
}

// ---------------------------------------------------------------------------------------------------
// Multi-tensor steps (`*_multi_<T>`): one launch per group of tensors with the same state format and
// parameter dtype on one device.

use super::AdamWConfig;
use super::multi::{self, Item};
use super::state::Moments;
use crate::device::Device;
use crate::device::cuda::{Unified, backend};
use crate::tensor::DType;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use std::collections::BTreeMap;

/// Grid cap of the multi-tensor launches (they grid-stride over chunks beyond it).
const MULTI_MAX_BLOCKS: usize = 1 << 16;

/// The device address of a CUDA tensor's bytes, for a kernel on the backend's stream (the stream every
/// operation of this crate runs on, so the kernel is ordered after the tensor's producers).
fn address(t: &Tensor, what: &'static str) -> Result<u64> {
    let s = storage(t, what)?;
    let (ptr, _sync) = s.data.device_ptr(&s.backend.stream);
    Ok(ptr)
}

/// [`address`] of a tensor the kernel writes: the storage is made unique first (copy-on-write, so a
/// tensor shared with a live tape is not modified under it).
fn address_mut(t: &mut Tensor, what: &'static str) -> Result<u64> {
    let s = storage_mut(t, what)?;
    let (ptr, _sync) = s.data.device_ptr_mut(&s.backend.stream);
    Ok(ptr)
}

/// The state format of a multi-tensor group (`FORMATS` order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Format {
    Torch,
    Bnb32,
    Bnb8,
}

fn dtype_key(d: DType) -> Result<u8> {
    match d {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(Error::dtype("optimizer", "a float parameter", other)),
    }
}

fn key_dtype(k: u8) -> DType {
    match k {
        0 => DType::F32,
        1 => DType::F16,
        _ => DType::BF16,
    }
}

/// Moments in managed memory (`--paged`): m and v (f32 moments or u8 codes) paged; the 8-bit block
/// maxima (n/256 floats) stay on the device, as bitsandbytes keeps them.
pub(crate) struct Paged {
    pub(crate) format: Format,
    pub(crate) n: usize,
    ordinal: usize,
    m: Unified,
    v: Unified,
    absmax: Option<[Tensor; 2]>,
}

impl Paged {
    /// Whether `dev` can hold paged state (`CONCURRENT_MANAGED_ACCESS`).
    pub(crate) fn device_can_page(dev: Device) -> Result<bool> {
        match dev {
            Device::Cpu => Ok(false),
            Device::Cuda(o) => Unified::supported(&*backend(o)?),
        }
    }

    /// The paged copy of CUDA (or host) moments `src` of an `n`-element parameter on device `ordinal`.
    pub(crate) fn from_moments(src: &Moments, n: usize, ordinal: usize) -> Result<Paged> {
        let b = backend(ordinal)?;
        let tensors = src.snapshot()?;
        let get = |name: &str| -> Result<Tensor> {
            tensors
                .iter()
                .find(|(s, _)| *s == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| Error::invalid(format!("paged state: no tensor {name:?}")))
        };
        let bytes = |t: &Tensor| -> Result<Vec<u8>> {
            Ok(match t.dtype() {
                DType::U8 => t.to_vec::<u8>()?,
                _ => bytemuck::cast_slice(&t.to_vec::<f32>()?).to_vec(),
            })
        };
        let unified = |t: &Tensor| -> Result<Unified> {
            let mut u = Unified::zeros(&b, t.size_in_bytes())?;
            u.copy_from(&bytes(t)?)?;
            Ok(u)
        };
        let format = match src.format() {
            "torch" => Format::Torch,
            "bnb32" => Format::Bnb32,
            _ => Format::Bnb8,
        };
        let absmax = match format {
            Format::Bnb8 => Some([
                get("absmax_m")?.to_device(Device::Cuda(ordinal))?,
                get("absmax_v")?.to_device(Device::Cuda(ordinal))?,
            ]),
            _ => None,
        };
        Ok(Paged {
            format,
            n,
            ordinal,
            m: unified(&get("m")?)?,
            v: unified(&get("v")?)?,
            absmax,
        })
    }

    /// The device the state belongs to.
    pub(crate) fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Bytes of state (paged and on the device).
    pub(crate) fn size_in_bytes(&self) -> usize {
        2 * self.bytes_per_moment()
            + self
                .absmax
                .as_ref()
                .map_or(0, |a| a[0].size_in_bytes() + a[1].size_in_bytes())
    }

    fn bytes_per_moment(&self) -> usize {
        match self.format {
            Format::Bnb8 => self.n,
            _ => 4 * self.n,
        }
    }

    /// The state as host tensors by checkpoint name (`m`, `v`, and for 8-bit `absmax_m`, `absmax_v`),
    /// read after the device has finished with it.
    pub(crate) fn to_tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let n = self.n;
        let read = |u: &Unified| -> Result<Tensor> {
            let bytes = u.to_vec()?;
            match self.format {
                Format::Bnb8 => Tensor::from_slice(&bytes[..n], &[n], Device::Cpu),
                _ => {
                    let f: Vec<f32> = bytes[..4 * n]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    Tensor::from_slice(&f, &[n], Device::Cpu)
                }
            }
        };
        let mut out = vec![("m", read(&self.m)?), ("v", read(&self.v)?)];
        if let Some([am, av]) = &self.absmax {
            out.push(("absmax_m", am.clone()));
            out.push(("absmax_v", av.clone()));
        }
        Ok(out)
    }

    /// Queues the migration of both moments to the device before a step.
    fn prefetch(&self) -> Result<()> {
        self.m.prefetch_to_device()?;
        self.v.prefetch_to_device()
    }

    /// The state operands of a descriptor: `[m, v]` or `[codes m, codes v, absmax m, absmax v]`.
    fn addresses(&mut self) -> Result<Vec<u64>> {
        let mut out = vec![self.m.device_address(), self.v.device_address()];
        if let Some([am, av]) = &mut self.absmax {
            out.push(address_mut(am, "AdamW8bit absmax m")?);
            out.push(address_mut(av, "AdamW8bit absmax v")?);
        }
        Ok(out)
    }
}

/// The format and state operands of CUDA moments (paged state is prefetched to the device first).
fn moment_operands(m: &mut Moments) -> Result<(Format, Vec<u64>)> {
    Ok(match m {
        Moments::Torch { m, v } => (
            Format::Torch,
            vec![address_mut(m, "AdamW state m")?, address_mut(v, "AdamW state v")?],
        ),
        Moments::Bnb32 { m, v } => (
            Format::Bnb32,
            vec![
                address_mut(m, "AdamW8bit state m")?,
                address_mut(v, "AdamW8bit state v")?,
            ],
        ),
        Moments::Bnb8 {
            m,
            v,
            absmax_m,
            absmax_v,
        } => (
            Format::Bnb8,
            vec![
                address_mut(m, "AdamW8bit codes m")?,
                address_mut(v, "AdamW8bit codes v")?,
                address_mut(absmax_m, "AdamW8bit absmax m")?,
                address_mut(absmax_v, "AdamW8bit absmax v")?,
            ],
        ),
        Moments::Paged(p) => {
            p.prefetch()?;
            (p.format, p.addresses()?)
        }
    })
}

/// The tensors of one optimizer step on CUDA, grouped by (device, state format, parameter dtype) and
/// launched together by [`MultiBatch::flush`].
pub(crate) struct MultiBatch {
    hyper: AdamWConfig,
    groups: BTreeMap<(usize, Format, u8), Vec<Item>>,
    /// Gradients referenced by queued descriptors, kept alive until the launch is queued (a CUDA buffer
    /// dropped earlier would be freed on the stream before the kernel reads it).
    keep: Vec<Tensor>,
}

impl MultiBatch {
    pub(crate) fn new(hyper: &AdamWConfig) -> MultiBatch {
        MultiBatch {
            hyper: hyper.clone(),
            groups: BTreeMap::new(),
            keep: Vec::new(),
        }
    }

    /// Queues the update of `p` (or its f32 master) with gradient `g` and CUDA moments `m` at 1-based
    /// step `step`. The caller checked that `g` and the state have `p`'s element count on `p`'s device.
    pub(crate) fn push(&mut self, p: &mut Tensor, g: &Tensor, m: &mut Moments, step: u64) -> Result<()> {
        let Device::Cuda(ordinal) = p.device() else {
            return Err(Error::device("optimizer", "multi-tensor step of a CPU tensor"));
        };
        if g.device() != p.device()
            || m.device() != p.device()
            || g.numel() != p.numel()
            || m.numel() != p.numel()
        {
            return Err(Error::invalid(
                "optimizer: gradient or state does not match the parameter",
            ));
        }
        let n = p.numel();
        if n == 0 {
            return Ok(());
        }
        let dt = dtype_key(p.dtype())?;
        let (format, state) = moment_operands(m)?;
        let scalars = match format {
            Format::Torch => {
                let s = AdamWScalars::new(&self.hyper, step);
                [s.neg_step, s.bc2_sqrt]
            }
            _ => {
                let s = BnbScalars::new(&self.hyper, step);
                [s.step_size, s.eps_c2]
            }
        };
        let mut ptrs = vec![
            address_mut(p, "optimizer parameter")?,
            address(g, "optimizer gradient")?,
        ];
        ptrs.extend(state);
        self.keep.push(g.clone());
        self.groups
            .entry((ordinal, format, dt))
            .or_default()
            .push(Item { ptrs, n, scalars });
        Ok(())
    }

    /// Launches every queued group (one kernel each) on its device's stream and empties the batch.
    pub(crate) fn flush(&mut self) -> Result<()> {
        let groups = std::mem::take(&mut self.groups);
        for ((ordinal, format, dt), items) in groups {
            launch_group(ordinal, format, key_dtype(dt), &items, &self.hyper)?;
        }
        // The launches are queued: buffers freed from here on are freed after them (stream order).
        self.keep.clear();
        Ok(())
    }
}

/// One multi-tensor launch over `items` (one format and parameter dtype, on device `ordinal`).
fn launch_group(
    ordinal: usize,
    format: Format,
    dtype: DType,
    items: &[Item],
    hyper: &AdamWConfig,
) -> Result<()> {
    let (nptrs, chunk) = match format {
        Format::Bnb8 => (multi::PTRS8, multi::CHUNK8),
        _ => (multi::PTRS32, multi::CHUNK32),
    };
    let d = multi::descriptors(items, nptrs, chunk)?;
    if d.ntensors == 0 {
        return Ok(());
    }
    let b = backend(ordinal)?;
    let descs = b.stream.clone_htod(&d.words)?;
    let dv = descs.as_view();
    let cfg = LaunchConfig {
        grid_dim: (d.nchunks.min(MULTI_MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (nt, nc) = (d.ntensors as i64, d.nchunks as i64);
    match format {
        Format::Torch => {
            let s = AdamWScalars::new(hyper, 1); // the step-independent fields
            typed!(dtype, "AdamW", |T| {
                // SAFETY: adamw_multi_<T>(const int64* descs, int64 ntensors, int64 nchunks, 5 x float):
                // `descs` holds ntensors descriptors of DESC32_WORDS = 4 + 3 words built by
                // multi::descriptors from live CUDA tensors of this device (parameter of dtype T, f32
                // gradient and moments, n elements each, checked in MultiBatch::push and kept alive until
                // this launch is queued); starts strictly increase from 0 and cover nchunks chunks of
                // MULTI_CHUNK = multi::CHUNK32 elements. 256 threads per block as the chunk size assumes.
                unsafe {
                    k::optim::adamw_multi::<T>(&b, cfg, &dv, nt, nc, s.decay, s.w1, s.beta2, s.w2, s.eps)
                }
            })
        }
        Format::Bnb32 => {
            let s = BnbScalars::new(hyper, 1);
            typed!(dtype, "AdamW8bit", |T| {
                // SAFETY: adam_bnb32_multi_<T>(descs, ntensors, nchunks, 6 x float, int): as for
                // adamw_multi above (same descriptor layout, f32 moments).
                unsafe {
                    k::optim::adam_bnb32_multi::<T>(
                        &b,
                        cfg,
                        &dv,
                        nt,
                        nc,
                        s.beta1,
                        s.w1,
                        s.beta2,
                        s.w2,
                        s.decay,
                        s.weight_decay as i32,
                    )
                }
            })
        }
        Format::Bnb8 => {
            let s = BnbScalars::new(hyper, 1);
            let maps = device_maps(&b)?;
            let (cmv, cvv) = (maps.0.as_view(), maps.1.as_view());
            typed!(dtype, "AdamW8bit", |T| {
                // SAFETY: adam8bit_multi_<T>(descs, ntensors, nblocks, 6 x float, int, const float*
                // code_m, const float* code_v): `descs` holds ntensors descriptors of DESC8_WORDS = 6 + 3
                // words over live CUDA tensors of this device (parameter of dtype T, f32 gradient, u8
                // codes of n elements, f32 block maxima of ceil(n/256), checked when the state was made),
                // covering nblocks quantization blocks; both maps hold 256 floats. 256 threads per
                // block, as the kernel's shared-memory map load and block reduction require.
                unsafe {
                    k::optim::adam8bit_multi::<T>(
                        &b,
                        cfg,
                        &dv,
                        nt,
                        nc,
                        s.beta1,
                        s.w1,
                        s.beta2,
                        s.w2,
                        s.decay,
                        s.weight_decay as i32,
                        &cmv,
                        &cvv,
                    )
                }
            })
        }
    }
}
