"""Per-kernel GPU time of ``kfuse.deu`` forward+backward through autograd, per backend.

Shows where a fwd+bwd row of the report spends its time (the kfuse kernels, the backward's
reduction, anything autograd adds), and whether the step is host-bound: it prints the wall time
per step of a loop synchronised at its end, the host time to issue a step, and the GPU time of
its kernels, and the host time of the forward and of the backward alone (the GPU idle before
each: a time near the kernels' means something in that call waits for the GPU), beside the same
for ``torch.sigmoid`` through autograd (one elementwise kernel each way: what the host and
torch cost anyway). Usage:
``python bench/profile_deu.py [--shape 8192 4096] [--dtype bfloat16]``; ``--device cpu`` (the
default without a GPU) runs it on the CPU kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import kfuse
from kfuse import _backends
from kfuse.demos._args import positive
from kfuse.ops import deu as deu_ops
from kfuse.reference.deu import deu_init_coeffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs="+", default=[8192, 4096])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=positive(int), default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None, help="default: cuda triton on cuda, cpu on cpu")
    args = parser.parse_args()
    if args.backends is None:
        args.backends = ["cuda", "triton"] if args.device == "cuda" else ["cpu"]
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, device=dev).to(dtype).requires_grad_()
    coeffs = deu_init_coeffs(args.shape[-1]).to(dev)
    coeffs[:, 3:] = torch.randn(args.shape[-1], 2, device=dev)
    coeffs.requires_grad_()
    gy = torch.randn_like(x)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def host_times(fwd, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """Median host µs of ``fwd()`` and of its backward to ``inputs``, the device idle before each."""
        fwd_host, bwd_host = [], []
        for _ in range(21):
            sync()
            t0 = time.perf_counter()
            y = fwd()
            fwd_host.append(time.perf_counter() - t0)
            sync()
            t0 = time.perf_counter()
            torch.autograd.grad(y, inputs, gy)
            bwd_host.append(time.perf_counter() - t0)
        sync()
        return statistics.median(fwd_host[1:]) * 1e6, statistics.median(bwd_host[1:]) * 1e6

    def call_host(fn) -> float:
        """Median host µs of ``fn()``, the device idle before each."""
        times = []
        for _ in range(21):
            sync()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        sync()
        return statistics.median(times[1:]) * 1e6

    sig_fwd, sig_bwd = host_times(lambda: torch.sigmoid(x), (x,))
    print(f"== torch.sigmoid {args.dtype} {args.shape}: host time of the forward {sig_fwd:.1f} us, of the "
          f"backward {sig_bwd:.1f} us (median of 20, the device idle before each)")
    xd, cd = x.detach(), coeffs.detach()
    cd_acc = cd.to(deu_ops._acc_dtype(x))  # the extension takes coeffs in the accumulation dtype
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for backend in args.backends:
        def step(backend: str = backend) -> None:
            torch.autograd.grad(kfuse.deu(x, coeffs, backend=backend), (x, coeffs), gy)

        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host_us = (time.perf_counter() - t0) / 20 * 1e6  # issuing only (the GPU may lag)
        sync()
        wall_us = (time.perf_counter() - t0) / 20 * 1e6
        fwd_host, bwd_host = host_times(lambda backend=backend: kfuse.deu(x, coeffs, backend=backend), (x, coeffs))
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                step()
            sync()
        events = prof.key_averages()
        # Device-side events only (kernels, copies): an op's row repeats its kernels' time as its
        # own "self" device time (2026-11-26: 569.6 us per step counted for ~277 us of kernels),
        # and "Activity Buffer Request" is the profiler's own, once per profile.
        gpu_us = sum(e.self_device_time_total for e in events
                     if e.device_type == DeviceType.CUDA and e.key != "Activity Buffer Request") / args.iters
        print(f"== {backend} {args.dtype} {args.shape}: wall {wall_us:.1f} us per fwd+bwd step "
              f"(host {host_us:.1f} us to issue it), GPU kernels {gpu_us:.1f} us per step "
              f"({args.iters} profiled iterations): {'host' if host_us > gpu_us else 'GPU'}-bound; "
              f"host time of the forward {fwd_host:.1f} us, of the backward {bwd_host:.1f} us (median of "
              f"20, the device idle before each)")
        if backend != "triton":
            # Where the backward's host time goes: the extension call alone, then with the op's
            # Python around it (on 2026-11-26 the bf16 backward took ~90 us more than fp32's).
            ext_us = call_host(lambda: _backends.extension().deu_backward(gy, xd, cd_acc, x.ndim - 1))
            impl_us = call_host(lambda backend=backend: deu_ops._backward_impl(gy, xd, cd, x.ndim - 1, backend))
            print(f"== {backend} {args.dtype}: host time of the backward's extension call {ext_us:.1f} us, "
                  f"through _backward_impl {impl_us:.1f} us (median of 20, the device idle before each)")
        print(events.table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                           row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
