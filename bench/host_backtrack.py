"""Per-step cost of greedy decoding with kfuse's Llama against transformers' generate on a model whose
arithmetic is negligible (16 layers of width 64, batch 32, 64 new tokens, one thread): what is left is
mostly host work, the regime a 1B-class model's decode on a GPU may be in (issue 16's GPU target,
>= 1.5x generate's tokens/s; on CUDA also the steps replayed from a CUDA graph).
Usage: ``python bench/host_backtrack.py [--layers 16] [--device cpu] [--profile]``. ``--profile``: a
``torch.profiler`` table per candidate of one whole greedy decode (the ops and CUDA runtime calls by
self CPU time), to say where an eager step's host time goes: on an H200 (2026-12-04) kfuse's eager
step of a 1B-class model ran at 0.60x generate's tokens/s while this CPU proxy put it at 1.43x.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from kfuse.bench import backtrack as bb
from kfuse.demos._args import positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive(int), default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also print a profiler table per candidate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    c = bb.case(dev, torch.float32, "decode", 32, 64, prompt=(8, 32), hidden=64, layers=args.layers, heads=4,
                kv_heads=2, mlp=128, vocab=512)
    inp = bb.make_inputs(c, 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        runs = [("kfuse", bb._kfuse_decode), ("transformers", bb._hf_decode)]
        if dev.type == "cuda":  # the steps replayed from a CUDA graph (on the CPU: the eager ops again)
            runs.insert(1, ("kfuse-graphs", lambda c, i: bb._kfuse_decode(c, i, graphs=True)))
        for name, fn in runs:
            fn(c, inp)
            best = float("inf")
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                fn(c, inp)
                sync()
                best = min(best, time.perf_counter() - t0)
            step = best / c.shape[1]
            print(f"{name:>12}: {step * 1e3:.2f} ms per step, {step / args.layers * 1e6:.0f} us per layer-step")
            if args.profile:
                profile(name, lambda fn=fn: fn(c, inp), dev, sync)


def profile(name: str, run: Callable[[], object], dev: torch.device, sync: Callable[[], None]) -> None:
    """Prints the ops (and CUDA runtime calls) of one ``run`` by self CPU time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run()
        sync()
    print(f"== profile: {name}, one greedy decode")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=55))


if __name__ == "__main__":
    main()
