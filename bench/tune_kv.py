"""A sweep of the Triton KV attention kernels' block sizes on a GPU (issue 14).

The first H200 run (bench/results/2026-12-04-h200/) measured decode at 65 % of
``scaled_dot_product_attention``'s throughput (target 90 %) and prefill at 2.61x its time (target
1.3x), with first-guess tiles. This script times the attention launchers alone, replayed from a CUDA
graph (``kfuse.triton_kernels.kv.paged_decode`` / ``paged_prefill``: no host checks), on the report's
cases (bf16, 32 query / 8 KV heads, head dim 128, page 16; decode 32 x 4096 uniform and ragged,
prefill 8 x 1024), against SDPA on contiguous K/V timed the same way, for each candidate of
``SPLIT_TOKENS`` x ``BLOCK_N`` x warps x stages (decode) and ``BLOCK_M`` x ``BLOCK_N`` x warps x stages
(prefill).
The current choice is timed first; a candidate Triton cannot compile is reported and skipped.
Each row also gives its largest difference from SDPA's output, so a fast tile that computes something
else is not chosen. First, ``flash_ab`` times the triton backend's flash route for fresh prompts against the
kernel (``kfuse.ops.kv._FLASH_MIN_Q_LEN``). Usage: ``python bench/tune_kv.py`` (CUDA only; ~2 min, most of it
compiling).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench
from tune_lora import graphed

import kfuse
from kfuse.bench import kv as kb
from kfuse.report import Case, time_ms
from kfuse.triton_kernels import kv as tk

# 40 tiles in all (each compiled once, ~1 s): about 2 min on an H200 machine (estimate), inside gpu_check.sh's step.
# Decode at 65 % of SDPA with 4 key tiles per split (2026-12-04): longer splits and wider tiles (more loads
# in flight per program); prefill at 2.61x: 128-row blocks. And both with 5 stages: Triton gives the
# block-table load a stage of its own, so only from 5 stages (128-wide decode tiles: 3) do the K/V loads
# overlap the dots, where at the 3 both kernels ran every iteration waits for all copies (bench/ptxas_kv.py;
# its numbers for these tiles in bench/results/2026-12-04-ptxas-kv.md). Decode's 2 stages are left out: the
# same buffers and waits as 3 below 128-wide tiles.
DECODE = {"split": (256, 1024), "block_n": (32, 64, 128), "warps": (4, 8), "stages": (3, 5)}
PREFILL = {"block_m": (64, 128), "block_n": (32, 64), "warps": (4, 8), "stages": (3, 5)}


def _timed(label: str, run: Callable[[], torch.Tensor], want: torch.Tensor, base: float, current: bool) -> None:
    """Times ``run`` from a CUDA graph and prints its largest difference from ``want`` (SDPA's output): a
    fast tile that computes something else must not be chosen."""
    try:
        err = (run().float() - want.float()).abs().max().item()
        ms = do_bench(graphed(run))
        print(f"   {label:<40} {ms:8.4f} ms  {ms / base:6.3f}x sdpa  max err {err:.1e}"
              f"{'  (current)' if current else ''}", flush=True)
    except Exception as err:  # a tile Triton cannot compile (shared memory, registers): say so, go on
        print(f"   {label:<40} failed: {type(err).__name__}: {str(err)[:100]}", flush=True)


def sweep_decode(case: Case) -> None:
    inp = kb.make_inputs(case, 0)
    c, q = inp.cache, inp.q
    ids = torch.tensor(inp.ids, dtype=torch.int32, device=q.device)
    lens = torch.tensor(inp.lens, dtype=torch.int32, device=q.device)
    T, scale = max(inp.lens), tk.default_scale(q.shape[-1])
    mask = torch.arange(T, device=q.device) < lens[:, None]
    qs = q.unsqueeze(2)
    ragged = case.params.get("ragged", False)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qs, inp.k, inp.v, attn_mask=mask[:, None, None, :] if ragged else None,
                                              enable_gqa=True)

    want, base = sdpa().squeeze(2), do_bench(graphed(sdpa))
    print(f"== decode {tuple(case.shape)} ragged={ragged}: sdpa {base:.4f} ms", flush=True)
    g, d = q.shape[1] // c.num_kv_heads, q.shape[2]
    now = (tk.SPLIT_TOKENS, tk.BLOCK_N, *tk.decode_config(g, d)[2:])
    orig_n, orig_cfg = tk.BLOCK_N, tk.decode_config
    for split, bn, warps, stages in [now, *(x for x in itertools.product(*DECODE.values()) if x != now)]:
        if split % bn:
            continue
        tk.BLOCK_N = bn
        tk.decode_config = lambda group, head_dim, _w=warps, _s=stages: (*orig_cfg(group, head_dim)[:2], _w, _s)
        try:
            _timed(f"split={split} BLOCK_N={bn} warps={warps} stages={stages}", lambda s=split: tk.paged_decode(
                q, c.k_pages[0], c.v_pages[0], c.block_table, ids, lens, T, scale, split_tokens=s),
                want, base, (split, bn, warps, stages) == now)
        finally:
            tk.BLOCK_N, tk.decode_config = orig_n, orig_cfg


def sweep_prefill(case: Case) -> None:
    inp = kb.make_inputs(case, 0)
    c, q = inp.cache, inp.q
    B, T = len(inp.ids), max(inp.lens)
    ids = torch.tensor(inp.ids, dtype=torch.int32, device=q.device)
    lens = torch.tensor(inp.lens, dtype=torch.int32, device=q.device)
    q_lens = lens.clone()
    scale = tk.default_scale(q.shape[-1])
    qc = q.view(B, T, *q.shape[1:]).transpose(1, 2)
    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qc, inp.k, inp.v, is_causal=True, enable_gqa=True)

    want, base = sdpa().transpose(1, 2).reshape(q.shape), do_bench(graphed(sdpa))
    print(f"== prefill {tuple(case.shape)}: sdpa {base:.4f} ms", flush=True)
    g, d = q.shape[1] // c.num_kv_heads, q.shape[2]
    bm0, _, _, w0, s0 = tk.prefill_config(g, d)
    now = (bm0, tk.BLOCK_N, w0, s0)
    orig_n, orig_cfg = tk.BLOCK_N, tk.prefill_config
    for bm, bn, warps, stages in [now, *(x for x in itertools.product(*PREFILL.values()) if x != now)]:
        if bm < g:
            continue
        tk.BLOCK_N = bn
        tk.prefill_config = lambda group, head_dim, _m=bm, _w=warps, _s=stages: (
            _m, _m // group, orig_cfg(group, head_dim)[2], _w, _s)
        try:
            _timed(f"BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}", lambda: tk.paged_prefill(
                q, c.k_pages[0], c.v_pages[0], c.block_table, ids, lens, q_lens, T, scale),
                want, base, (bm, bn, warps, stages) == now)
        finally:
            tk.BLOCK_N, tk.prefill_config = orig_n, orig_cfg


# (batch, tokens) of the fresh-prompt prefills flash_ab times: the report's 8 x 1024 and around it, to set
# kfuse.ops.kv._FLASH_MIN_Q_LEN (128, a guess: not yet timed on a GPU).
FLASH_AB = ((8, 16), (8, 64), (8, 128), (8, 256), (8, 1024), (1, 1024), (8, 4096))


def flash_ab() -> None:
    """The triton backend's prefill of fresh prompts of one length: torch's flash attention over the gathered
    pages (the route, ``_prefill_flash``) against the Triton prefill kernel, beside SDPA on contiguous K/V, at
    FLASH_AB's shapes: each replayed from a CUDA graph (device time) and called eagerly back to back
    (``kfuse.report.time_ms(host_bound=True)``, the report's wall clock: the host's share too, which differs:
    the route launches ~6 kernels where the kernel path launches 1, and the bound is chosen at the short
    lengths where that shows), with its largest difference from SDPA's output."""
    print("== prefill of fresh prompts: flash over gathered pages vs the Triton kernel (ms; graph / eager)",
          flush=True)
    for B, T in FLASH_AB:
        _flash_ab_case(B, T)


def _flash_ab_case(B: int, T: int) -> None:
    from kfuse.ops import kv as kv_ops  # noqa: PLC0415

    dev = torch.device("cuda")
    inp = kb.make_inputs(kb._case(dev, torch.bfloat16, "prefill", B, T, 32, 8, 128), 0)
    c, q = inp.cache, inp.q
    ids = torch.tensor(inp.ids, dtype=torch.int32, device=q.device)
    lens = torch.tensor(inp.lens, dtype=torch.int32, device=q.device)
    scale = tk.default_scale(q.shape[-1])
    qc = q.view(B, T, *q.shape[1:]).transpose(1, 2)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qc, inp.k, inp.v, is_causal=True, enable_gqa=True)

    want = sdpa().transpose(1, 2).reshape(q.shape).float()

    def times(fn: Callable[[], torch.Tensor]) -> str:  # graph replay / eager wall clock, ms
        return f"{do_bench(graphed(fn)):8.4f} / {time_ms(fn, dev, host_bound=True)[0]:8.4f}"

    line = f"   B={B:<2} T={T:<5} sdpa {times(sdpa)}"
    for label, bound in (("flash", 1), ("kernel", 1 << 30)):
        old, kv_ops._FLASH_MIN_Q_LEN = kv_ops._FLASH_MIN_Q_LEN, bound  # read at capture and at each eager call
        try:
            def run() -> torch.Tensor:
                return kv_ops._prefill_impl(q, c.k_pages, c.v_pages, c.block_table, 0, ids, lens, lens, T, T, scale,
                                            "triton")
            err = (run().float() - want).abs().max().item()
            line += f"  {label} {times(run)} (err {err:.1e})"
        finally:
            kv_ops._FLASH_MIN_Q_LEN = old
    print(line, flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/tune_kv.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; kfuse {kfuse.__version__}")
    with torch.no_grad():
        flash_ab()  # first: it sets _FLASH_MIN_Q_LEN, and the tile sweeps after it may run out of time
        for case in kb.cases(torch.device("cuda"), quick=False):
            if case.mode == "decode":
                sweep_decode(case)
            elif case.mode == "prefill":
                sweep_prefill(case)


if __name__ == "__main__":
    main()
