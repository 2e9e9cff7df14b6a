"""DEU in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

Cases: ``[B, N]`` with ``dim=-1`` and NCHW with ``dim=1``; fp32, bf16 and fp16 on CUDA, fp32 on
CPU; ``x ~ N(0, 1)``; coeffs from the paper's init (``a, b, c ~ U(0, 1)``) with
``c1, c2 ~ N(0, 1)`` so that every homogeneous term is exercised. Candidates: the kfuse
backends ``triton``, ``cuda`` and ``cpu`` (the ``reference`` backend is the eager baseline
itself), and the baselines a user would otherwise pick: the PyTorch reference run eagerly and
``torch.compile`` of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import kfuse
from kfuse.ops.deu import backend_reasons
from kfuse.reference.deu import deu_init_coeffs, deu_reference
from kfuse.report import (
    MODES,
    Candidate,
    Case,
    backend_skips,
    measured_call,
    scaled_error,
)

NAME = "deu"
#: The kfuse backends the report times, in table order.
BACKENDS = ("triton", "cuda", "cpu")

# Largest passing error (see ``error``), per mode and dtype. The fp32 reference itself is up to
# ~2e-4 off float64 in the forward (exponentials of arguments up to 14 lose relative precision).
_TOL = {
    "fwd": {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.6e-2},
    "fwd+bwd": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2},
}


@dataclass
class Inputs:
    """One case's tensors: ``x``, ``coeffs`` (fp32, ``[N, 5]``) and ``grad_y`` (fwd+bwd only)."""

    x: Tensor
    coeffs: Tensor
    grad_y: Tensor | None


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CUDA: 8192×4096 (the target) and 32×256×56×56 NCHW in fp32, bf16 and fp16, in that
    order (the targets' dtype first, should a time budget cut the run short). CPU: 4096×1024
    (the target) and 8×64×28×28 NCHW in fp32. Forward and forward+backward each. ``quick``:
    fp32 only and a smaller NCHW on CUDA; on CPU 1024×512 and a forward-only 4×32×16×16 (each
    ``torch.compile`` baseline costs ~10–30 s of compiling there)."""
    both = MODES
    if device.type == "cuda":
        dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16)
        shapes = [((8192, 4096), -1, both), ((8, 256, 28, 28) if quick else (32, 256, 56, 56), 1, both)]
    elif quick:
        dtypes, shapes = (torch.float32,), [((1024, 512), -1, both), ((4, 32, 16, 16), 1, ("fwd",))]
    else:
        dtypes, shapes = (torch.float32,), [((4096, 1024), -1, both), ((8, 64, 28, 28), 1, both)]
    return [Case(NAME, shape, dtype, mode, device, {"dim": dim})
            for dtype in dtypes for shape, dim, modes in shapes for mode in modes]


def make_inputs(case: Case, seed: int) -> Inputs:
    """Fresh ``x ~ N(0, 1)``, init coeffs with ``c1, c2 ~ N(0, 1)`` and ``grad_y ~ N(0, 1)``."""
    dim = case.params["dim"]
    gen = torch.Generator(case.device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype)
    n = case.shape[dim]
    coeffs = deu_init_coeffs(n, generator=cpu_gen)
    coeffs[:, 3:] = torch.randn(n, 2, generator=cpu_gen)
    coeffs = coeffs.to(case.device)
    grad_y = None
    if case.mode == "fwd+bwd":
        grad_y = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype)
        x.requires_grad_()
        coeffs.requires_grad_()
    return Inputs(x, coeffs, grad_y)


def _call(case: Case, inputs: Inputs, fn: Callable[..., Tensor]) -> Callable[[], Any]:
    args = (inputs.x, inputs.coeffs, case.params["dim"])
    return measured_call(case.mode, fn, args, (inputs.x, inputs.coeffs), inputs.grad_y)


def candidates(case: Case, inputs: Inputs) -> list[Candidate]:
    """``triton``, ``cuda``, ``cpu`` (skipped with the reason where they cannot run), then the
    ``eager`` and ``compile`` baselines (``torch.compile(deu_reference)``, compiled on first call)."""
    skips = backend_skips(backend_reasons(inputs.x), case.device)
    out = [
        Candidate(name, "backend", skip=skips[name]) if skips[name]
        else Candidate(name, "backend", _call(case, inputs, functools.partial(kfuse.deu, backend=name)))
        for name in BACKENDS
    ]
    compiled = torch.compile(deu_reference, dynamic=False)
    out.append(Candidate("eager", "baseline", _call(case, inputs, deu_reference)))
    out.append(Candidate("compile", "baseline", _call(case, inputs, compiled)))
    return out


def reference(case: Case, inputs: Inputs) -> Tensor | tuple[Tensor, Tensor]:
    """The float64 reference on the same inputs: ``y``, or ``(grad_x, grad_coeffs)``."""
    x = inputs.x.detach().double().requires_grad_(case.mode == "fwd+bwd")
    coeffs = inputs.coeffs.detach().double().requires_grad_(case.mode == "fwd+bwd")
    y = deu_reference(x, coeffs, case.params["dim"])
    if case.mode == "fwd":
        return y
    return torch.autograd.grad(y, (x, coeffs), inputs.grad_y.double())


def error(case: Case, result: Tensor | Sequence[Tensor], expected: Tensor | Sequence[Tensor]) -> float:
    """``max |r − r64| / max |r64|`` (error relative to the tensor's scale, as in
    tests/tolerances.py): of ``y`` for fwd, the larger over ``grad_x`` and ``grad_coeffs`` for
    fwd+bwd. Elementwise relative error is no measure here: outputs reach ±1000 through sums of
    exponentials that cancel, and the float32 reference itself is 5.6e-3 off elementwise on an
    H200 (NCHW fp32). Values the output dtype cannot hold (fp16 beyond 65504) are left out."""
    if case.mode == "fwd":
        return scaled_error(result, expected)
    return max(scaled_error(r, e) for r, e in zip(result, expected, strict=True))


def tolerance(case: Case) -> float:
    """fwd: 1e-4 fp32, 3e-3 fp16, 1.6e-2 bf16; fwd+bwd: 1e-4, 5e-3, 3e-2."""
    return _TOL[case.mode][case.dtype]


def bytes_moved(case: Case) -> int:
    """The floor: forward reads x and writes y (2 tensors); forward+backward also reads x and
    grad_y and writes grad_x (5 tensors). coeffs and grad_coeffs (``[N, 5]``) are negligible."""
    tensors = 2 if case.mode == "fwd" else 5
    return tensors * case.numel * torch.finfo(case.dtype).bits // 8


def flops(case: Case) -> None:
    """None: an elementwise, memory-bound op; it is judged by bandwidth, not FLOP/s."""
    return None
