"""Where the Triton embedding forward's time goes on a GPU, and a sweep of its block sizes (issue 15).

The first H200 run (bench/results/2026-12-04-h200/) measured the forward at 4.2x the per-table
``nn.EmbeddingBag`` loop on the medical shape; this script separates the kernel from the host:

- ``op``: ``kfuse.multi_embedding_bag(..., backend="triton")`` back to back (``do_bench``; it reads the
  bad-index flag, so each call waits for its kernel); ``op async``: the same with ``check="async"``;
- ``launcher``: ``kfuse.triton_kernels.embedding.forward`` (no flag read, so the host runs ahead);
- ``kernel``: ``_fwd_kernel`` alone replayed from a CUDA graph (its metadata built once);
- ``loop``: the per-table ``F.embedding_bag`` loop, outputs concatenated (``do_bench``; the report's baseline);

then the kernel from a CUDA graph for each (BLOCK_L, BLOCK_D, num_warps), and a ``torch.profiler``
table of a training step with the fused row-wise Adagrad. Usage: ``python bench/tune_embedding.py``
(CUDA only; ~1 min, most of it compiling).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench
from tune_lora import graphed

import kfuse
from kfuse._backends import cdiv
from kfuse.bench import embedding as emb
from kfuse.report import Case
from kfuse.triton_kernels import embedding as tk


def tune_forward(case: Case) -> None:
    """The forward's op, launcher, kernel and loop times at ``case``, then the kernel's block-size sweep."""
    dev = case.device
    inp = emb.make_inputs(case, 0)
    ws, idx, off = inp.weights, inp.indices, inp.offsets
    t = len(ws)
    ft, pad = list(range(t)), [-1] * t
    B = (off.numel() - 1) // t
    meta, width, _, _ = tk._feature_meta(ws, ft, pad)
    out = torch.empty(B, width, dtype=ws[0].dtype, device=dev)
    flag = torch.full((2,), tk.NO_ERROR, dtype=torch.int32, device=dev)
    D = ws[0].shape[1]
    shape = f"{case.params['shape']} {t}x{B} D={D}"

    def kernel(bl: int, bd: int, warps: int) -> None:
        tk._fwd_kernel[(B, t, cdiv(D, bd))](
            idx, off, out, meta, out, flag, B, idx.shape[0], width, BLOCK_L=bl, BLOCK_D=bd, MEAN=False,
            HAS_PSW=False, WDT=tk._WDT[ws[0].dtype], num_warps=warps)

    ends = off[::B].tolist()  # each feature's first and last index position
    sl = [(idx[ends[f]:ends[f + 1]], off[f * B: (f + 1) * B] - ends[f]) for f in range(t)]

    def loop() -> torch.Tensor:  # concatenated, as the report's loop (the list alone skipped the output's write)
        return torch.cat([F.embedding_bag(i, ws[f], o, mode="sum") for f, (i, o) in enumerate(sl)], dim=1)

    now = (tk._FWD_BLOCK_L, tk._block_d(D), tk._FWD_WARPS)
    print(f"== {shape}: ms, median")
    print(f"   op {do_bench(lambda: kfuse.multi_embedding_bag(ws, idx, off, mode='sum', backend='triton')):.4f}"
          f"  op async {do_bench(lambda: kfuse.multi_embedding_bag(ws, idx, off, backend='triton', check='async')):.4f}"
          f"  launcher {do_bench(lambda: tk.forward(ws, idx, off, ft, pad, 0, None)):.4f}"
          f"  kernel {do_bench(graphed(lambda: kernel(*now))):.4f}  loop {do_bench(loop):.4f}",
          flush=True)
    for bl, bd, warps in itertools.product((16, 32), (32, 64, 128), (1, 2, 4, 8)):
        ms = do_bench(graphed(lambda bl=bl, bd=bd, warps=warps: kernel(bl, bd, warps)))
        print(f"   BLOCK_L={bl:<3} BLOCK_D={bd:<4} warps={warps}  {ms:.4f}"
              f"{'  (current)' if (bl, bd, warps) == now else ''}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/tune_embedding.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; kfuse {kfuse.__version__}")
    dev = torch.device("cuda")
    for case in emb.cases(dev, quick=False):
        if case.mode == "forward":
            tune_forward(case)
    case = next(c for c in emb.cases(dev, quick=False) if c.mode == "train")
    inp = emb.make_inputs(case, 0)
    m = kfuse.nn.MultiTableEmbeddingBag([tuple(w.shape) for w in inp.weights], optimizer="rowwise_adagrad",
                                        lr=0.01, device=dev, backend="triton")
    for _ in range(3):
        m(inp.indices, inp.offsets).backward(inp.grad_out)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            m(inp.indices, inp.offsets).backward(inp.grad_out)
        torch.cuda.synchronize()
    print(f"== profile: 5 training steps, {case.params['shape']} {tuple(case.shape)}, fused row-wise Adagrad")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
