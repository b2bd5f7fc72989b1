//! Per-parameter optimizer state of [`super::Optimizer`]: the moments in one of three formats, the
//! parameter's own step count, and an optional f32 master copy of the parameter.

use super::eightbit::{self, MIN_8BIT_SIZE};
use super::{AdamWConfig, AdamWScalars, BnbScalars, cpu};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};

/// The moments of one parameter.
pub(crate) enum Moments {
    /// `torch.optim.AdamW` semantics, f32 moments.
    Torch { m: Tensor, v: Tensor },
    /// bitsandbytes' 32-bit Adam (`AdamW8bit` below `min_8bit_size` elements), f32 moments.
    Bnb32 { m: Tensor, v: Tensor },
    /// bitsandbytes' blockwise 8-bit Adam: u8 codes and one f32 absmax per 256 elements each.
    Bnb8 {
        m: Tensor,
        v: Tensor,
        absmax_m: Tensor,
        absmax_v: Tensor,
    },
    /// Any of the three in CUDA managed memory (`--paged`).
    #[cfg(feature = "cuda")]
    Paged(super::cuda::Paged),
}

/// The checkpoint spelling of each format.
pub(crate) const FORMATS: [&str; 3] = ["torch", "bnb32", "bnb8"];

impl Moments {
    /// Zero state for an `n`-element parameter on `dev`.
    pub(crate) fn zeros(eight_bit: bool, min_8bit_size: usize, n: usize, dev: Device) -> Result<Moments> {
        let z = |len: usize, dt: DType| Tensor::zeros(&[len], dt, dev);
        Ok(if !eight_bit {
            Moments::Torch {
                m: z(n, DType::F32)?,
                v: z(n, DType::F32)?,
            }
        } else if n < min_8bit_size {
            Moments::Bnb32 {
                m: z(n, DType::F32)?,
                v: z(n, DType::F32)?,
            }
        } else {
            let nb = eightbit::nblocks(n);
            Moments::Bnb8 {
                m: z(n, DType::U8)?,
                v: z(n, DType::U8)?,
                absmax_m: z(nb, DType::F32)?,
                absmax_v: z(nb, DType::F32)?,
            }
        })
    }

    pub(crate) fn format(&self) -> &'static str {
        match self {
            Moments::Torch { .. } => FORMATS[0],
            Moments::Bnb32 { .. } => FORMATS[1],
            Moments::Bnb8 { .. } => FORMATS[2],
            #[cfg(feature = "cuda")]
            Moments::Paged(p) => FORMATS[p.format as usize],
        }
    }

    /// Elements of the parameter this state belongs to.
    pub(crate) fn numel(&self) -> usize {
        match self {
            Moments::Torch { m, .. } | Moments::Bnb32 { m, .. } | Moments::Bnb8 { m, .. } => m.numel(),
            #[cfg(feature = "cuda")]
            Moments::Paged(p) => p.n,
        }
    }

    /// Whether the state is in CUDA managed memory.
    pub(crate) fn is_paged(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Moments::Paged(_) = self {
            return true;
        }
        false
    }

    /// The state tensors by name (as [`Moments::tensors`]); paged state is read back to host tensors.
    pub(crate) fn snapshot(&self) -> Result<Vec<(&'static str, Tensor)>> {
        #[cfg(feature = "cuda")]
        if let Moments::Paged(p) = self {
            return p.to_tensors();
        }
        Ok(self.tensors().into_iter().map(|(s, t)| (s, t.clone())).collect())
    }

    /// `(suffix, tensor)` of every state tensor, in a fixed order (checkpoint names).
    pub(crate) fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Moments::Torch { m, v } | Moments::Bnb32 { m, v } => vec![("m", m), ("v", v)],
            Moments::Bnb8 {
                m,
                v,
                absmax_m,
                absmax_v,
            } => vec![("m", m), ("v", v), ("absmax_m", absmax_m), ("absmax_v", absmax_v)],
            // Managed memory is not a tensor: read it with `snapshot`.
            #[cfg(feature = "cuda")]
            Moments::Paged(_) => Vec::new(),
        }
    }

    /// Rebuilds a state from checkpoint tensors, checking each dtype and length against what `format`
    /// needs for an `n`-element parameter.
    pub(crate) fn from_tensors(
        format: &str,
        n: usize,
        mut get: impl FnMut(&str) -> Result<Tensor>,
    ) -> Result<Moments> {
        let mut take = |suffix: &str, dt: DType, len: usize| -> Result<Tensor> {
            let t = get(suffix)?;
            if t.dtype() != dt || t.numel() != len || t.rank() != 1 {
                return Err(Error::invalid(format!(
                    "optimizer checkpoint: state {suffix:?} is {:?} {:?}, expected {dt:?} [{len}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t)
        };
        Ok(match format {
            "torch" => Moments::Torch {
                m: take("m", DType::F32, n)?,
                v: take("v", DType::F32, n)?,
            },
            "bnb32" => Moments::Bnb32 {
                m: take("m", DType::F32, n)?,
                v: take("v", DType::F32, n)?,
            },
            "bnb8" => {
                let nb = eightbit::nblocks(n);
                Moments::Bnb8 {
                    m: take("m", DType::U8, n)?,
                    v: take("v", DType::U8, n)?,
                    absmax_m: take("absmax_m", DType::F32, nb)?,
                    absmax_v: take("absmax_v", DType::F32, nb)?,
                }
            }
            other => {
                return Err(Error::invalid(format!(
                    "optimizer checkpoint: unknown state format {other:?}"
                )));
            }
        })
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            Moments::Torch { m, .. } | Moments::Bnb32 { m, .. } | Moments::Bnb8 { m, .. } => m.device(),
            #[cfg(feature = "cuda")]
            Moments::Paged(p) => p.device(),
        }
    }

    pub(crate) fn size_in_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Moments::Paged(p) = self {
            return p.size_in_bytes();
        }
        self.tensors().iter().map(|(_, t)| t.size_in_bytes()).sum()
    }

    /// This state on `dev`, in managed memory when `paged` (a CUDA `dev` only) and as plain tensors
    /// otherwise.
    pub(crate) fn place(&self, dev: Device, paged: bool) -> Result<Moments> {
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(o)) = (paged, dev) {
            return Ok(Moments::Paged(super::cuda::Paged::from_moments(
                self,
                self.numel(),
                o,
            )?));
        }
        if paged {
            return Err(Error::invalid("paged optimizer state needs a CUDA device"));
        }
        self.to_device(dev)
    }

    pub(crate) fn to_device(&self, dev: Device) -> Result<Moments> {
        Ok(match self {
            Moments::Torch { m, v } => Moments::Torch {
                m: m.to_device(dev)?,
                v: v.to_device(dev)?,
            },
            Moments::Bnb32 { m, v } => Moments::Bnb32 {
                m: m.to_device(dev)?,
                v: v.to_device(dev)?,
            },
            Moments::Bnb8 {
                m,
                v,
                absmax_m,
                absmax_v,
            } => Moments::Bnb8 {
                m: m.to_device(dev)?,
                v: v.to_device(dev)?,
                absmax_m: absmax_m.to_device(dev)?,
                absmax_v: absmax_v.to_device(dev)?,
            },
            #[cfg(feature = "cuda")]
            Moments::Paged(p) => {
                let t = p.to_tensors()?;
                Moments::from_tensors(self.format(), p.n, |suffix| {
                    t.iter()
                        .find(|(s, _)| *s == suffix)
                        .ok_or_else(|| Error::invalid(format!("paged state: no tensor {suffix:?}")))?
                        .1
                        .to_device(dev)
                })?
            }
        })
    }

    /// One update of `p` (f32/f16/bf16, on the state's device) with the f32 gradient `g` (same device,
    /// same element count), at 1-based step `step`.
    pub(crate) fn update(&mut self, p: &mut Tensor, g: &Tensor, cfg: &AdamWConfig, step: u64) -> Result<()> {
        match self {
            Moments::Torch { m, v } => super::update(p, g, m, v, &AdamWScalars::new(cfg, step)),
            Moments::Bnb32 { m, v } => bnb32(p, g, m, v, &BnbScalars::new(cfg, step)),
            Moments::Bnb8 {
                m,
                v,
                absmax_m,
                absmax_v,
            } => bnb8(p, g, [m, v], [absmax_m, absmax_v], &BnbScalars::new(cfg, step)),
            #[cfg(feature = "cuda")]
            Moments::Paged(_) => {
                let mut batch = super::cuda::MultiBatch::new(cfg);
                batch.push(p, g, self, step)?;
                batch.flush()
            }
        }
    }

    /// One update of an f32 host parameter `p` (an offloaded parameter's master copy) with the host
    /// gradient `g`, on host state: the multithreaded CPU kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA offload path
    pub(crate) fn update_host(
        &mut self,
        p: &mut [f32],
        g: &[f32],
        cfg: &AdamWConfig,
        step: u64,
    ) -> Result<()> {
        let what = "optimizer (host)";
        if p.len() != g.len() || p.len() != self.numel() {
            return Err(Error::invalid(format!(
                "{what}: gradient or state does not match the parameter"
            )));
        }
        match self {
            Moments::Torch { m, v } => cpu::adamw(
                p,
                g,
                m.cpu_data_mut::<f32>(what)?,
                v.cpu_data_mut::<f32>(what)?,
                &AdamWScalars::new(cfg, step),
            ),
            Moments::Bnb32 { m, v } => cpu::adam_bnb32(
                p,
                g,
                m.cpu_data_mut::<f32>(what)?,
                v.cpu_data_mut::<f32>(what)?,
                &BnbScalars::new(cfg, step),
            ),
            Moments::Bnb8 {
                m,
                v,
                absmax_m,
                absmax_v,
            } => {
                let q = cpu::Q8 {
                    cm: m.cpu_data_mut::<u8>(what)?,
                    cv: v.cpu_data_mut::<u8>(what)?,
                    am: absmax_m.cpu_data_mut::<f32>(what)?,
                    av: absmax_v.cpu_data_mut::<f32>(what)?,
                };
                cpu::adam8bit(p, g, q, &BnbScalars::new(cfg, step), eightbit::tables())
            }
            #[cfg(feature = "cuda")]
            Moments::Paged(_) => return Err(Error::invalid(format!("{what}: paged state is on a device"))),
        }
        Ok(())
    }
}

fn bnb32(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: &BnbScalars) -> Result<()> {
    match p.device() {
        Device::Cpu => {
            let what = "AdamW8bit";
            let (g, m, v) = (
                g.cpu_data::<f32>(what)?,
                m.cpu_data_mut::<f32>(what)?,
                v.cpu_data_mut::<f32>(what)?,
            );
            match p.dtype() {
                DType::F32 => cpu::adam_bnb32(p.cpu_data_mut::<f32>(what)?, g, m, v, s),
                DType::F16 => cpu::adam_bnb32(p.cpu_data_mut::<f16>(what)?, g, m, v, s),
                DType::BF16 => cpu::adam_bnb32(p.cpu_data_mut::<bf16>(what)?, g, m, v, s),
                other => return Err(Error::dtype(what, "a float parameter", other)),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::adam_bnb32(p, g, m, v, s),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::CudaUnavailable("built without the `cuda` feature".into())),
    }
}

fn bnb8(
    p: &mut Tensor,
    g: &Tensor,
    codes: [&mut Tensor; 2],
    absmax: [&mut Tensor; 2],
    s: &BnbScalars,
) -> Result<()> {
    match p.device() {
        Device::Cpu => {
            let what = "AdamW8bit";
            let t = eightbit::tables();
            let g = g.cpu_data::<f32>(what)?;
            let [cm, cv] = codes;
            let [am, av] = absmax;
            let q = cpu::Q8 {
                cm: cm.cpu_data_mut::<u8>(what)?,
                cv: cv.cpu_data_mut::<u8>(what)?,
                am: am.cpu_data_mut::<f32>(what)?,
                av: av.cpu_data_mut::<f32>(what)?,
            };
            match p.dtype() {
                DType::F32 => cpu::adam8bit(p.cpu_data_mut::<f32>(what)?, g, q, s, t),
                DType::F16 => cpu::adam8bit(p.cpu_data_mut::<f16>(what)?, g, q, s, t),
                DType::BF16 => cpu::adam8bit(p.cpu_data_mut::<bf16>(what)?, g, q, s, t),
                other => return Err(Error::dtype(what, "a float parameter", other)),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::adam8bit(p, g, codes, absmax, s),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (codes, absmax);
            Err(Error::CudaUnavailable("built without the `cuda` feature".into()))
        }
    }
}

/// The state of one parameter.
pub(crate) struct ParamState {
    pub moments: Moments,
    /// Steps this parameter has taken (it is skipped in steps without a gradient, like torch).
    pub step: u64,
    /// f32 master copy of a half (or host-offloaded) parameter, on the state's device.
    pub master: Option<Tensor>,
}

impl ParamState {
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.moments.size_in_bytes() + self.master.as_ref().map_or(0, |t| t.size_in_bytes())
    }

    /// Bytes of the moments only (what `optimizer_state_bytes` reports).
    pub(crate) fn moment_bytes(&self) -> usize {
        self.moments.size_in_bytes()
    }
}

/// Minimum 8-bit size, re-exported for configs.
pub(crate) const DEFAULT_MIN_8BIT_SIZE: usize = MIN_8BIT_SIZE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The slice update of offloaded parameters equals the tensor update, bit for bit, in every format
    /// (f32 state, bitsandbytes 32-bit, 8-bit with a partial last block), over several steps.
    #[test]
    fn update_host_matches_update() {
        let cfg = AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        };
        for (eight, n) in [(false, 1000), (true, 1000), (true, 5000)] {
            let mut rng = Rng::new(n as u64);
            let p0: Vec<f32> = rng.normal_vec(n);
            let mut a = Moments::zeros(eight, MIN_8BIT_SIZE, n, Device::Cpu).unwrap();
            let mut b = Moments::zeros(eight, MIN_8BIT_SIZE, n, Device::Cpu).unwrap();
            let mut pa = Tensor::from_slice(&p0, &[n], Device::Cpu).unwrap();
            let mut pb = p0.clone();
            for step in 1..=3 {
                let g: Vec<f32> = rng.normal_vec(n).iter().map(|x| x * 1e-2).collect();
                let gt = Tensor::from_slice(&g, &[n], Device::Cpu).unwrap();
                a.update(&mut pa, &gt, &cfg, step).unwrap();
                b.update_host(&mut pb, &g, &cfg, step).unwrap();
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&pa.to_vec::<f32>().unwrap()), bits(&pb), "{}", a.format());
            let (ta, tb) = (a.snapshot().unwrap(), b.snapshot().unwrap());
            for ((name, x), (_, y)) in ta.iter().zip(&tb) {
                assert_eq!(
                    x.to_bytes().unwrap(),
                    y.to_bytes().unwrap(),
                    "{} {name}",
                    a.format()
                );
            }
            assert!(b.update_host(&mut pb[..n - 1], &g_short(n - 1), &cfg, 4).is_err());
        }
    }

    fn g_short(n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
}
