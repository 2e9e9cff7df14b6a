"""Accuracy of DEU's parameter gradients near critical damping (b² − 4ac just past ±0.01), in float32.

There the roots, weights and frequency have derivatives ~1/S (S = √|b² − 4ac|) whose terms cancel in
grad_coeffs; the kernels take them on bases that stay smooth as S → 0 (csrc/deu/deu_math.h's
plan_with_jacobian and Plan::dd, 2026-12-04). Draws under- and over-damped neurons near critical
(|a| in [0.1, 1e5], D in ±[0.01, 10], c1, c2 ~ N(0, 1)), one element each at t ~ N(0, 2²) with
grad_y = 1, and prints per backend how many neurons' grad_coeffs row is outside the tests' float32
tolerance (tests/tolerances.py: 5e-5·max(1, max|row|) + 1e-4·|g|) of the float64 reference, and the
worst ratio. The float64 reference agreed with mpmath on every such neuron checked (2026-12-04).
Backends: the CPU kernels and the float32 reference; Triton under TRITON_INTERPRET=1 (slow) or on a
GPU, and the CUDA kernels on a GPU. README's "Accuracy and limits (DEU)" quotes it.
Run: ``python bench/deu_near_critical.py [--neurons 400] [--seeds 3 5 7]``.
"""

import argparse
import os

import torch

import kfuse


def draw(n: int, sign: float, g: torch.Generator) -> torch.Tensor:
    """``[≤ n, 5]`` float32 coefficients of near-critical neurons on ``sign``'s side of critical."""
    rows = []
    while len(rows) < n:
        a = float(10 ** (torch.rand(1, generator=g) * 6 - 1)) * (1 if len(rows) % 3 else -1)
        b = float(torch.randn(1, generator=g)) * abs(a) ** 0.5 * 4
        d = sign * float(10 ** (torch.rand(1, generator=g) * 3 - 2))
        c = (b * b - d) / (4 * a)
        c1, c2 = (float(v) for v in torch.randn(2, generator=g))
        row = torch.tensor([a, b, c, c1, c2]).float()
        a32, b32, c32 = (float(v) for v in row[:3])
        if min(abs(b32), abs(c32)) > 0.011 and sign * (b32 * b32 - 4 * a32 * c32) > 0.01:  # still that case
            rows.append(row)
    return torch.stack(rows)


def ratios(coeffs: torch.Tensor, t: torch.Tensor, backend: str, device: str) -> torch.Tensor:
    """Per neuron, the worst |grad_coeffs − float64|/tolerance of its row."""
    def grads(x: torch.Tensor, co: torch.Tensor, be: str) -> torch.Tensor:
        co = co.clone().requires_grad_()
        kfuse.deu(x, co, -1, backend=be).sum().backward()
        return co.grad.double().cpu()

    want = grads(t.double(), coeffs.double(), "reference")
    got = grads(t.to(device), coeffs.to(device), backend)
    tol = 5e-5 * want.abs().amax(1, keepdim=True).clamp_min(1.0) + 1e-4 * want.abs()
    return ((got - want).abs() / tol).amax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--neurons", type=int, default=400, help="neurons per draw (default 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 7], help="one draw per seed (default 3 5 7)")
    args = p.parse_args()
    backends = [("cpu", "cpu"), ("reference", "cpu")]
    if torch.cuda.is_available():
        backends += [("cuda", "cuda"), ("triton", "cuda")]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        backends.append(("triton", "cpu"))
    for sign, name in ((-1.0, "under-damped"), (1.0, "over-damped")):
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)
            coeffs = draw(args.neurons, sign, g)
            t = (torch.randn(1, len(coeffs), generator=g) * 2).float()
            for backend, device in backends:
                r = ratios(coeffs, t, backend, device)
                print(f"{name:12s} seed {seed}  {backend:9s}  {int((r > 1).sum()):3d} of {len(r)} outside the "
                      f"float32 tolerance, worst {float(r.max()):.3g}×")


if __name__ == "__main__":
    main()
