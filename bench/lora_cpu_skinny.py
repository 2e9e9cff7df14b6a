"""The LoRA cpu backend's rank-r GEMMs in the backward, in both layouts: which one torch's CPU BLAS is faster at, by
rows M, output width N and rank r (``kfuse.ops.lora._SKINNY_RANKS`` and ``_SKINNY_MIN_M`` come from this grid).

For each (M, N, r), fp32, the ratio old/new (above 1: the transposed layout is faster) of
- ``G = dy B`` (``[M, N] x [N, r]``): ``mm(dy, B)`` against ``mm(dy, Bᵀ.contiguous().t())``;
- ``dB = dyᵀ S`` (``[N, M] x [M, r]``): ``mm(dy.t(), S)`` against ``mm(S.t(), dy).t().contiguous()``.
Best of 5 rounds of back-to-back calls. Usage: ``python bench/lora_cpu_skinny.py [--threads 2]``.
"""

from __future__ import annotations

import argparse

import torch
from lora_cpu_small import per_call

from kfuse.demos._args import positive
from kfuse.ops import lora as ops


def ratios(M: int, N: int, r: int) -> str:
    """The old/new time ratios of G and of dB at one (M, N, r)."""
    dy, B, S = torch.randn(M, N), torch.randn(N, r), torch.randn(M, r)

    def us(fn) -> float:  # best of 5 rounds of 10 calls, after 3
        return per_call(fn, 10, warmup=3, rounds=5)

    g = us(lambda: torch.mm(dy, B)) / us(lambda: torch.mm(dy, B.t().contiguous().t()))
    d = us(lambda: torch.mm(dy.t(), S)) / us(lambda: torch.mm(S.t(), dy).t().contiguous())
    return f"{g:4.2f} {d:4.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive(int), default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kfuse takes the transposed layout for r in "
          f"{list(ops._SKINNY_RANKS)} from M = {ops._SKINNY_MIN_M}; old/new time ratio of G and of dB")
    for M in (1, 8, 64, 512, 2368):
        for N in (384, 2048):
            row = []
            for r in (1, 2, 4, 8, 12, 16):
                row.append(f"r={r}: " + ratios(M, N, r))
            print(f"M={M:<5} N={N:<5} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
