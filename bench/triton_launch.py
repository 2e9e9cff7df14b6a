"""Triton's own launch cost on this machine's host, beside a torch op's: what each Triton kernel of a
kfuse launcher costs the host beyond kfuse's own Python (``bench/host_launchers.py`` measures that part,
kernels stubbed, on any CPU). On the H200 of 2026-12-04 the LoRA forward at M = 128 spent ~100 µs per
call in its launcher beyond its kernels' 40 µs, of which ~20 µs (on this project's 2-core CPU) is
kfuse's Python: the rest is taken to be Triton's two launches, never measured apart until this script.

Per launch, in µs (back-to-back launches timed by the host's clock, then one sync; best of ``--repeat``):

- ``jit``: ``kernel[grid](...)``, Triton's ``JITFunction.run`` (argument binding, specialisation key,
  cache lookup, launch);
- ``compiled``: the kernel the JIT compiled, launched as ``compiled[grid](*args)`` (no binding or key:
  what a launcher could do with a cache of its own);
- ``torch``: ``Tensor.add_`` of a one-element tensor (one C++ dispatch and launch), for scale;

for an empty kernel of one pointer, and of 24 arguments (12 pointers, 8 ints, 4 constexprs: about
LoRA's forward GEMM, ``triton_kernels/lora.py: _fwd_kernel``).

Usage: ``python bench/triton_launch.py [--number 500] [--repeat 5]`` (needs a CUDA GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _one(p):
    pass


@triton.jit
def _many(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, n0, n1, n2, n3, n4, n5, n6, n7,
          C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


def per_call(f: Callable[[], object], number: int, repeat: int) -> float:
    """Host µs per call of ``f``, the best of ``repeat`` runs of ``number`` back-to-back calls."""
    f()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            f()
        best = min(best, (time.perf_counter() - start) / number)
        torch.cuda.synchronize()
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # (At most ~1000: past CUDA's queue of pending launches the host waits for the GPU, and the loop would
    # time the GPU's rate of empty kernels, not the host's launches: review.)
    parser.add_argument("--number", type=int, default=500, help="launches per timed run (<= ~1000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (the best is kept)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("triton_launch: needs a CUDA GPU (Triton's launch path; the interpreter's is another)")
        return 1
    dev = torch.device("cuda")
    ptrs = [torch.empty(4096, device=dev) for _ in range(12)]
    ints = [4096, 4096, 4096, 128, 4096, 1, 16, 4096]
    consts = {"C0": 128, "C1": 128, "C2": 64, "C3": True}
    grid = (64, 1, 1)  # (three dimensions: a CompiledKernel's launch reads grid[0..2], unpadded, unlike the JIT's)
    one = _one[grid](ptrs[0])  # compiles; returns the CompiledKernel
    many = _many[grid](*ptrs, *ints, **consts)
    tiny = torch.zeros(1, device=dev)
    cases = {
        "1 argument": (lambda: _one[grid](ptrs[0]), lambda: one[grid](ptrs[0])),
        "24 arguments": (lambda: _many[grid](*ptrs, *ints, **consts),
                         lambda: many[grid](*ptrs, *ints, *consts.values())),
    }
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}; "
          f"µs per launch (host), best of {args.repeat} × {args.number}")
    print("| kernel | jit | compiled | torch add_ |")
    print("|---|---|---|---|")
    torch_us = per_call(lambda: tiny.add_(1), args.number, args.repeat)
    for name, (jit, compiled) in cases.items():
        print(f"| {name} | {per_call(jit, args.number, args.repeat):.1f} | "
              f"{per_call(compiled, args.number, args.repeat):.1f} | {torch_us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
