"""Accuracy of DEU's ``r = −b/a`` case (c counts as zero) in float32, against float64.

The particular part ``t/b − (a/b²)(1 − E(rt))`` is ~t²/(2a) where rt is small. Formed from the terms
``−a/b²`` and ``(a/b²)·E(rt)``, its float32 relative error grew like ε·|a|/b² (the kernels until
2026-12-04: median 2.4 at |a|/b² = 1e4); every backend now takes ``E(rt) − 1`` from expm1, so it grows
like ε·|t/b| only. Prints, per |a|/b², the relative error of each backend that runs here (the CPU
kernels and the float32 reference; on a GPU also the CUDA and Triton kernels) on t in (0, 3] with
c1 = c2 = 0 (the paper's init). README's "Accuracy and limits" quotes it.
Run: ``python bench/deu_r_case.py``.
"""

import torch

import kfuse


def main() -> None:
    torch.manual_seed(0)
    backends = [("cpu", "cpu"), ("reference", "cpu")]
    if torch.cuda.is_available():
        backends += [("cuda", "cuda"), ("triton", "cuda")]
    for ratio in (1e1, 1e2, 1e3, 1e4):
        n = 256
        b = torch.empty(n).uniform_(0.2, 2.0) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        a = ratio * b * b * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        coeffs = torch.stack([a, b, torch.zeros(n), torch.zeros(n), torch.zeros(n)], 1)
        x = torch.linspace(0.05, 3, 60)[:, None].expand(-1, n).contiguous()
        exact = kfuse.deu(x.double(), coeffs.double(), backend="reference")
        inside = exact.abs() < 999  # away from the output clamp
        for backend, device in backends:
            got = kfuse.deu(x.to(device), coeffs.to(device), backend=backend).double().cpu()
            err = ((got - exact).abs() / exact.abs())[inside]
            print(f"|a|/b² = {ratio:.0e}  {backend:9s}  relative error: median {err.median():.1e}, "
                  f"90th percentile {err.quantile(0.9):.1e}")


if __name__ == "__main__":
    main()
