"""Single-table CPU embedding bags against ``torch.nn.functional.embedding_bag``, interleaved in one process.

For each shape (rows x dim, bags x indices a bag, uniform or Zipf indices; fp32): ``torch``
(``F.embedding_bag``), ``C++`` (kfuse's kernel called directly, with its own checks of the values),
``multi`` (``kfuse.multi_embedding_bag`` on the one table) and ``bag`` (``kfuse.embedding_bag``), medians
of ``rounds`` rounds of ``calls`` calls, µs per call. ``--cold`` sweeps 16 MB before each call (the caches a
training step leaves the op: its Python then runs from memory). The kernel-to-op gap is the ops' own host
time (bench/results/2026-12-06-cpu-embedding-single-table.md).
``--sizes`` runs tables of 5k to 400k rows of D = 128 instead (the forward's prefetch policy depends on the
tables' size: bench/results/2026-12-07-cpu-embedding-table-sizes.md).
``--train`` times the modules with gradients instead: ``torch.nn.EmbeddingBag`` against ``kfuse.nn.EmbeddingBag``
(sum), the forward alone (autograd recording it) and a step (forward, backward, ``.grad`` dropped), with dense and
with sparse gradients.
Usage: ``python bench/ab_embedding_bag.py [--threads 2] [--rounds 15] [--calls 20] [--cold] [--sizes] [--train]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import kfuse
from kfuse import _backends
from kfuse.demos._args import positive

# (rows, dim, bags, indices a bag, "u" uniform or "z" Zipf)
SHAPES = ((20_000, 64, 2048, 8, "z"), (100_000, 128, 512, 20, "u"), (1000, 64, 64, 4, "u"))
SIZES = tuple((rows, 128, bags, 20, dist) for rows in (5000, 20_000, 60_000, 150_000, 400_000) for dist in "uz"
              for bags in (512, 4096))


def zipf(n: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    p = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=positive(int), default=2)
    parser.add_argument("--rounds", type=positive(int), default=15)
    parser.add_argument("--calls", type=positive(int), default=20)
    parser.add_argument("--cold", action="store_true", help="sweep 16 MB before each call")
    parser.add_argument("--sizes", action="store_true", help="tables of 5k to 400k rows (D = 128) instead")
    parser.add_argument("--train", action="store_true", help="the modules with gradients (forward, step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = _backends.extension()
    gen = torch.Generator().manual_seed(0)
    junk = torch.zeros(4 << 20)
    for shape in SIZES if args.sizes else SHAPES:
        (run_train if args.train else run_shape)(shape, args, ext, gen, junk)


def timed(fns: dict, args: argparse.Namespace, junk: torch.Tensor) -> dict[str, float]:
    """Median over ``args.rounds`` rounds of each fn's mean time over ``args.calls`` calls, µs; the fns in turn
    within a round (in reverse order every other round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):
        for name, fn in reversed(fns.items()) if r % 2 else fns.items():
            fn()
            total = 0.0
            for _ in range(args.calls):
                if args.cold:
                    junk.add_(1.0)
                t0 = time.perf_counter()
                fn()
                total += time.perf_counter() - t0
            times[name].append(total / args.calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def run_train(shape: tuple, args: argparse.Namespace, ext: object, gen: torch.Generator, junk: torch.Tensor) -> None:
    rows, dim, bags, per_bag, dist = shape
    n = bags * per_bag
    idx = torch.randint(0, rows, (n,), generator=gen) if dist == "u" else zipf(n, rows, gen)
    off = torch.arange(0, n, per_bag)
    grad = torch.randn(bags, dim, generator=gen)
    for sparse in (False, True):
        mods = {"torch": torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse),
                "kfuse": kfuse.nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse)}

        def step(m: torch.nn.Module) -> None:
            m(idx, off).backward(grad)
            m.weight.grad = None

        fns = {**{f"{k} fwd": functools.partial(m, idx, off) for k, m in mods.items()},
               **{f"{k} step": functools.partial(step, m) for k, m in mods.items()}}
        t = timed(fns, args, junk)
        cells = "  ".join(f"{k} {v:7.1f}" for k, v in t.items())
        print(f"{rows}x{dim} {bags}x{per_bag}{dist} {'sparse' if sparse else 'dense'} ({args.threads} threads"
              f"{', cold' if args.cold else ''}): {cells}  kfuse/torch fwd {t['kfuse fwd'] / t['torch fwd']:.2f} "
              f"step {t['kfuse step'] / t['torch step']:.2f}", flush=True)


def run_shape(shape: tuple, args: argparse.Namespace, ext: object, gen: torch.Generator, junk: torch.Tensor) -> None:
    rows, dim, bags, per_bag, dist = shape
    w = torch.randn(rows, dim, generator=gen)
    n = bags * per_bag
    idx = torch.randint(0, rows, (n,), generator=gen) if dist == "u" else zipf(n, rows, gen)
    off = torch.arange(0, n, per_bag)
    last = torch.arange(0, n + 1, per_bag)
    fns = {"torch": lambda: F.embedding_bag(idx, w, off, mode="sum"),
           "C++": lambda: ext.embedding_forward([w], idx, last, [0], [-1], 0, None),
           "multi": lambda: kfuse.multi_embedding_bag([w], idx, last, backend="cpu"),
           "bag": lambda: kfuse.embedding_bag(idx, w, off, mode="sum")}
    with torch.no_grad():
        t = timed(fns, args, junk)
    cells = "  ".join(f"{k} {v:7.1f}" for k, v in t.items())
    print(f"{rows}x{dim} {bags}x{per_bag}{dist} ({args.threads} threads{', cold' if args.cold else ''}): {cells}",
          flush=True)

if __name__ == "__main__":
    main()
