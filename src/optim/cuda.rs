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

/// bitsandbytes' blockwise 8-bit Adam (`adam8bit_<T>`): one block of 256 threads per quantization
/// block. `codes` are the u8 codes of m and v (n each), `absmax` their f32 block maxima (ceil(n/256)
/// each), all on `p`'s device (checked by the caller). The two dynamic maps are uploaded per call (2 KB).
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
    let t = super::eightbit::tables();
    let dev = p.device();
    let code_m = Tensor::from_slice(&t.code_m, &[256], dev)?;
    let code_v = Tensor::from_slice(&t.code_v, &[256], dev)?;
    let gs = storage(g, "AdamW8bit gradient")?;
    let b = gs.backend.clone();
    let cfg = LaunchConfig {
        grid_dim: (nb.min(1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let gv = gs.view::<f32>()?;
    let cmv_s = storage(&code_m, "AdamW8bit map")?.view::<f32>()?;
    let cvv_s = storage(&code_v, "AdamW8bit map")?.view::<f32>()?;
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
