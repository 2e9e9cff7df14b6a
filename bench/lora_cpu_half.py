"""The cpu backend's LoRA layer on half-precision x and W against the PEFT-style composition (torch's
half ``F.linear`` for the base, fp32 adapters on ``x.float()``), on this machine's CPU.

Per dtype (bf16, fp16) and M, the median ms (``kfuse.report.time_ms``): kfuse's forward, its forward + backward
(dx, W frozen, fp32 adapters), and the PEFT-style forward. K = N = 2048, r = 16, 2 threads by default.
An A/B against another checkout: ``PYTHONPATH=<its python/> python bench/lora_cpu_half.py``.
Usage: ``python bench/lora_cpu_half.py [--k 2048] [--m 64 256 1024]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kfuse
from kfuse.report import time_ms


def row(dtype: torch.dtype, M: int, K: int) -> tuple[float, float, float]:
    """(kfuse forward, kfuse forward + backward, PEFT-style forward) in ms, for K = N."""
    w = (torch.randn(K, K) * 0.02).to(dtype)
    a, b = torch.randn(16, K) * 0.02, torch.randn(K, 16) * 0.02
    x = torch.randn(M, K).to(dtype).requires_grad_()
    xd = x.detach()

    def step() -> None:
        y = kfuse.lora_linear(x, w, a, b, 2.0, backend="cpu")
        y.backward(torch.ones_like(y))

    fns = (lambda: kfuse.lora_linear(xd, w, a, b, 2.0, backend="cpu"), step,
           lambda: F.linear(xd, w) + (F.linear(F.linear(xd.float(), a), b) * 2.0).to(dtype))
    for f in fns:
        f()  # warm-up (time_ms times from the second call)
    return tuple(time_ms(f, torch.device("cpu"))[0] for f in fns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=2048, help="K = N (default 2048)")
    p.add_argument("--m", type=int, nargs="+", default=[64, 256, 1024], help="rows (default 64 256 1024)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"kfuse from {kfuse.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"K = N = {args.k}, r = 16; median ms")
    for dtype in (torch.bfloat16, torch.float16):
        for M in args.m:
            fwd, both, peft = row(dtype, M, args.k)
            print(f"{str(dtype)[6:]:8s} M={M:<5} kfuse fwd {fwd:7.2f}  fwd+bwd {both:7.2f}  "
                  f"PEFT-style fwd {peft:7.2f}", flush=True)


if __name__ == "__main__":
    main()
