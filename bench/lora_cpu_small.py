"""The cpu backend's LoRA layer on small calls, where the op's host work is a visible part of its time: kfuse's
forward and forward + backward against torch's ``F.linear(x, W).addmm_(x Aᵀ, Bᵀ, alpha=s)`` and the PEFT-style
``F.linear(x, W) + F.linear(F.linear(x, A), B) · s``, fp32, r = 16, 2 threads by default.

Each figure: the best of 7 rounds of back-to-back calls, µs per call. The calls run after GEMMs that stream W
through the caches, so the op's Python runs with cold caches, as in a model (its warm cost, kernels stubbed:
``bench/host_launchers.py``). An A/B against another checkout: ``PYTHONPATH=<its python/> python
bench/lora_cpu_small.py`` (the extension is the one found there).
Usage: ``python bench/lora_cpu_small.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kfuse
from kfuse.demos._args import positive

SHAPES = ((1024, 1), (256, 1), (1024, 16))  # (K = N, M)


def per_call(fn: Callable[[], object], number: int, warmup: int = 200, rounds: int = 7) -> float:
    """µs per call, the best of ``rounds`` rounds of ``number`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive(int), default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"kfuse from {kfuse.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, r = 16; "
          "us per call")
    for K, M in SHAPES:
        fwd, both, addmm, peft = row(K, M)
        print(f"K = N = {K:<5} M = {M:<3} kfuse fwd {fwd:7.1f}  fwd+bwd {both:7.1f}   addmm fwd {addmm:7.1f}  "
              f"PEFT-style fwd {peft:7.1f}", flush=True)


def row(K: int, M: int) -> tuple[float, float, float, float]:
    """(kfuse forward, kfuse forward + backward, addmm forward, PEFT-style forward) in µs, for K = N."""
    w = torch.randn(K, K) * 0.03
    a, b = (torch.randn(16, K) * 0.01).requires_grad_(), (torch.randn(K, 16) * 0.01).requires_grad_()
    x = torch.randn(M, K)

    def step() -> None:
        kfuse.lora_linear(x, w, a, b, 2.0).sum().backward()

    with torch.no_grad():
        fwd = per_call(lambda: kfuse.lora_linear(x, w, a, b, 2.0), 2000)
        addmm = per_call(lambda: F.linear(x, w).addmm_(F.linear(x, a), b.t(), alpha=2.0), 2000)
        peft = per_call(lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0, 2000)
    return fwd, per_call(step, 500), addmm, peft


if __name__ == "__main__":
    main()
