"""kfuse.lora_linear_multi on the CPU at decode batch sizes against the loop a user writes (F.linear, then
per used adapter: index_select, two mm, index_add_), in one process, µs per call (min of
``--rounds``). K = N = 256, 8 adapters of random ranks 4-64, fp32 and bf16 x / W (fp32 adapters).
Usage: ``python bench/lora_cpu_multi_small.py [--threads 1] [--rounds 5]``.
Results: bench/results/2026-12-07-cpu-lora-multi-decode.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kfuse
from kfuse.demos._args import positive


def loop(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor,
         ranks: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, W, bias)
    for a in ids.unique().tolist():
        if a < 0:
            continue
        rows, r = (ids == a).nonzero().squeeze(1), int(ranks[a])
        low = (x.index_select(0, rows).to(A.dtype) @ A[a, :r].t()) @ B[a, :, :r].t()
        y.index_add_(0, rows, low.to(y.dtype), alpha=float(s[a]))
    return y


def best_us(fn: Callable[[], object], calls: int = 300) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=positive(int), default=1)
    parser.add_argument("--rounds", type=positive(int), default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    K = N = 256
    L = 8
    ranks = torch.randint(4, 65, (L,))
    A = torch.randn(L, int(ranks.max()), K) / 16
    B = torch.randn(L, N, int(ranks.max())) / 8
    s, W, b = torch.rand(L), torch.randn(N, K) / 16, torch.randn(N)
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            for M in (1, 7):
                x, ids = torch.randn(M, K).to(dt), torch.randint(0, L, (M,))
                Wd, bd = W.to(dt), b.to(dt)
                fns = {"kfuse": lambda: kfuse.lora_linear_multi(x, Wd, A, B, s, ranks, ids, bd),  # noqa: B023
                       "loop": lambda: loop(x, Wd, A, B, s, ranks, ids, bd)}  # noqa: B023
                times = {k: min(best_us(f) for _ in range(args.rounds)) for k, f in fns.items()}
                print(f"{str(dt)[6:]:8s} M={M}: kfuse {times['kfuse']:6.1f} us  loop {times['loop']:6.1f} us  "
                      f"ratio {times['kfuse'] / times['loop']:.2f}", flush=True)


if __name__ == "__main__":
    main()
