"""kfuse.nn.DEU on the CPU for wide, short inputs (few rows, many neurons), where the per-neuron plans
(built once per call, O(neurons) whatever the rows) are most of the work: forward (no grad) and
forward + backward, float32, the median ms (``kfuse.report.time_ms``), then the PyTorch reference
backend's forward + backward on the first shape. Usage: ``python bench/deu_cpu_wide.py [--threads 2]``.
Results: bench/results/2026-12-07-cpu-deu-wide.md.
"""

from __future__ import annotations

import argparse

import torch

import kfuse
from kfuse.report import time_ms

SHAPES = ((1, 131072), (8, 131072), (32, 131072), (64, 4096))


def row(shape: tuple[int, int], backend: str) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of a fresh DEU layer on ``shape`` (neurons last)."""
    m = kfuse.nn.DEU(shape[1], backend=backend)
    x = torch.randn(*shape, requires_grad=True)
    gy = torch.randn(*shape)

    def fwd_bwd() -> None:
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x).backward(gy)

    def fwd() -> None:
        with torch.no_grad():
            m(x)

    fwd()  # warm-up
    fwd_bwd()
    cpu = torch.device("cpu")
    return time_ms(fwd, cpu)[0], time_ms(fwd_bwd, cpu)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for i, shape in enumerate(SHAPES):
        for backend in ("auto", "reference") if i == 0 else ("auto",):
            f, fb = row(shape, backend)
            print(f"{backend:9s} {str(list(shape)):14s} forward {f:8.3f} ms  forward + backward {fb:8.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
