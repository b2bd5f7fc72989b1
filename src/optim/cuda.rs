//! Launch of the fused AdamW kernel of `kernels/optim.cu`, one per parameter tensor.

use super::{AdamWScalars, BnbScalars};
use crate::error::{Error, Result};
use crate::tensor::cuda::CudaStorage;
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::{bf16, f16};

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
    let name = match dtype {
        DType::F32 => "adamw_f32",
        DType::F16 => "adamw_f16",
        DType::BF16 => "adamw_bf16",
        other => return Err(Error::dtype("AdamW", "a float parameter", other)),
    };
    let gs = match g.storage() {
        Storage::Cuda(c) => c,
        Storage::Cpu(_) => return Err(Error::device("AdamW", "gradient on the CPU, parameter on CUDA")),
    };
    let b = gs.backend.clone();
    let f = b.func("optim", name)?;
    let n64 = n as i64;
    let blocks = n.div_ceil(4).div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let gv = gs.view::<f32>()?;
    let ms = storage_mut(m, "AdamW state m")?;
    let mut mv = ms.view_mut::<f32>()?;
    let vs = storage_mut(v, "AdamW state v")?;
    let mut vv = vs.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW parameter")?;
    macro_rules! launch {
        ($t:ty) => {{
            let mut pv = ps.view_mut::<$t>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&mut pv)
                .arg(&gv)
                .arg(&mut mv)
                .arg(&mut vv)
                .arg(&n64)
                .arg(&s.decay)
                .arg(&s.w1)
                .arg(&s.beta2)
                .arg(&s.w2)
                .arg(&s.neg_step)
                .arg(&s.bc2_sqrt)
                .arg(&s.eps);
            // SAFETY: adamw_<T>(T* p, const float* g, float* m, float* v, int64 n, 7 x float): p, g,
            // m and v each hold n elements (the caller checked that the gradient and both moments
            // have the parameter's element count, dtype f32, on this device). The kernel's vector
            // path checks pointer alignment itself and falls back to scalar accesses.
            unsafe { l.launch(cfg) }?;
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
}

/// The kernel of `family` (`[f32, f16, bf16]` names) for a parameter dtype.
fn kernel_name(family: [&'static str; 3], dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(family[0]),
        DType::F16 => Ok(family[1]),
        DType::BF16 => Ok(family[2]),
        other => Err(Error::dtype("AdamW8bit", "a float parameter", other)),
    }
}

fn cuda_of<'a>(t: &'a Tensor, what: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::device(what, "expected a CUDA tensor, got a CPU tensor")),
    }
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
    let name = kernel_name(["adam_bnb32_f32", "adam_bnb32_f16", "adam_bnb32_bf16"], p.dtype())?;
    let dtype = p.dtype();
    let gs = cuda_of(g, "AdamW8bit gradient")?;
    let b = gs.backend.clone();
    let f = b.func("optim", name)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as i64;
    let wd = s.weight_decay as i32;
    let gv = gs.view::<f32>()?;
    let mut mv = storage_mut(m, "AdamW8bit state m")?.view_mut::<f32>()?;
    let mut vv = storage_mut(v, "AdamW8bit state v")?.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW8bit parameter")?;
    macro_rules! launch {
        ($t:ty) => {{
            let mut pv = ps.view_mut::<$t>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&mut pv).arg(&gv).arg(&mut mv).arg(&mut vv).arg(&n64);
            l.arg(&s.beta1).arg(&s.w1).arg(&s.beta2).arg(&s.w2);
            l.arg(&s.step_size).arg(&s.eps_c2).arg(&s.decay).arg(&wd);
            // SAFETY: adam_bnb32_<T>(T* p, const float* g, float* m, float* v, int64 n, 7 x float, int):
            // p, g, m and v each hold n elements on this device (checked by the caller); the kernel
            // grid-strides over [0, n).
            unsafe { l.launch(cfg) }?;
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
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
    let name = kernel_name(["adam8bit_f32", "adam8bit_f16", "adam8bit_bf16"], dtype)?;
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
    let gs = cuda_of(g, "AdamW8bit gradient")?;
    let b = gs.backend.clone();
    let f = b.func("optim", name)?;
    let cfg = LaunchConfig {
        grid_dim: (nb.min(1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as i64;
    let wd = s.weight_decay as i32;
    let gv = gs.view::<f32>()?;
    let cmv_s = cuda_of(&code_m, "AdamW8bit map")?.view::<f32>()?;
    let cvv_s = cuda_of(&code_v, "AdamW8bit map")?.view::<f32>()?;
    let mut cmv = storage_mut(cm, "AdamW8bit codes m")?.view_mut::<u8>()?;
    let mut cvv = storage_mut(cv, "AdamW8bit codes v")?.view_mut::<u8>()?;
    let mut amv = storage_mut(am, "AdamW8bit absmax m")?.view_mut::<f32>()?;
    let mut avv = storage_mut(av, "AdamW8bit absmax v")?.view_mut::<f32>()?;
    let ps = storage_mut(p, "AdamW8bit parameter")?;
    macro_rules! launch {
        ($t:ty) => {{
            let mut pv = ps.view_mut::<$t>()?;
            let mut l = b.stream.launch_builder(&f);
            l.arg(&mut pv)
                .arg(&gv)
                .arg(&mut cmv)
                .arg(&mut cvv)
                .arg(&mut amv)
                .arg(&mut avv)
                .arg(&n64);
            l.arg(&s.beta1).arg(&s.w1).arg(&s.beta2).arg(&s.w2);
            l.arg(&s.step_size).arg(&s.eps_c2).arg(&s.decay).arg(&wd);
            l.arg(&cmv_s).arg(&cvv_s);
            // SAFETY: adam8bit_<T>(T* p, const float* g, u8* cm, u8* cv, float* am, float* av, int64 n,
            // 7 x float, int, const float* code_m, const float* code_v): p, g, cm, cv hold n elements,
            // am and av ceil(n/256) (checked above), both codes 256 floats, all on this device. 256
            // threads per block, as the kernel's shared-memory code load and reduction require.
            unsafe { l.launch(cfg) }?;
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
}
