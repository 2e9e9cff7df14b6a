"""Per-kernel GPU time of ``kfuse.deu`` forward+backward through autograd, per backend.

Shows where a fwd+bwd row of the report spends its time (the kfuse kernels, the backward's
reduction, anything autograd adds), and whether the step is host-bound: it prints the wall time
per step of a loop synchronised at its end, the host time to issue a step, and the GPU time of
its kernels. Usage:
``python bench/profile_deu.py [--shape 8192 4096]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kfuse
from kfuse.reference.deu import deu_init_coeffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs="+", default=[8192, 4096])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    dev = "cuda"
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, device=dev).to(dtype).requires_grad_()
    coeffs = deu_init_coeffs(args.shape[-1]).to(dev)
    coeffs[:, 3:] = torch.randn(args.shape[-1], 2, device=dev)
    coeffs.requires_grad_()
    gy = torch.randn_like(x)
    for backend in ("cuda", "triton"):
        def step(backend: str = backend) -> None:
            torch.autograd.grad(kfuse.deu(x, coeffs, backend=backend), (x, coeffs), gy)

        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host_us = (time.perf_counter() - t0) / 20 * 1e6  # issuing only (the GPU may lag)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) / 20 * 1e6
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events) / args.iters
        print(f"== {backend} {args.dtype} {args.shape}: wall {wall_us:.1f} us per fwd+bwd step "
              f"(host {host_us:.1f} us to issue it), GPU kernels {gpu_us:.1f} us per step "
              f"({args.iters} profiled iterations): {'host' if host_us > gpu_us else 'GPU'}-bound")
        print(events.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
