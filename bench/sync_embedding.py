"""What the Triton embedding forward's one host sync costs (issue 15: "say how the check avoids a host
synchronisation, or measure what it costs").

The forward kernel never reads out of bounds: bad indices are masked and offsets clamped, and the
first bad position is written to a two-int32 device flag. ``kfuse.multi_embedding_bag`` reads that
flag (``flag.tolist()``) before returning, so that a bad input raises at the call that made it; that
read is the op's one host synchronisation (the fused-optimizer backward has none). This script times,
back to back with one ``synchronize`` per batch of calls (so the host may run ahead of the GPU):

- ``op``: ``kfuse.multi_embedding_bag(..., backend="triton")``, the flag read included;
- ``op, async``: the same with ``check="async"`` (the flag read by a later call): ``op`` minus this is the
  sync's cost, all else equal;
- ``kernel``: the launcher ``kfuse.triton_kernels.embedding.forward`` alone (the same kernel, its flag
  never read: what a sync-free check would cost at best);
- ``step`` / ``step, no read``: a training step of ``kfuse.nn.MultiTableEmbeddingBag`` with the fused
  row-wise Adagrad, and the same launches with the flag not read;

at the medical shape and FBGEMM's default (fp32). Only ``op`` − ``op, async`` is the sync's cost: ``op`` −
``kernel`` and ``step`` − ``step, no read`` also hold the op's and the module's own host work (validation,
routing, autograd; ~30 µs of the medical forward's gap on a CPU with the kernels stubbed, an audit of
this script, 2026-12-05), which the H200 figures of 2026-12-04 (274 against 141 µs) credited to the sync.
Usage: ``python bench/sync_embedding.py [--device cuda] [--number 200]``;
``TRITON_INTERPRET=1 python bench/sync_embedding.py --device cpu --batch 4 --number 2`` is a dry run
of the script on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from dataclasses import replace

import torch

import kfuse
from kfuse.bench import embedding as emb
from kfuse.demos._args import positive
from kfuse.report import Case
from kfuse.triton_kernels import embedding as tk

LR = 0.01


def _per_call(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(min, median) microseconds per call over 9 batches of ``number`` back-to-back calls."""
    def batch() -> None:
        for _ in range(number):
            fn()
        sync()

    batch()  # compile and warm up
    times = [t / number * 1e6 for t in timeit.repeat(batch, number=1, repeat=9)]
    return min(times), statistics.median(times)


def time_case(case: Case, number: int) -> None:
    inp = emb.make_inputs(case, 0)
    dev = case.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ws = [w.clone() for w in inp.weights]
    t = len(ws)
    ft, pad = list(range(t)), [-1] * t
    m = kfuse.nn.MultiTableEmbeddingBag([tuple(w.shape) for w in ws], optimizer="rowwise_adagrad", lr=LR,
                                        eps=1e-8, device=dev, backend="triton")
    g = torch.randn(m(inp.indices, inp.offsets).shape, device=dev)

    def op() -> object:
        return kfuse.multi_embedding_bag(ws, inp.indices, inp.offsets, mode="sum", backend="triton")

    def op_async() -> object:
        return kfuse.multi_embedding_bag(ws, inp.indices, inp.offsets, mode="sum", backend="triton", check="async")

    def kernel() -> object:
        return tk.forward(ws, inp.indices, inp.offsets, ft, pad, 0, None)

    def step() -> object:
        y = m(inp.indices, inp.offsets)
        y.backward(g)
        return y

    mws, st1 = [p.data for p in m.weights], m.states(1)

    def step_no_read() -> object:
        y, _ = tk.forward(mws, inp.indices, inp.offsets, ft, pad, 0, None)
        tk.backward_fused(g, mws, inp.indices, inp.offsets, ft, pad, 0, None, "rowwise_adagrad",
                          st1, [], LR, 1e-8, 0.9, 0.999, 0.0, 1, 0)
        return y

    shape = f"{case.params['shape']} {t}x{inp.offsets.numel() // max(t, 1)}"
    for name, fn in (("op", op), ("op, async", op_async), ("kernel", kernel), ("step", step),
                     ("step, no read", step_no_read)):
        lo, med = _per_call(fn, number, sync)
        print(f"{shape:>18} {name:14s} min {lo:9.1f} us  median {med:9.1f} us per call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--number", type=positive(int), default=200, help="calls per batch")
    parser.add_argument("--batch", type=int, help="bags per feature instead of the cases' (a dry run: 4)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    print(f"kfuse from {kfuse.__file__}; torch {torch.__version__}; device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    for case in emb.cases(dev, quick=False):
        if case.mode == "forward" and case.dtype == torch.float32:
            time_case(case if args.batch is None else replace(case, shape=(case.shape[0], args.batch)), args.number)


if __name__ == "__main__":
    main()
