"""Interleaved A/B of a CPU training step (forward + backward, no optimizer) of
``kfuse.nn.MultiTableEmbeddingBag`` against the per-table ``nn.EmbeddingBag`` loop, with dense or sparse
gradients, and the minor page faults of each (``resource.getrusage``): every step's gradients are new
memory, and at these shapes the faults decide much of the step's time
(bench/results/2026-12-08-cpu-embedding-gradient-pages.md).

Shapes of ``kfuse.bench.embedding``: ``medical`` (3 tables, B 4096) or ``fbgemm`` (32 × 100k × 128, B 512),
fp32; a step drops every ``.grad`` after its backward, as ``zero_grad()`` does. Usage:
``python bench/ab_embedding_train.py [--shape medical] [--grad dense] [--threads 1] [--rounds 5] [--steps 5]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch

import kfuse
from kfuse.bench import embedding as emb
from kfuse.demos._args import positive


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="medical", choices=sorted(emb.SHAPES))
    parser.add_argument("--grad", default="dense", choices=["dense", "sparse"])
    parser.add_argument("--threads", type=positive(int), default=1)
    parser.add_argument("--rounds", type=positive(int), default=5)
    parser.add_argument("--steps", type=positive(int), default=5, help="steps a round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparse = args.grad == "sparse"
    batch = 4096 if args.shape == "medical" else 512
    inp = emb.make_inputs(emb._case(torch.device("cpu"), torch.float32, "train", args.shape, batch), 0)
    module = kfuse.nn.MultiTableEmbeddingBag([tuple(w.shape) for w in inp.weights], mode="sum", sparse=sparse)
    with torch.no_grad():
        for p, w in zip(module.parameters(), inp.weights, strict=True):
            p.copy_(w)
    loop, slices = emb._loop_modules(inp, sparse), emb._slices(inp)

    def kfuse_step() -> None:
        module(inp.indices, inp.offsets).backward(inp.grad_out)
        for p in module.parameters():
            p.grad = None

    def loop_step() -> None:
        emb._loop_forward(loop, slices).backward(inp.grad_out)
        for m in loop:
            m.weight.grad = None

    steps: dict[str, Callable[[], None]] = {"kfuse": kfuse_step, "loop": loop_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    faults: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            faults[name].append((_faults() - f0) / args.steps)
    k, lp = statistics.median(times["kfuse"]), statistics.median(times["loop"])
    print(f"{args.shape}, {args.grad} gradients, {torch.get_num_threads()} threads: "
          f"kfuse {k:.2f} ms ({statistics.median(faults['kfuse']):.0f} faults a step), "
          f"loop {lp:.2f} ms ({statistics.median(faults['loop']):.0f}), kfuse / loop {k / lp:.2f}", flush=True)


if __name__ == "__main__":
    main()
