"""The cpu backend's paged decode attention across query-group sizes and head dims: the C++ kernel
(``kfuse.paged_decode_attention(..., backend="cpu")``) against ``scaled_dot_product_attention`` on
contiguous K/V, the cases and candidates of ``kfuse.bench.kv`` (uniform lengths, page 16), 8 query
heads with G = Hq / Hkv in {1, 2, 4}, then 16 / 16 heads (D 64) and 32 / 8 (D 128); the median ms
(``kfuse.report.time_ms``) and the ratio.
The issue's CPU target shape is G = 4 (``python -m kfuse --ops kv``); G = 1 is multi-head attention
(Llama-1, GPT-2 style models), which takes the kernel's dot-product scores.
Usage: ``python bench/kv_cpu_decode_groups.py [--threads 1] [--batch 4] [--ctx 256]``.
"""

from __future__ import annotations

import argparse

import torch

from kfuse.bench import kv
from kfuse.report import time_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.ctx} tokens")
    for dtype in (torch.float32, torch.bfloat16):
        for hq, hkv, d in ((8, 8, 64), (8, 8, 80), (8, 8, 128), (8, 4, 64), (8, 2, 64), (16, 16, 64), (32, 8, 128)):
            case = kv._case(cpu, dtype, "decode", args.batch, args.ctx, hq, hkv, d, ragged=False)
            runs = {c.name: c.run for c in kv.candidates(case, kv.make_inputs(case, 0)) if c.run is not None}
            ms = {}
            for name in ("cpu", "sdpa"):
                runs[name]()  # warm-up
                ms[name] = time_ms(runs[name], cpu)[0]
            print(f"{str(dtype)[6:]:9s} Hq {hq:2d} Hkv {hkv:2d} D {d:3d}: cpu {ms['cpu']:.3f} ms  "
                  f"SDPA {ms['sdpa']:.3f} ms  ({ms['cpu'] / ms['sdpa']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
