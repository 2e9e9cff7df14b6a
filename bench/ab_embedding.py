"""Interleaved A/B of the CPU embedding forward against the per-table nn.EmbeddingBag loop, in one
process (the VM's times drift by up to 30 % over minutes, so the two are timed in alternation).

The medical shape of ``kfuse.bench.embedding`` (3 tables, B = 4096, ~20 Zipf codes per bag): ``rounds``
rounds of ``calls`` calls each, kfuse's ``cpu`` backend then the loop, medians per call and their
ratio (the issue's CPU target: kfuse / loop <= 1/1.5). ``--no-cat``: the loop's three calls without the
``torch.cat`` that builds its ``[B, sum of dims]`` output, i.e. the gather kernels alone
(bench/results/2026-12-07-cpu-embedding-zen3-forward-gap.md). Usage:
``python bench/ab_embedding.py [--threads 2] [--dtype float32] [--rounds 15] [--calls 10] [--no-cat]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kfuse
from kfuse.bench import embedding as emb
from kfuse.demos._args import positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive(int), default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=positive(int), default=15)
    parser.add_argument("--calls", type=positive(int), default=10)
    parser.add_argument("--no-cat", action="store_true", help="time the loop's calls without its torch.cat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    case = next(c for c in emb.cases(torch.device("cpu"), False) if c.mode == "forward" and c.dtype == dtype)
    inp = emb.make_inputs(case, 0)
    mods, slices = emb._loop_modules(inp), emb._slices(inp)
    ws = list(inp.weights)

    def kfuse_fwd() -> torch.Tensor:
        return kfuse.multi_embedding_bag(ws, inp.indices, inp.offsets, mode="sum", backend="cpu")

    def loop_fwd() -> torch.Tensor | list[torch.Tensor]:
        if args.no_cat:
            return [m(i, o) for m, (i, o) in zip(mods, slices, strict=True)]
        return emb._loop_forward(mods, slices)

    with torch.no_grad():
        torch.testing.assert_close(kfuse_fwd().float(), emb._loop_forward(mods, slices).float(), rtol=1e-2,
                                   atol=1e-2)
        times: dict[str, list[float]] = {"kfuse": [], "loop": []}
        for _ in range(args.rounds):
            for name, fn in (("kfuse", kfuse_fwd), ("loop", loop_fwd)):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    k, lp = statistics.median(times["kfuse"]), statistics.median(times["loop"])
    loop = "loop without cat" if args.no_cat else "loop"
    print(f"{args.dtype}, {torch.get_num_threads()} threads: kfuse {k:.3f} ms, {loop} {lp:.3f} ms, "
          f"kfuse / {loop} {k / lp:.3f}")


if __name__ == "__main__":
    main()
