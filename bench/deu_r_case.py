"""Accuracy of DEU's ``r = −b/a`` case (c counts as zero) in float32, against float64.

The particular part ``t/b − (a/b²)(1 − E(rt))`` is ~t²/(2a) where rt is small. The kernels compute it
from terms ~|a|/b², so their float32 relative error grows like ε·|a|/b²; the reference takes
``E(rt) − 1`` from expm1, so its error grows like ε·|t/b| only. Prints, per |a|/b², the relative
error of the CPU kernels and of the float32 reference on t in (0, 3] with c1 = c2 = 0 (the paper's
init). README's "Accuracy and limits" quotes it. Run: ``python bench/deu_r_case.py``.
"""

import torch

import kfuse


def main() -> None:
    torch.manual_seed(0)
    for ratio in (1e1, 1e2, 1e3, 1e4):
        n = 256
        b = torch.empty(n).uniform_(0.2, 2.0) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        a = ratio * b * b * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        coeffs = torch.stack([a, b, torch.zeros(n), torch.zeros(n), torch.zeros(n)], 1)
        x = torch.linspace(0.05, 3, 60)[:, None].expand(-1, n).contiguous()
        exact = kfuse.deu(x.double(), coeffs.double(), backend="reference")
        inside = exact.abs() < 999  # away from the output clamp
        for backend in ("cpu", "reference"):
            err = ((kfuse.deu(x, coeffs, backend=backend).double() - exact).abs() / exact.abs())[inside]
            print(f"|a|/b² = {ratio:.0e}  {backend:9s}  relative error: median {err.median():.1e}, "
                  f"90th percentile {err.quantile(0.9):.1e}")


if __name__ == "__main__":
    main()
