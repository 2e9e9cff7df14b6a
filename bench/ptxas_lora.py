"""Register use, spills and wgmma serialisation of the LoRA GEMM kernels as ptxas compiles them for an
H100/H200 (sm_90a), without a GPU: ``python bench/ptxas_lora.py`` (set ``PYTHONPATH`` to another
Triton to compare versions, e.g. the GPU machine's 3.6: ``pip install --target /tmp/t36 --no-deps
triton==3.6.0``).

For the forward and dx kernels at the tiles their launchers pick for M = K = N = 4096 (dx with and
without dropout, and its pass after cuBLAS's dy W; the forward's pass after cuBLAS's x Wᵀ), the decode
path's split-K kernel at M = 16, the multi-adapter forward at M = 128, and the S pass (shrink) and the
dy pass at M = 4096,
in bf16 (fp32 adapters) and fp16, it prints ptxas' registers, spill stores, any C7515
warning (wgmma serialised: the tensor-core pipeline waits on every MMA) and the LDL/STL instructions
between the first and the last HGMMA of the SASS (spills in the GEMM loop, the ones that cost), and the
IMAD.HI instructions (Philox's multiply-highs: the dropout mask's cost, counted statically). How
``_bwd_dx_kernel``'s order of work was chosen (see its docstring). Takes ~1 min on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel

from kfuse.triton_kernels import lora as lk

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_ARGS = {"p", "inv_keep", "scaling", "qk_scale"}


def compile_sm90(fn, ptrs: dict[str, str], consts: dict, warps: int, stages: int) -> CompiledKernel:
    """``fn`` compiled for sm_90 as a launch would specialise it (``.asm``: ``ttgir``, ``ptx``, ``cubin``;
    ``.metadata.shared``): unit strides of contiguous tensors (``swk``, ``sak``, ``sbr``) constant, pointers
    and integers divisible by 16, constexprs not in ``consts`` at their defaults. Also used by
    ``bench/ptxas_kv.py``."""
    defaults = {q.name: q.default for q in fn.params if q.is_constexpr and q.has_default}  # e.g. TMA=False
    consts = {**defaults, **{n: 1 for n in ("swk", "sak", "sbr") if n in fn.arg_names}, **consts}
    sig = {n: "constexpr" if n in consts else "*" + ptrs.get(n, "fp32") if n.endswith("_ptr")
           else "fp32" if n in _FLOAT_ARGS else "i32" for n in fn.arg_names}
    attrs = {(j,): [["tt.divisibility", 16]] for j, n in enumerate(fn.arg_names) if sig[n] == "i32" or sig[n][0] == "*"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                           "num_stages": stages})


def inspect(ptx: str) -> str:
    """ptxas -v's registers and spill stores, C7515, and LDL/STL between the first and last HGMMA."""
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        info = subprocess.run([os.path.join(_BIN, "ptxas"), "-v", "-arch=sm_90a", src, "-o", cubin],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    mma = [i for i, line in enumerate(sass) if "HGMMA" in line]
    in_loop = sum(bool(re.search(r"\b(LDL|STL)\b", line)) for line in sass[mma[0]:mma[-1] + 1]) if mma else 0
    serial = " C7515 (wgmma serialised)" if "C7515" in info else ""
    # Philox's rounds are multiply-highs (IMAD.HI): their static count is the dropout mask's cost.
    philox = sum("IMAD.HI" in line for line in sass)
    return (f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} B spill stores, "
            f"{in_loop} LDL/STL between HGMMAs, {philox} IMAD.HI{serial}")


def main() -> None:
    print(f"triton {triton.__version__}, sm_90a, M = K = N = 4096, r = 16")
    for dt, ad in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        st, at = _TYPES[dt], _TYPES[ad]
        prec, lr = lk._precisions(dt)
        bm, bn, bk, group, w, s = lk._gemm_config(4096, 4096, dt)
        ptx = compile_sm90(lk._fwd_kernel, {"x_ptr": st, "w_ptr": st, "b_ptr": at, "bias_ptr": st, "lbias_ptr": at,
                                            "y_ptr": st},
                           dict(BM=bm, BN=bn, BK=bk, RB=16, GROUP_M=group, HAS_BIAS=False, HAS_LBIAS=False, PREC=prec,
                                LR_PREC=lr), w, s).asm["ptx"]
        print(f"forward  {st} x, {at} adapters, {bm}x{bn}x{bk}, {w} warps: {inspect(ptx)}")
        m = 16  # the decode path (M <= _SMALL_M): split-K partials of x Wᵀ and S
        sbm, sbn, sbk, _, sw, ss = lk._gemm_config(m, 4096, dt)
        ptx = compile_sm90(lk._fwd_splitk_kernel, {"x_ptr": st, "w_ptr": st, "a_ptr": at, "seed_ptr": st},
                           dict(BM=sbm, BN=sbn, BK=sbk, RB=16, DROPOUT=False, PREC=prec, LR_PREC=lr), sw, ss).asm["ptx"]
        print(f"split-K  {st} x, {at} adapters, M {m}, {sbm}x{sbn}x{sbk}, {sw} warps: {inspect(ptx)}")
        mbm, mbn, mbk, mgroup, mw, ms = lk._multi_config(128, 4096, dt)  # the multi-adapter case's M
        for cublas in (False, True):
            ptx = compile_sm90(lk._multi_fwd_kernel, {"x_ptr": st, "w_ptr": st, "ids_ptr": "i32", "b_ptr": at,
                                                      "ranks_ptr": "i64", "bias_ptr": st, "y_ptr": st},
                               dict(BM=mbm, BN=mbn, BK=mbk, RB=16, GROUP_M=mgroup, HAS_BIAS=False, PREC=prec,
                                    LR_PREC=lr, CUBLAS=cublas), mw, ms).asm["ptx"]
            variant = ", the adapter pass after cuBLAS" if cublas else ""
            print(f"multi    {st} x, {at} adapters, M 128, {mbm}x{mbn}x{mbk}, {mw} warps{variant}: {inspect(ptx)}")
        hbm, hbk, hw, hs = lk._shrink_config(4096, dt)  # S = x Aᵀ, one read of x
        ptx = compile_sm90(lk._shrink_kernel, {"x_ptr": st, "a_ptr": at, "seed_ptr": "i64"},
                           dict(BM=hbm, BK=hbk, RB=16, DROPOUT=True, PREC=lr), hw, hs).asm["ptx"]
        print(f"shrink   {st} x, {at} adapters, {hbm}x{hbk}, {hw} warps, dropout True: {inspect(ptx)}")
        dbm, dbn, dw = lk._dy_config(4096)  # G = dy B, dB, colsum: one read of dy
        ptx = compile_sm90(lk._bwd_dy_kernel, {"dy_ptr": st, "b_ptr": at},
                           dict(BM=dbm, BN=dbn, RB=16, NEED_G=True, NEED_DB=True, NEED_CS=True, LR_PREC=lr),
                           dw, 1).asm["ptx"]
        print(f"dy pass  {st} x, {at} adapters, {dbm}x{dbn}, {dw} warps: {inspect(ptx)}")
        for drop, cublas, rb in ((False, False, 16), (True, False, 16), (False, True, 16), (True, True, 16),
                                 (False, True, 64)):
            xbm, xbk, xbn, xgroup, xw, xs = lk._dx_config(4096, 4096, dt, drop)
            ptx = compile_sm90(lk._bwd_dx_kernel, {"dy_ptr": st, "w_ptr": st, "a_ptr": at, "x_ptr": st,
                                                   "seed_ptr": "i64" if drop else st, "dx_ptr": st},
                               dict(BM=xbm, BK=xbk, BN=xbn, RB=rb, GROUP_M=xgroup, DROPOUT=drop, NEED_DX=True,
                                    NEED_DA=True, PREC=prec, LR_PREC=lr, CUBLAS=cublas), xw, xs).asm["ptx"]
            variant = f"the low-rank pass after cuBLAS (_CUBLAS_MIN_M), RB {rb}" if cublas else "GEMM"
            print(f"dx       {st} x, {at} adapters, {xbm}x{xbk}x{xbn}, {xw} warps, dropout {drop}, {variant}: "
                  f"{inspect(ptx)}")
        for rb in (16, 64):  # the forward's pass after cuBLAS's x Wᵀ (_CUBLAS_MIN_M)
            ptx = compile_sm90(lk._fwd_update_kernel, {"y_ptr": st, "b_ptr": at, "bias_ptr": st, "lbias_ptr": at},
                               dict(BM=lk._UPDATE_BM, BN=lk._UPDATE_BN, RB=rb, HAS_BIAS=True, HAS_LBIAS=True,
                                    LR_PREC=lr), 4, 1).asm["ptx"]
            print(f"update   {st} x, {at} adapters, {lk._UPDATE_BM}x{lk._UPDATE_BN}, 4 warps, RB {rb}: {inspect(ptx)}")


if __name__ == "__main__":
    main()
