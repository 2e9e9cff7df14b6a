"""Interleaved A/B of two builds of the CPU embedding forward kernel in one process: this checkout's
``kfuse._C.embedding_forward`` against another build's extension file (copy the old
``python/kfuse/_C.*.so`` aside before rebuilding), on the shapes of ``kfuse.bench.embedding``. The two
must give the same bits; the ratio new / old is the kernel change's alone (no Python path). Without ``--psw``
the per-table ``nn.EmbeddingBag`` loop is timed in the same rounds too (new / loop: issue 15's CPU forward
target, for the kernel alone).

Usage: ``python bench/ab_embedding_builds.py OLD_SO [--threads 2] [--shape medical] [--dtype float32] [--psw]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from kfuse import _C as new
from kfuse.bench import embedding as emb
from kfuse.demos._args import positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_so", help="the other build's extension file")
    parser.add_argument("--threads", type=positive(int), default=2)
    parser.add_argument("--shape", default="medical", choices=sorted(emb.SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--psw", action="store_true", help="with per-sample weights")
    parser.add_argument("--rounds", type=positive(int), default=15)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("kfuse_old._C", args.old_so)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    torch.set_num_threads(args.threads)
    batch = 4096 if args.shape == "medical" else 512
    inp = emb.make_inputs(emb._case(torch.device("cpu"), getattr(torch, args.dtype), "forward", args.shape, batch), 0)
    ws, t = list(inp.weights), len(inp.weights)
    psw = torch.rand(inp.indices.numel()) if args.psw else None
    call = (ws, inp.indices, inp.offsets, list(range(t)), [-1] * t, 0, psw)
    fns = {"new": lambda: new.embedding_forward(*call), "old": lambda: old.embedding_forward(*call)}
    assert torch.equal(fns["new"](), fns["old"]()), "the two builds disagree"
    if not args.psw:
        mods, slices = emb._loop_modules(inp), emb._slices(inp)
        fns["loop"] = lambda: emb._loop_forward(mods, slices)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(args.rounds):
            for k, f in reversed(fns.items()) if r % 2 else fns.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    f()
                times[k].append((time.perf_counter() - t0) / 10 * 1e3)
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.shape} {args.dtype}{' psw' if args.psw else ''}, {args.threads} threads: new {m['new']:.3f} ms, "
          f"old {m['old']:.3f} ms, new / old {m['new'] / m['old']:.3f}"
          + (f"; loop {m['loop']:.3f} ms, new / loop {m['new'] / m['loop']:.3f}" if "loop" in m else ""), flush=True)


if __name__ == "__main__":
    main()
