#!/usr/bin/env python3
"""HF PEFT LoRA vs DoRA training step on the CPU: the peer numbers for `benches/dora.rs`.

One linear layer [out, in] wrapped by `get_peft_model` (base frozen, x does not require grad), f32
(or bitsandbytes NF4 with --nf4: QDoRA), r=16, lora_alpha=32, dropout 0. A step is forward +
`(y * dy).sum().backward()`: adapter gradients only (lora_A, lora_B and, for DoRA, the magnitude),
the same work as `need_dx = false` in the Rust benchmark. Prints the median of several steps per case
and the DoRA / LoRA ratio.

Run with the reference environment (torch 2.15 CPU, peft 0.21.2, bitsandbytes 0.50.2):
    /root/.cache/peft-ref-venv/bin/python benches/peers/peft_lora_dora.py [--tokens 1,16,512]
        [--shape 4096x4096] [--steps 7] [--nf4]
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model


class One(torch.nn.Module):
    def __init__(self, out_f: int, in_f: int, nf4: bool):
        super().__init__()
        if nf4:
            import bitsandbytes as bnb

            lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32,
                                    compress_statistics=True, quant_type="nf4")
            w = torch.randn(out_f, in_f) * 0.02
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
            lin = lin.to("cpu")  # quantizes
            # Keep the reference math (dequantize + matmul) rather than bnb's AVX512-BF16 repack.
            if hasattr(lin, "support_avx512bf16_for_cpu"):
                lin.support_avx512bf16_for_cpu = False
            self.proj = lin
        else:
            self.proj = torch.nn.Linear(in_f, out_f, bias=False)
            torch.nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x):
        return self.proj(x)


def step_time(model, x, dy, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        y = model(x)
        (y * dy).sum().backward()
        t = time.perf_counter() - t0
        if i >= 2:  # two warm-up steps
            times.append(t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16,512")
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--nf4", action="store_true")
    args = ap.parse_args()
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'nf4' if args.nf4 else 'f32'} {out_f}x{in_f}, r={args.r}, adapter gradients only")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, in_f)
        dy = torch.randn(tokens, out_f)
        res = {}
        for dora in (False, True):
            torch.manual_seed(1)
            cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=["proj"],
                             use_dora=dora, init_lora_weights=False)
            model = get_peft_model(One(out_f, in_f, args.nf4), cfg)
            model.train()
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            res[dora] = step_time(model, x, dy, args.steps)
            print(f"  tokens={tokens:4d} {'DoRA' if dora else 'LoRA'}: {res[dora]:9.2f} ms/step "
                  f"({n_train} trainable)")
        print(f"  tokens={tokens:4d} DoRA/LoRA = {res[True] / res[False]:.2f}x")


if __name__ == "__main__":
    main()
