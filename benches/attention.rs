//! Scaled dot-product attention, forward + backward (`peft_kernels::attention`), on the CPU and on CUDA
//! when present.
//!
//!     cargo bench --bench attention               # criterion group `attention`
//!
//! Shapes:
//! - CPU, MiniLM training (all-MiniLM-L6-v2: batch 16, seq 64, 12 heads, head_dim 32, key padding mask
//!   with ragged lengths, f32): one layer's attention, forward alone and forward + backward. Napkin
//!   math: 4·S²·D·B·H = 100 MFLOP forward, ~2.5x that backward (S recomputed from the saved lse).
//! - CPU, the Llama bench's attention (batch 1, seq 256, 16 heads over 4 kv heads of 64, causal, f32):
//!   67 MFLOP forward for the full square; the causal row blocks compute 56% of it.
//! - CUDA (issues 12 and 16): seq 512 / head_dim 64 / 16 heads / batch 8, bf16; seq 2048 / head_dim 128 /
//!   32 heads (8 kv heads) / batch 2, causal, bf16. FLOPs are printed so that time converts to TFLOP/s
//!   (the H200's dense bf16 tensor-core peak is ~790 TFLOP/s).

use criterion::{Criterion, criterion_group, criterion_main};
use peft_kernels::attention::{AttentionConfig, attention_backward, attention_forward};
use peft_kernels::{DType, Device, Result, Tensor};

struct Case {
    name: &'static str,
    cfg: AttentionConfig,
    dtype: DType,
    lens: Option<Vec<usize>>,
}

struct Data {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    mask: Option<Vec<u8>>,
}

fn data(c: &Case, dev: Device) -> Result<Data> {
    let cfg = &c.cfg;
    let qs = [cfg.batch * cfg.seq_q, cfg.num_heads * cfg.head_dim];
    let ks = [cfg.batch * cfg.seq_k, cfg.num_kv_heads * cfg.head_dim];
    let mk = |s: &[usize], seed| Tensor::randn(s, 1.0, seed, c.dtype, dev);
    Ok(Data {
        q: mk(&qs, 1)?,
        k: mk(&ks, 2)?,
        v: mk(&ks, 3)?,
        dout: mk(&qs, 4)?,
        mask: c.lens.as_ref().map(|lens| {
            (0..cfg.batch * cfg.seq_k)
                .map(|t| u8::from(t % cfg.seq_k < lens[t / cfg.seq_k]))
                .collect()
        }),
    })
}

fn fwd_bwd(c: &Case, d: &Data, dev: Device) -> Result<()> {
    let (out, lse) = attention_forward(&d.q, &d.k, &d.v, d.mask.as_deref(), &c.cfg)?;
    let g = attention_backward(&d.q, &d.k, &d.v, &out, &lse, &d.dout, d.mask.as_deref(), &c.cfg)?;
    std::hint::black_box(g);
    dev.synchronize()
}

/// Forward FLOPs (2 matmuls of 2·Sq·Sk·D per head; half the tiles when causal).
fn fwd_flops(cfg: &AttentionConfig) -> f64 {
    let f =
        4.0 * (cfg.batch * cfg.num_heads) as f64 * cfg.seq_q as f64 * cfg.seq_k as f64 * cfg.head_dim as f64;
    if cfg.causal { f / 2.0 } else { f }
}

fn cases(dev: Device) -> Vec<Case> {
    let lens: Vec<usize> = (0..16).map(|b| 24 + (b * 37) % 41).collect();
    let mut v = vec![Case {
        name: "minilm_b16_s64_h12_d32_f32",
        cfg: AttentionConfig::new(16, 64, 12, 32),
        dtype: DType::F32,
        lens: Some(lens),
    }];
    // The Llama bench's shape (issue 16): batch 1 x seq 256, 16 query heads over 4 kv heads of 64, causal.
    v.push(Case {
        name: "llama_b1_s256_h16_kv4_d64_causal_f32",
        cfg: AttentionConfig {
            num_kv_heads: 4,
            causal: true,
            ..AttentionConfig::new(1, 256, 16, 64)
        },
        dtype: DType::F32,
        lens: None,
    });
    if dev.is_cuda() {
        v.push(Case {
            name: "s512_d64_h16_b8_bf16",
            cfg: AttentionConfig::new(8, 512, 16, 64),
            dtype: DType::BF16,
            lens: None,
        });
        v.push(Case {
            name: "s2048_d128_h32_kv8_b2_causal_bf16",
            cfg: AttentionConfig {
                num_kv_heads: 8,
                causal: true,
                ..AttentionConfig::new(2, 2048, 32, 128)
            },
            dtype: DType::BF16,
            lens: None,
        });
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let mut devs = vec![Device::Cpu];
    if Device::cuda_if_available().is_cuda() {
        devs.push(Device::Cuda(0));
    }
    for dev in devs {
        for case in cases(dev) {
            let d = data(&case, dev).expect("data");
            eprintln!(
                "{dev}/{}: forward {:.3} GFLOP",
                case.name,
                fwd_flops(&case.cfg) / 1e9
            );
            g.bench_function(format!("{dev}/{}_fwd", case.name), |b| {
                b.iter(|| {
                    let r = attention_forward(&d.q, &d.k, &d.v, d.mask.as_deref(), &case.cfg).unwrap();
                    std::hint::black_box(r);
                    dev.synchronize().unwrap()
                })
            });
            g.bench_function(format!("{dev}/{}_fwd_bwd", case.name), |b| {
                b.iter(|| fwd_bwd(&case, &d, dev).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
