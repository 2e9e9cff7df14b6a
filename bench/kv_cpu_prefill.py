"""The cpu backend's paged prefill attention: the C++ kernel against torch's SDPA over the gathered pages
(the path bf16 and fp16 prefills of at least ``kfuse.ops.kv._SDPA_MIN_Q_LEN`` new tokens take), per dtype
and (new tokens, cached context), one sequence, 32 q / 8 kv heads, head dim 128, page 16; the median ms
(``kfuse.report.time_ms``) and the largest difference between the two outputs.
Usage: ``python bench/kv_cpu_prefill.py [--threads 2]``.
"""

from __future__ import annotations

import argparse

import torch

import kfuse
from kfuse.ops import kv as kv_ops
from kfuse.report import time_ms


def row(dtype: torch.dtype, t: int, ctx: int) -> tuple[float, float, float]:
    """(C++ ms, SDPA ms, max |difference|) for t new tokens after ctx cached ones."""
    n = t + ctx
    cache = kfuse.kv.PagedKVCache(1, 8, 128, 16, (n + 15) // 16 + 2, 2, dtype, "cpu")
    sid = cache.add_sequence()
    cache.append(0, [sid], torch.randn(n, 8, 128).to(dtype), torch.randn(n, 8, 128).to(dtype), counts=[n])
    cache.advance([sid], [n])
    q = torch.randn(t, 32, 128).to(dtype)
    threshold = kv_ops._SDPA_MIN_Q_LEN
    try:
        times, outs = [], []
        for forced in (10**9, 1):  # the C++ kernel, then SDPA
            kv_ops._SDPA_MIN_Q_LEN = forced
            call = lambda: kfuse.paged_prefill_attention(q, cache, 0, [sid], [t], backend="cpu")  # noqa: E731
            outs.append(call().float())  # (also the warm-up)
            times.append(time_ms(call, torch.device("cpu"))[0])
    finally:
        kv_ops._SDPA_MIN_Q_LEN = threshold
    return times[0], times[1], float((outs[0] - outs[1]).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.bfloat16, torch.float16):  # (float32 and float64 prefills stay on the C++ kernel)
        for t, ctx in ((16, 0), (32, 0), (64, 0), (128, 0), (512, 0), (1024, 0), (64, 960), (256, 768)):
            cpp, sdpa, diff = row(dtype, t, ctx)
            print(f"{str(dtype)[6:]:9s} new {t:5d} kv {t + ctx:5d}: C++ {cpp:8.2f} ms  SDPA {sdpa:8.2f} ms  "
                  f"({cpp / sdpa:.2f}x)  max diff {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
