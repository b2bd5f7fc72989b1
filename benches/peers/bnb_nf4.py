#!/usr/bin/env python3
"""bitsandbytes NF4 quantize / dequantize on the CPU, the peer of `cargo bench --bench nf4`.

    /root/.cache/peft-ref-venv/bin/python benches/peers/bnb_nf4.py [--threads N] [--reps R]

Times `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (NF4, blocksize 64) on bf16 tensors
of 4096x4096 and 11008x4096, with and without double quantization (`compress_statistics`), as the
median wall time of R runs after a warm-up (the default backend is `torch.compile`d on first use).
Also reports process CPU time per call, which stays meaningful on a loaded machine. Prints one line
per case plus the torch/bnb versions and the CPU capability torch dispatches to.
"""

import argparse
import os
import statistics
import time

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F


def bench(fn, reps):
    fn()  # warm-up (compilation, allocator)
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(4096, 4096), (11008, 4096)]:
        x = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
        for dq in [False, True]:
            q = lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
            wall, cpu = bench(q, args.reps)
            print(f"bnb quantize_4bit   nf4 bf16 {rows}x{cols} dq={dq!s:5}  wall {wall:9.2f} ms  cpu {cpu:9.2f} ms")
            packed, state = q()
            d = lambda: F.dequantize_4bit(packed, state)
            wall, cpu = bench(d, args.reps)
            print(f"bnb dequantize_4bit nf4 bf16 {rows}x{cols} dq={dq!s:5}  wall {wall:9.2f} ms  cpu {cpu:9.2f} ms")


if __name__ == "__main__":
    main()
