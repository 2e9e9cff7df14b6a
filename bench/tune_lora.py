"""Where a LoRA call's time goes on a GPU, and a sweep of the Triton forward's tile configs (issue 13).

The first H200 run (bench/results/2026-12-04-h200/) missed every LoRA target; this script says why,
case by case (bf16 x and W, K = N = 4096, r = 16):

- ``eager``: ``kfuse.lora_linear(..., backend="triton")`` back to back (``triton.testing.do_bench``:
  where the host is slower than the kernels, this is the host's time per call);
- ``launcher``: ``kfuse.triton_kernels.lora.lora_forward`` alone (no autograd, no op dispatch);
- ``graph``: the launcher replayed from a CUDA graph: the kernels' time alone;
- ``base``: ``x @ W.T`` (cuBLAS);

and the same for the multi-adapter forward (128 rows over 8 adapters);

then a ``torch.profiler`` table of a forward + backward step (the kernels' own times), and the
forward's time from a CUDA graph for each candidate ``_gemm_config`` / ``_shrink_config`` tile, and by
either forward path (split-K or S pass + GEMM) at M = 32 … 256 (the ``_SMALL_M`` crossover), and with
the GEMM's operands read by TMA against pointer loads (``_TMA``; forward, backward, then M = 4096's
tiles with TMA); first, bf16's cuBLAS path (``_CUBLAS_MIN_M``) against the fused GEMM.
Usage: ``python bench/tune_lora.py [--quick]`` (CUDA only; ~1-2 min, most of it compiling).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from triton.testing import do_bench

import kfuse
from kfuse.triton_kernels import lora as tk

K = N = 4096
R = 16

# Candidate (BM, BN, BK, GROUP_M, num_warps, num_stages) per M; the current choice is always timed first.
GEMM = {
    128: [(64, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 128, 128, 8, 4, 3),
          (32, 64, 128, 8, 4, 4), (64, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3)],
    4096: [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
           (256, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 4, 8, 3), (128, 256, 32, 8, 8, 5)],
}
# (BM, BK, num_warps, num_stages) of the S pass.
SHRINK = {128: [(16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3), (64, 128, 4, 3), (16, 64, 2, 4)],
          4096: [(32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 8, 3), (16, 128, 4, 3)]}


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up that compiles its kernels): replay()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def make(M: int, adapter_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    a = (torch.randn(R, K, device="cuda", generator=g) / K**0.5).to(adapter_dtype)
    b = torch.randn(N, R, device="cuda", generator=g).to(adapter_dtype)
    return x, w, a, b


def launcher(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Callable[[], object]:
    return lambda: tk.lora_forward(x, w, False, a, b, 2.0, None, None, None, 0.0, False)


def where_time_goes(M: int, adapter_dtype: torch.dtype) -> None:
    x, w, a, b = make(M, adapter_dtype)
    eager = do_bench(lambda: kfuse.lora_linear(x, w, a, b, 2.0, backend="triton"))
    launch = do_bench(launcher(x, w, a, b))
    graph = do_bench(graphed(launcher(x, w, a, b)))
    base = do_bench(lambda: x @ w.T)
    print(f"{M:>6} {str(adapter_dtype)[6:]:>9} {eager:8.4f} {launch:9.4f} {graph:8.4f} {base:8.4f} "
          f"{graph / base:11.3f}", flush=True)


def where_multi_goes(M: int = 128, adapters: int = 8) -> None:
    """The multi-adapter forward (the report's case: M rows spread over ``adapters`` rank-R adapters, fp32
    stacks) as eager op, launcher and CUDA-graph replay against the base GEMM: 4.70x base on the H200
    (2026-12-04, eager; target 1.3x base + one read of each adapter)."""
    x, w, _, _ = make(M, torch.float32)
    g = torch.Generator(device="cuda").manual_seed(1)
    A = torch.randn(adapters, R, K, device="cuda", generator=g) / K**0.5
    B = torch.randn(adapters, N, R, device="cuda", generator=g)
    sc = torch.full((adapters,), 2.0, device="cuda")
    rk = torch.full((adapters,), R, dtype=torch.int64, device="cuda")
    ids = (torch.arange(M, device="cuda") % adapters)[torch.randperm(M, device="cuda", generator=g)]

    def launch() -> object:
        return tk.lora_multi_forward(x, w, False, A, B, sc, rk, ids, None)

    eager = do_bench(lambda: kfuse.lora_linear_multi(x, w, A, B, sc, rk, ids, backend="triton"))
    base = do_bench(lambda: x @ w.T)
    graph = do_bench(graphed(launch))
    print(f"multi {M:>4} rows x {adapters} adapters  eager {eager:8.4f}  launcher {do_bench(launch):8.4f}  graph "
          f"{graph:8.4f}  base {base:8.4f}  graph/base {graph / base:6.3f}", flush=True)
    times = timed_with("_CUBLAS_MIN_M", (0, 1 << 30), launch)  # cuBLAS's x Wᵀ + the adapter pass, or the GEMM
    print(f"multi {M:>4} rows, graph: cuBLAS + adapter pass {times[0]:8.4f} ({times[0] / base:6.3f}x base)   "
          f"Triton GEMM {times[1]:8.4f} ({times[1] / base:6.3f}x base)   (current: "
          f"{'cuBLAS' if M >= tk._CUBLAS_MIN_M else 'Triton GEMM'})", flush=True)


def profile_step(M: int, adapter_dtype: torch.dtype) -> None:
    x, w, a, b = make(M, adapter_dtype)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()

    def step() -> None:
        kfuse.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, training=True, backend="triton").sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== profile: 5 x (forward + backward), M = {M}, {str(adapter_dtype)[6:]} adapters, dropout 0.1")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def sweep(name: str, table: dict[int, list[tuple]], current: Callable, M: int) -> None:
    """The forward from a CUDA graph with each candidate of ``tk.<name>`` at M (bf16 adapters)."""
    orig = getattr(tk, name)
    x, w, a, b = make(M, torch.bfloat16)
    base = do_bench(lambda: x @ w.T)
    now = current(M)
    for cfg in [now, *(c for c in table[M] if c != now)]:
        setattr(tk, name, lambda *args, _c=cfg: _c)
        try:
            t = do_bench(graphed(launcher(x, w, a, b)))
            print(f"{name} M={M:<6} {str(cfg):<32} {t:8.4f} ms  {t / base:6.3f}x base"
                  f"{'  (current)' if cfg == now else ''}", flush=True)
        except Exception as err:  # a config Triton cannot compile (shared memory, registers): say so, go on
            print(f"{name} M={M:<6} {str(cfg):<32} failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
        finally:
            setattr(tk, name, orig)


def timed_with(name: str, values: tuple, fn: Callable[[], object]) -> list[float]:
    """``fn`` from a CUDA graph with ``tk.<name>`` set to each of ``values`` in turn (then restored)."""
    orig, times = getattr(tk, name), []
    for v in values:
        setattr(tk, name, v)
        try:
            times.append(do_bench(graphed(fn)))
        finally:
            setattr(tk, name, orig)
    return times


def crossover() -> None:
    """The forward from a CUDA graph by either path around ``tk._SMALL_M`` (bf16 adapters): split-K (taken
    at M <= _SMALL_M) against the S pass + GEMM."""
    orig = tk._SMALL_M
    for M in (32, 64, 128, 256):
        x, w, a, b = make(M, torch.bfloat16)
        base = do_bench(lambda x=x, w=w: x @ w.T)
        times = timed_with("_SMALL_M", (M, M - 1), launcher(x, w, a, b))
        print(f"_SMALL_M M={M:<5} split-K {times[0]:8.4f} ms {times[0] / base:6.3f}x base   S pass + GEMM "
              f"{times[1]:8.4f} ms {times[1] / base:6.3f}x base   (current: {'split-K' if M <= orig else 'GEMM'})",
              flush=True)


def tma_ab() -> None:
    """The forward from a CUDA graph with the GEMM's x and W read by pointer loads (``_fwd_kernel``) and by
    TMA (``_fwd_kernel``'s TMA variant, ``tk._TMA``) at the current tiles; the backward (dx, dA, dB; fp32 adapters,
    with and without dropout) likewise, against one ``dY·W``; then M = 4096's forward tiles with TMA."""
    orig = tk._TMA
    for M in (128, 4096):
        x, w, a, b = make(M, torch.bfloat16)
        base = do_bench(lambda x=x, w=w: x @ w.T)
        times = timed_with("_TMA", (False, True), launcher(x, w, a, b))
        print(f"_TMA     M={M:<5} pointer loads {times[0]:8.4f} ms {times[0] / base:6.3f}x base   TMA "
              f"{times[1]:8.4f} ms {times[1] / base:6.3f}x base   (current: {'TMA' if orig else 'pointer loads'})",
              flush=True)
    x, w, a, b = make(4096, torch.float32)
    dy = torch.randn_like(x)
    seed = torch.tensor([1234], device="cuda")
    base = do_bench(lambda: dy @ w)
    for p in (0.0, 0.1):
        _, S = tk.lora_forward(x, w, False, a, b, 2.0, None, None, seed, p, True)
        times = timed_with("_TMA", (False, True), lambda p=p, S=S: tk.lora_backward(
            dy, x, w, False, a, b, 2.0, S, seed, p, True, True, True, False))
        print(f"_TMA     backward M=4096 dropout {p}: pointer loads {times[0]:8.4f} ms {times[0] / base:6.3f}x dY.W"
              f"   TMA {times[1]:8.4f} ms {times[1] / base:6.3f}x dY.W", flush=True)
    tk._TMA = True
    try:
        sweep("_gemm_config", GEMM, lambda M: tk._gemm_config(M, N, torch.bfloat16), 4096)
    finally:
        tk._TMA = orig


def cublas_ab(quick: bool) -> None:
    """The forward from a CUDA graph by cuBLAS's x Wᵀ + ``_fwd_update_kernel`` and by ``_fwd_kernel``'s fused GEMM
    (bf16 x and W, fp32 and bf16 adapters) against x Wᵀ alone, then the backward by cuBLAS's dy W + the low-rank
    pass and by ``_bwd_dx_kernel``'s GEMM against dy W alone: where ``tk._CUBLAS_MIN_M`` should sit (2048, from
    the H200's addmm row of 2026-12-04: the path itself not yet timed)."""
    for M in (128, 1024, 4096, 16384) if quick else (128, 256, 1024, 2048, 4096, 16384):
        for adt in (torch.float32, torch.bfloat16):
            x, w, a, b = make(M, adt)
            base = do_bench(lambda x=x, w=w: x @ w.T)
            times = timed_with("_CUBLAS_MIN_M", (0, 1 << 30), launcher(x, w, a, b))
            print(f"_CUBLAS_MIN_M M={M:<6} {str(adt)[6:]:>8} adapters: cuBLAS + update {times[0]:8.4f} ms "
                  f"{times[0] / base:6.3f}x base   fused GEMM {times[1]:8.4f} ms {times[1] / base:6.3f}x base   "
                  f"(current: {'cuBLAS' if M >= tk._CUBLAS_MIN_M else 'fused'})", flush=True)
    seed = torch.tensor([1234], device="cuda")
    for M, p in ((1024, 0.0), (4096, 0.0), (4096, 0.1), (16384, 0.0)):  # the backward (dx, dA, dB; fp32 adapters)
        x, w, a, b = make(M, torch.float32)
        dy = torch.randn_like(x)
        base = do_bench(lambda dy=dy, w=w: dy @ w)
        S = tk.lora_forward(x, w, False, a, b, 2.0, None, None, seed, p, True)[1]
        times = timed_with("_CUBLAS_MIN_M", (0, 1 << 30), lambda x=x, w=w, a=a, b=b, dy=dy, S=S, p=p: tk.lora_backward(
            dy, x, w, False, a, b, 2.0, S, seed, p, True, True, True, False))
        print(f"_CUBLAS_MIN_M backward M={M:<6} dropout {p}: cuBLAS + low-rank pass {times[0]:8.4f} ms "
              f"{times[0] / base:6.3f}x dY.W   fused {times[1]:8.4f} ms {times[1] / base:6.3f}x dY.W", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M = 128 and 4096 only, no profile of M = 128")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/tune_lora.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; kfuse {kfuse.__version__}")
    print(f"== where the forward's time goes (bf16 x, W; K = N = {K}, r = {R}; ms, median)")
    print(f"{'M':>6} {'adapters':>9} {'eager':>8} {'launcher':>9} {'graph':>8} {'base':>8} {'graph/base':>11}")
    for M in [128, 4096] if args.quick else [1, 128, 4096]:
        for adt in (torch.float32, torch.bfloat16):
            where_time_goes(M, adt)
    where_multi_goes()
    profile_step(4096, torch.float32)
    if not args.quick:
        profile_step(128, torch.float32)
    print("== cuBLAS x Wᵀ + the update pass against the fused GEMM (forward from a CUDA graph; ms, median)")
    cublas_ab(args.quick)
    tk._CUBLAS_MIN_M = 1 << 30  # what follows tunes the Triton GEMM (_fwd_kernel), at every M
    print("== tile sweeps (forward from a CUDA graph, bf16 adapters; ms, median)")
    for M in (128, 4096):
        sweep("_gemm_config", GEMM, lambda M: tk._gemm_config(M, N, torch.bfloat16), M)
        sweep("_shrink_config", SHRINK, lambda M: tk._shrink_config(M, torch.bfloat16), M)
    crossover()
    print("== the GEMM's loads: pointers or TMA (then the M = 4096 tiles with TMA)")
    tma_ab()


if __name__ == "__main__":
    main()
