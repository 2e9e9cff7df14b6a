"""Median time (ms) of kfuse.deu's CPU kernels, forward and forward + backward, float32, one thread:
[4096, 1024] rows and [16, 64, 32, 32] planes, coefficients at the paper's init (~1 % r = −b/a
neurons, c in the zero band) and all r = −b/a. Prints one JSON object. For an A/B of two builds, run it
alternately against each (PYTHONPATH=<other checkout>/python for the other) and compare the medians:
bench/results/2026-12-04-cpu-deu-r-case-cost.md. Run: ``python bench/time_deu_cpu.py``.
"""

import json
import time

import torch

import kfuse
from kfuse.reference.deu import deu_init_coeffs


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = {}
    for layout, shape, dim in (("rows", (4096, 1024), -1), ("planes", (16, 64, 32, 32), 1)):
        n = shape[dim]
        for init in ("paper", "all_r"):
            co = deu_init_coeffs(n, generator=g)
            if init == "all_r":
                co[:, 2] = 0.0
                co[:, 1] = co[:, 1] * 0.5 + 0.2
            x = torch.randn(shape, generator=g)
            gy = torch.randn(shape, generator=g)
            xr, cr = x.clone().requires_grad_(), co.clone().requires_grad_()
            def fwd(x=x, co=co, dim=dim):
                kfuse.deu(x, co, dim, backend="cpu")

            def fb(xr=xr, cr=cr, gy=gy, dim=dim):
                y = kfuse.deu(xr, cr, dim, backend="cpu")
                torch.autograd.grad(y, (xr, cr), gy)
            for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                fn()
                ts = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                out[f"{layout} {init} {name}"] = ts[len(ts) // 2] * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
