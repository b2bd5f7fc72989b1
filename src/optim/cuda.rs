//! Launch of the fused AdamW kernel of `kernels/optim.cu`, one per parameter tensor.

use super::AdamWScalars;
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
