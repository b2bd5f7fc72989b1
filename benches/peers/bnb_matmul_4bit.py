#!/usr/bin/env python3
"""Peer benchmark: bitsandbytes' CPU `bnb.matmul_4bit` (NF4, blocksize 64, with and without double
quant) and torch's bf16 `F.linear` for a 4096x4096 layer at 1 token (decode), plus 16 tokens.

Run with the reference venv (torch CPU + bitsandbytes):
    /root/.cache/peft-ref-venv/bin/python benches/peers/bnb_matmul_4bit.py [--threads N]
Prints one JSON line per case, same keys as `peftk bench`, so the two outputs can be joined.
Compare with `peftk bench --device cpu --filter 'forward/(nf4|bf16)/4096x4096/t(1|16)/r0'`
(no LoRA: this peer times the base matmul only) or the r16 lines for the whole QLoRA forward.
"""
import argparse
import json
import time

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
import torch.nn.functional as tF


def median_us(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--inp", type=int, default=4096)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out, inp = args.out, args.inp
    w = torch.randn(out, inp, dtype=torch.bfloat16) * 0.02
    meta = {"device": "cpu", "torch_threads": torch.get_num_threads(), "bnb": bnb.__version__, "torch": torch.__version__}
    for tokens in (1, 16):
        x = torch.randn(tokens, inp, dtype=torch.bfloat16)
        with torch.inference_mode():
            us = median_us(lambda: tF.linear(x, w), iters=20)
            nbytes = out * inp * 2
            print(json.dumps({"op": "forward", "impl": "torch.F.linear", "format": "bf16", "dtype": "bf16", "out": out,
                              "in": inp, "tokens": tokens, "rank": 0, "median_us": round(us, 2),
                              "gbps": round(nbytes / us / 1e3, 2), **meta}), flush=True)
            for dq in (False, True):
                packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
                fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
                # Correctness of the peer itself against dequantize + matmul.
                ref = tF.linear(x.float(), F.dequantize_4bit(packed, qs).float())
                err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                t0 = time.perf_counter()
                fn()
                once = time.perf_counter() - t0
                iters = max(3, min(20, int(5.0 / max(once, 1e-6))))
                us = median_us(fn, iters=iters, warmup=1)
                nbytes = out * inp // 2 + (out * inp // 64) * (1 if dq else 4)
                print(json.dumps({"op": "forward", "impl": "bnb.matmul_4bit", "format": "nf4-dq" if dq else "nf4",
                                  "dtype": "bf16", "out": out, "in": inp, "tokens": tokens, "rank": 0,
                                  "median_us": round(us, 2), "gbps": round(nbytes / us / 1e3, 3),
                                  "max_rel_err_vs_dequant": err, **meta}), flush=True)


if __name__ == "__main__":
    main()
