"""The Python time of kfuse's Triton launchers, their kernels stubbed out: what the host spends per
call before Triton's own launch, measurable on any CPU (no GPU needed).

On an H200 (bench/results/2026-12-04-h200/) every LoRA row below M ≈ 512 was host-bound: a forward at
M = 128 took 0.22 ms per call against 0.04 ms of kernels. This script times the part of that which is
ours: validation, allocation, block and grid choice, argument packing, with every ``@triton.jit``
kernel of the launcher replaced by a no-op, on CPU tensors (bf16 x, W; fp32 adapters; the multi-adapter
forward of 128 rows over 8 adapters; the
embedding forward's two shapes, fp32 tables; one layer's decode attention of the KV cache, fp32).
Under the LoRA and embedding launchers, the public op that calls them (``kfuse.lora_linear``, fp16 x
since the interpreter refuses bf16; ``kfuse.multi_embedding_bag``): its validation and routing on top.
Min of 7 repeats of ``--number`` back-to-back calls.
Usage: ``python bench/host_launchers.py [--number 2000]``. An A/B against another checkout:
``PYTHONPATH=<its python/> python bench/host_launchers.py`` (with its triton_kernels linked in).
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launchers take CPU tensors only under the interpreter

import torch  # noqa: E402

import kfuse  # noqa: E402
from kfuse.demos._args import positive  # noqa: E402
from kfuse.triton_kernels import embedding as te  # noqa: E402
from kfuse.triton_kernels import kv as tkv  # noqa: E402
from kfuse.triton_kernels import lora as tl_  # noqa: E402


class _NoLaunch:
    """``kernel[grid](*args)`` that does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def stub(module: object) -> None:
    for name in dir(module):
        if name.endswith("_kernel"):
            setattr(module, name, _NoLaunch())


def per_call(fn: Callable[[], object], number: int) -> float:
    """Min over 7 repeats of µs per call."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--number", type=positive(int), default=2000, help="calls per repeat (default 2000)")
    p.add_argument("--ops", default="lora,embedding,kv", help="which: lora, embedding, kv (default all)")
    args = p.parse_args()
    ops = set(args.ops.split(","))
    if not ops <= {"lora", "embedding", "kv"}:
        p.error(f"--ops: lora, embedding or kv; got {args.ops!r}")
    stub(tl_)
    stub(te)
    stub(tkv)
    if "lora" in ops:
        lora_host(args.number)
    if "embedding" in ops:
        embedding_host(args.number)
    if "kv" in ops:
        kv_decode_host(args.number)
        kv_cache_host(args.number)


def lora_host(number: int) -> None:
    K = N = 4096
    # The Triton GEMM's path at every M: bf16 at M >= _CUBLAS_MIN_M would run cuBLAS's torch.mm, here a 4096^3
    # GEMM on the CPU per call (0.18 s, not host time: review)
    tl_._CUBLAS_MIN_M = 1 << 30
    for M in (1, 128, 4096):
        x = torch.randn(M, K).bfloat16()
        w = torch.randn(N, K).bfloat16()
        a, b = torch.randn(16, K), torch.randn(N, 16)
        us = per_call(lambda x=x, w=w, a=a, b=b: tl_.lora_forward(x, w, False, a, b, 2.0, None, None, None, 0.0, False),
                      number)
        print(f"lora_forward      M={M:<5}                 {us:7.1f} us per call", flush=True)
        xh, wh = x.half(), w.half()
        us = per_call(lambda x=xh, w=wh, a=a, b=b: kfuse.lora_linear(x, w, a, b, 2.0, backend="triton"), number)
        print(f"  the op (lora_linear, fp16)                      {us:7.1f} us per call", flush=True)
    # The report's multi-adapter case: 128 rows over 8 rank-16 adapters (fp32 stacks), bias-free.
    L, r, M = 8, 16, 128
    x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
    A, B = torch.randn(L, r, K), torch.randn(L, N, r)
    sc, rk, ids = torch.rand(L), torch.full((L,), r), torch.randint(0, L, (M,))
    us = per_call(lambda: tl_.lora_multi_forward(x, w, False, A, B, sc, rk, ids, None), number)
    print(f"lora_multi_forward M={M} L={L}                 {us:7.1f} us per call", flush=True)
    xh, wh = x.half(), w.half()
    with torch.no_grad():
        us = per_call(lambda: kfuse.lora_linear_multi(xh, wh, A, B, sc, rk, ids, backend="triton"), number)
    print(f"  the op (lora_linear_multi, fp16)                {us:7.1f} us per call", flush=True)


def embedding_host(number: int) -> None:
    for name, tables, batch in (("medical", (74_000, 79_000, 20_000), 4096), ("fbgemm", (1000,) * 32, 512)):
        ws = [torch.zeros(r, 128) for r in tables]
        t = len(ws)
        offsets = torch.arange(0, 20 * t * batch + 1, 20)
        indices = torch.zeros(20 * t * batch, dtype=torch.int64)
        ft, pad = list(range(t)), [-1] * t
        us = per_call(lambda ws=ws, i=indices, o=offsets, ft=ft, pad=pad: te.forward(ws, i, o, ft, pad, 0, None),
                      number)
        print(f"embedding forward {name:<8} {t:>2} tables, B={batch:<4} {us:7.1f} us per call", flush=True)
        us = per_call(lambda ws=ws, i=indices, o=offsets: kfuse.multi_embedding_bag(ws, i, o, backend="triton",
                                                                                    check="async"), number)
        print(f"  the op (multi_embedding_bag, check='async')      {us:7.1f} us per call", flush=True)


def kv_decode_host(number: int) -> None:
    B, hq, hkv, d, pages = 32, 32, 8, 128, 32 * 256
    q = torch.randn(B, hq, d)
    kp = torch.zeros(pages, 16, hkv, d)
    table = torch.arange(pages, dtype=torch.int32).view(B, 256)
    ids, lens = torch.arange(B, dtype=torch.int32), torch.full((B,), 4096, dtype=torch.int32)
    us = per_call(lambda: tkv.paged_decode(q, kp, kp, table, ids, lens, 4096, 0.088), number)
    print(f"kv paged_decode    B={B} hq={hq} hkv={hkv} ctx 4096    {us:7.1f} us per call (one layer)", flush=True)


def kv_cache_host(number: int) -> None:
    """The cache's own host work per call, on a CPU cache of one 8-wide head (its copies negligible): what a
    CUDA cache runs too before its device replay. A decode step of 32 sequences over 2 layers (append of layer 0
    opens the step, layer 1 appends, advance commits; ids as a list, as the Llama model passes them), rollback of
    256 sequences by one page (tensors), and fork + free."""
    c = kfuse.kv.PagedKVCache(2, 1, 8, 16, 32 * 64 + 256 * 64, 256 + 2, torch.float32, "cpu",
                              max_pages_per_seq=64)
    ids = [c.add_sequence() for _ in range(32)]
    k1 = torch.zeros(32, 1, 8)
    step = {"append, layer 0 (opens the step)": lambda: c.append(0, ids, k1, k1),
            "append, layer 1": lambda: c.append(1, ids, k1, k1), "advance": lambda: c.advance(ids)}
    times = {name: [] for name in step}
    for _ in range(7):
        c.rollback(ids, [0] * 32)
        for _ in range(min(number, 1000)):  # 1000 tokens within the 64 pages
            for name, fn in step.items():
                t0 = timeit.default_timer()
                fn()
                times[name].append(timeit.default_timer() - t0)
    for name, ts in times.items():
        print(f"kv cache {name:34s} {min(ts) * 1e6:7.1f} us per call", flush=True)
    for s in ids:
        c.free(s)
    many = torch.tensor([c.add_sequence() for _ in range(256)])
    fill = torch.zeros(256 * 1000, 1, 8)
    c.append(0, many, fill, fill, [1000] * 256)
    c.append(1, many, fill, fill, [1000] * 256)
    c.advance(many, [1000] * 256)
    pad, sixteen, back = torch.zeros(256 * 16, 1, 8), torch.full((256,), 16), torch.full((256,), 1000)
    ts = []
    for _ in range(min(number, 500)):
        c.append(0, many, pad, pad, sixteen)
        c.append(1, many, pad, pad, sixteen)
        c.advance(many, sixteen)
        t0 = timeit.default_timer()
        c.rollback(many, back)  # 1016 -> 1000 tokens: one page each
        ts.append(timeit.default_timer() - t0)
    print(f"kv cache rollback of 256 sequences by a page  {min(ts) * 1e6:7.1f} us per call", flush=True)

    def fork_free() -> None:
        c.free(c.fork(int(many[0]), 1000))

    print(f"kv cache fork + free                         {per_call(fork_free, number):7.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
