#!/usr/bin/env python3
"""Peer benchmark: HF PEFT WaveFT / VB-LoRA / LoRA on one frozen Linear layer, CPU, f32.

Measures one training step of the layer (forward + backward of `(y * g).sum()`), with the base weight
frozen and only the adapter parameters requiring gradients (x does not require grad, so no dx is
computed, as in a first layer).  Same shapes as `benches/waveft.rs` and `benches/vblora.rs`:
4096x4096, 512 tokens; WaveFT n_frequency=5000 (db1, IDWT), LoRA r=16, VB-LoRA r=4 with a 256x256 bank
(topk 2).

Usage: /root/.cache/peft-ref-venv/bin/python benches/peers/peft_waveft_vblora.py [--threads N] [--iters N]
Prints one line per method with the median and min over the timed iterations (ms).
"""

import argparse
import statistics
import time

import torch
from torch import nn

from peft import LoraConfig, VBLoRAConfig, WaveFTConfig, get_peft_model


class One(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def bench(name, model, x, g, iters, warmup=2):
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(warmup + iters):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y = model(x)
        (y * g).sum().backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt * 1e3)
    n_params = sum(p.numel() for p in params)
    print(
        f"{name:<28} median {statistics.median(times):9.2f} ms   min {min(times):9.2f} ms   "
        f"({n_params} trainable params, {iters} iters)",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, t = args.dim, args.tokens
    x = torch.randn(t, d)
    g = torch.randn(t, d)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {d}x{d}, {t} tokens, f32")

    def fresh():
        m = One(d, d)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    # Base layer alone (frozen, forward only: no parameter needs a gradient).
    base = fresh()
    times = []
    with torch.no_grad():
        for i in range(2 + args.iters):
            t0 = time.perf_counter()
            base(x)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    print(f"{'base x.W^T (fwd only)':<28} median {statistics.median(times):9.2f} ms   min {min(times):9.2f} ms")

    lora = get_peft_model(fresh(), LoraConfig(r=16, lora_alpha=16, target_modules=["lin"], init_lora_weights=False))
    bench("lora r=16", lora, x, g, args.iters)
    del lora

    wave = get_peft_model(
        fresh(), WaveFTConfig(n_frequency=5000, target_modules=["lin"], init_weights=False)
    )
    bench("waveft n=5000 db1", wave, x, g, args.iters)
    del wave

    wave = get_peft_model(
        fresh(), WaveFTConfig(n_frequency=5000, target_modules=["lin"], init_weights=False, use_idwt=False)
    )
    bench("waveft n=5000 no-idwt", wave, x, g, args.iters)
    del wave

    vb = get_peft_model(
        fresh(), VBLoRAConfig(r=4, num_vectors=256, vector_length=256, topk=2, target_modules=["lin"])
    )
    bench("vblora r=4 256x256", vb, x, g, args.iters)


if __name__ == "__main__":
    main()
