"""How Triton pipelines the KV attention kernels for an H100/H200 (sm_90a), without a GPU:
``env -u TRITON_INTERPRET python bench/ptxas_kv.py`` (~1 min on 2 cores; ``PYTHONPATH`` another Triton
to compare versions, as for ``bench/ptxas_lora.py``).

For each decode and prefill tile that ``bench/tune_kv.py`` sweeps, and decode at 2 and 4 stages too
(bf16, 32 query / 8 KV heads, head dim 128, page 16), it prints ptxas' registers and spill stores, the
shared memory a program holds, how deep the K/V tiles are buffered in shared memory, and the
``async_wait`` counts in the TTGIR: ``num = 0`` at the top of the key loop waits for every copy in
flight (the next tile's load does not overlap this tile's dots); ``num > 0`` leaves the copies of later
tiles in flight. Why it matters: the block-table load feeds the K/V addresses and takes a pipeline stage
of its own, so Triton's default of 3 stages leaves the decode kernel's K/V single-buffered with a full
wait (see ``decode_config``).
"""

from __future__ import annotations

import itertools
import re

import triton
from ptxas_lora import compile_sm90, inspect
from tune_kv import DECODE as SWEPT_DECODE
from tune_kv import PREFILL

from kfuse.triton_kernels import kv as tk

G, D, PAGE = 4, 128, 16
_PTRS = {name: "i32" for name in ("bt_ptr", "ids_ptr", "lens_ptr", "qlens_ptr", "qstart_ptr")}
_PTRS.update({name: "bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}, po_ptr="fp32", pml_ptr="fp32")
# bench/tune_kv.py's candidates: prefill's as swept; decode's BLOCK_N x stages, with 2 and 4 stages too (to
# show where the buffers change), at 4 warps (warps do not change the buffers; nor do splits, a runtime value).
DECODE = {"block_n": SWEPT_DECODE["block_n"], "stages": tuple(sorted({2, 4, *SWEPT_DECODE["stages"]}))}


def pipelining(ttgir: str, block_n: int) -> str:
    """The K/V tiles' buffer depth and the key loops' ``async_wait`` counts, from the TTGIR."""
    depth = sorted({int(m) for m in re.findall(rf"memdesc<(\d+)x{block_n}x{D}xbf16", ttgir)})
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+)", ttgir)]
    overlap = "loads overlap the dots" if any(waits) else "every iteration waits for all copies"
    return f"K/V buffers {'/'.join(map(str, depth)) or '-'} deep, async_wait num {waits}: {overlap}"


def main() -> None:
    print(f"triton {triton.__version__}, sm_90a, bf16, G {G}, head dim {D}, page {PAGE}")
    for bn, stages in itertools.product(*DECODE.values()):
        k = compile_sm90(tk._decode_split_kernel, _PTRS, dict(G=G, D=D, PAGE=PAGE, BLOCK_G=16, BLOCK_N=bn,
                                                               BLOCK_D=D, PREC="tf32"), 4, stages)
        print(f"decode  BLOCK_N {bn:3} stages {stages}: {k.metadata.shared // 1024} KB shared, {inspect(k.asm['ptx'])}"
              f"\n        {pipelining(k.asm['ttgir'], bn)}", flush=True)
    for bm, bn, warps, stages in itertools.product(*PREFILL.values()):
        k = compile_sm90(tk._prefill_kernel, _PTRS, dict(G=G, D=D, PAGE=PAGE, BLOCK_M=bm, TOK=bm // G, BLOCK_N=bn,
                                                          BLOCK_D=D, PREC="tf32"), warps, stages)
        print(f"prefill BLOCK_M {bm:3} BLOCK_N {bn:3} warps {warps} stages {stages}: {k.metadata.shared // 1024} KB "
              f"shared, {inspect(k.asm['ptx'])}\n        {pipelining(k.asm['ttgir'], bn)}", flush=True)


if __name__ == "__main__":
    main()
