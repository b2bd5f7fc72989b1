#!/usr/bin/env python3
"""transformers + PEFT causal-LM training step on the CPU: the peer numbers for `benches/llama.rs`.

The same randomly initialized `LlamaForCausalLM` as the Rust benchmark's `PEFT_KERNELS_LLAMA_BENCH=full`
shape (hidden 1024, 8 layers, 16 query heads and 4 kv heads of 64, intermediate 2816, vocab 32000,
rope_theta 500000, untied lm_head, weights normal(0, 0.02), norms 1), f32, batch 1 x seq 256 of the
same token ids; LoRA r=16, lora_alpha=32, lora_dropout=0.05 on q/k/v/o/gate/up/down_proj
(`get_peft_model`, task CAUSAL_LM). One step = forward with `labels=input_ids` (transformers' shifted
next-token loss), backward, `torch.optim.AdamW.step()`, `zero_grad`. Warm-up steps, then the median of
the timed steps.

Cases: `lora` (dense f32 base) and `qlora` (every decoder projection a bitsandbytes `Linear4bit`, NF4,
double quantization, blocksize 64, compute dtype f32; `lm_head` stays dense, as in the Rust bench).
bitsandbytes 0.50's CPU backend runs 4-bit training: the forward dequantizes NF4 and multiplies, the
backward goes through the same dequantized weight (`MatMul4Bit`).

Attention is transformers' default implementation (`sdpa`); `--attn eager` picks the eager one.

`--compute bf16` is the usual CPU mixed-precision recipe: `torch.autocast("cpu", dtype=torch.bfloat16)`
around forward + loss (so every linear, the LM head and attention run in bf16; norms, softmax and the
loss stay f32 by autocast's op lists), master weights, LoRA weights, gradients and AdamW in f32; for qlora
also `bnb_4bit_compute_dtype=torch.bfloat16` (`compute_dtype` of `Linear4bit`).

Run with the reference environment (torch 2.15 CPU, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2):
    /root/.cache/peft-ref-venv/bin/python benches/peers/llama_step.py [--cases lora,qlora]
        [--warmup 2] [--steps 5] [--threads 2] [--small] [--compute f32|bf16]
Prints one JSON object per case.
"""

import argparse
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape(small: bool) -> dict:
    if small:  # the Rust bench's default shape
        return dict(hidden=256, layers=2, heads=8, kv_heads=2, inter=688, vocab=2048, batch=2, seq=128)
    return dict(hidden=1024, layers=8, heads=16, kv_heads=4, inter=2816, vocab=32000, batch=1, seq=256)


def build(s: dict, attn: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], intermediate_size=s["inter"], vocab_size=s["vocab"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        initializer_range=0.02, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def to_nf4(model: LlamaForCausalLM, compute: torch.dtype) -> None:
    """Replaces every decoder projection with a bitsandbytes NF4 Linear4bit (double quantization)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute, compress_statistics=True,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True, blocksize=64)
                q = q.to("cpu")  # quantizes
                # The reference math (dequantize + matmul), not bnb's AVX512-BF16 repack.
                if hasattr(q, "support_avx512bf16_for_cpu"):
                    q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q)


def ids(s: dict) -> torch.Tensor:
    rows = [[(b * 7919 + t * 104_729) % s["vocab"] for t in range(s["seq"])] for b in range(s["batch"])]
    return torch.tensor(rows, dtype=torch.long)


def run_case(name: str, s: dict, args) -> dict:
    model = build(s, args.attn)
    if name == "qlora":
        to_nf4(model, torch.bfloat16 if args.compute == "bf16" else torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    x = ids(s)
    mask = torch.ones_like(x)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.compute == "bf16"):
            out = model(input_ids=x, attention_mask=mask, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter() - t0
        losses.append(out.loss.item())
        if i >= args.warmup:
            times.append(t)
    return {
        "peer": "transformers+peft", "case": name, "compute": args.compute, "attn": args.attn, "threads": torch.get_num_threads(),
        "shape": s, "trainable": sum(p.numel() for p in trainable), "warmup": args.warmup,
        "steps": args.steps, "median_ms": round(statistics.median(times) * 1e3, 1),
        "min_ms": round(min(times) * 1e3, 1), "times_ms": [round(t * 1e3, 1) for t in times],
        "first_loss": round(losses[0], 4), "loadavg_1m": round(os.getloadavg()[0], 2),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="lora,qlora")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--compute", default="f32", choices=["f32", "bf16"],
                    help="bf16: autocast mixed precision (and bnb compute dtype bf16 for qlora)")
    ap.add_argument("--small", action="store_true", help="the Rust bench's default (small) shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = shape(args.small)
    for case in args.cases.split(","):
        print(json.dumps(run_case(case, s, args)), flush=True)


if __name__ == "__main__":
    main()
