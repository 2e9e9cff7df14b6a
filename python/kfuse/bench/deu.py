"""DEU in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

Cases: ``[B, N]`` with ``dim=-1`` and NCHW with ``dim=1`` (also channels-last); fp32, bf16 and fp16
on CUDA, fp32 on CPU; ``x ~ N(0, 1)``; coeffs from the paper's init (``a, b, c ~ U(0, 1)``) with
``c1, c2 ~ N(0, 1)`` so that every homogeneous term is exercised. Candidates: the kfuse
backends ``triton``, ``cuda`` and ``cpu`` (the ``reference`` backend is the eager baseline
itself), and the baselines a user would otherwise pick: the PyTorch reference run eagerly,
``torch.compile`` of it, and ``torch.compile`` of :func:`deu_planned`, the same function written
for speed in PyTorch (the strongest of the three).
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
from kfuse.reference.deu import (
    CASE_NAMES,
    EPS,
    EXP_CAP,
    OUT_CLAMP,
    STEP_SLOPE,
    capped_exp,
    clamp_output,
    deu_cases,
    deu_init_coeffs,
    deu_reference,
)
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
    """CUDA: 8192×4096 (the target) in fp32, bf16 and fp16, then 32×256×56×56 NCHW in the same
    dtypes, then that shape channels-last in fp32 (the targets first, should a time budget cut
    the run short). CPU: 4096×1024 (the target) and 8×64×28×28 NCHW in fp32, contiguous and
    channels-last, then 4096×1024 in bf16 and fp16. Forward and forward+backward each. ``quick``:
    fp32 only, a smaller NCHW on CUDA and no channels-last; on CPU 1024×512 and a forward-only
    4×32×16×16 (each ``torch.compile`` baseline costs ~10–30 s of compiling there)."""
    both, cl = MODES, {"layout": "channels_last"}
    f32 = (torch.float32,)
    if device.type == "cuda":
        dtypes = f32 if quick else (torch.float32, torch.bfloat16, torch.float16)
        nchw = (8, 256, 28, 28) if quick else (32, 256, 56, 56)
        shapes = [((8192, 4096), -1, both, {}, dtypes), (nchw, 1, both, {}, dtypes)]
        shapes += [] if quick else [(nchw, 1, both, cl, f32)]
    elif quick:
        shapes = [((1024, 512), -1, both, {}, f32), ((4, 32, 16, 16), 1, ("fwd",), {}, f32)]
    else:
        nchw = (8, 64, 28, 28)
        shapes = [((4096, 1024), -1, both, {}, f32), (nchw, 1, both, {}, f32), (nchw, 1, both, cl, f32),
                  ((4096, 1024), -1, both, {}, (torch.bfloat16, torch.float16))]
    return [Case(NAME, shape, dtype, mode, device, {"dim": dim, **extra})
            for shape, dim, modes, extra, dtypes in shapes for dtype in dtypes for mode in modes]


def make_inputs(case: Case, seed: int) -> Inputs:
    """Fresh ``x ~ N(0, 1)``, init coeffs with ``c1, c2 ~ N(0, 1)`` and ``grad_y ~ N(0, 1)``,
    ``grad_y`` zero where ``y`` is within 1e-4 of a kink (:func:`near_kink`; ~4 elements in 10⁶)."""
    dim = case.params["dim"]
    gen = torch.Generator(case.device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if case.params.get("layout") == "channels_last" else torch.contiguous_format
    x = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype, memory_format=layout)
    n = case.shape[dim]
    coeffs = deu_init_coeffs(n, generator=cpu_gen)
    coeffs[:, 3:] = torch.randn(n, 2, generator=cpu_gen)
    coeffs = coeffs.to(case.device)
    grad_y = None
    if case.mode == "fwd+bwd":
        grad_y = torch.randn(case.shape, generator=gen, device=case.device).to(case.dtype, memory_format=layout)
        grad_y.masked_fill_(near_kink(x, coeffs, dim), 0)  # no gradient check at kinks (see there)
        x.requires_grad_()
        coeffs.requires_grad_()
    return Inputs(x, coeffs, grad_y)


def deu_plan(coeffs: Tensor, dtype: torch.dtype) -> Tensor:
    """Each neuron's template coefficients, ``[19, N]`` in ``dtype``: ``hom[8], part[8], ρ1, ω, ρ2``
    of ``y = Σ_j (hom_j + H·part_j)·B_j(t)`` with ``B = [1, t, t², σ(100t), E1·cos ωt,
    t·E1·cos ωt, E1·sin ωt, E2]``, ``E1 = E(ρ1 t)``, ``E2 = E(ρ2 t)``: make_plan of
    csrc/deu/deu_math.h, in PyTorch (differentiable)."""
    a, b, c, c1, c2 = coeffs.to(dtype).unbind(1)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    ids = deu_cases(coeffs.to(dtype))
    case = dict(zip(("identity", "step", "ramp", "first", "parabola", "osc", "hyp", "nnz", "under", "over",
                     "crit"), (ids == i for i in range(len(CASE_NAMES))), strict=True))
    za, zb, zc = a.abs() < EPS, b.abs() < EPS, c.abs() < EPS
    # Safe denominators and square roots, as in the reference: every case's values are computed for
    # every neuron and selected, so the unselected ones must stay finite (NaN would poison autograd).
    A, B, C = torch.where(za, one, a), torch.where(zb, one, b), torch.where(zc, one, c)
    w = torch.sqrt(torch.where(case["osc"], C / A, one))
    kp = torch.sign(A) * torch.sqrt(torch.where(case["hyp"], -C / A, one))
    dd = torch.sqrt(torch.where(case["under"], 4 * A * C - B * B, one))
    s = torch.sqrt(torch.where(case["over"], b * b - 4 * a * c, one))
    alpha, inv_c = -B / (2 * A), 1 / C

    def pick(**per_case: Tensor) -> Tensor:  # the value of the neuron's case (0 if not listed)
        out = zero
        for name, value in per_case.items():
            out = torch.where(case[name], value, out)
        return out

    hom = [
        pick(ramp=c1, parabola=c2, nnz=c2),
        pick(identity=one, parabola=c1),
        zero,
        pick(step=inv_c),
        pick(first=c1, osc=c1, hyp=c1, nnz=-(A * c1 / B), under=c1, over=c2, crit=c2),
        pick(crit=c1),
        pick(osc=torch.sign(A) * c2, under=c2),
        pick(hyp=c2, over=c1),
    ]
    part = [
        pick(first=inv_c, osc=inv_c, hyp=inv_c, nnz=-(A / (B * B)), under=inv_c, over=inv_c, crit=inv_c),
        pick(ramp=1 / B, nnz=1 / B),
        pick(parabola=1 / (2 * A)),
        zero,
        pick(first=-inv_c, osc=-inv_c, hyp=-inv_c / 2, nnz=A / (B * B), under=-inv_c,
             over=-(B + s) / (2 * s * C), crit=-inv_c),
        pick(crit=alpha / C),
        pick(under=-(B / (dd * C))),
        pick(hyp=-inv_c / 2, over=-(s - B) / (2 * s * C)),
    ]
    rho1 = pick(first=-(C / B), hyp=-kp, nnz=-(B / A), under=alpha, over=(s - B) / (2 * A), crit=alpha)
    omega = pick(osc=w, under=dd / (2 * A))
    rho2 = pick(hyp=kp, over=-(B + s) / (2 * A))
    return torch.stack([*hom, *part, rho1, omega, rho2])


def deu_template(x: Tensor, plan: Tensor, dim: int = -1) -> Tensor:
    """``y`` of every element from its neuron's template coefficients (``plan``: :func:`deu_plan`,
    in x's compute dtype): two exponentials, a sincos and a sigmoid per element."""
    y, _, _ = _template(x.to(plan.dtype), plan, dim)
    return clamp_output(y).to(x.dtype)


def _template(t: Tensor, plan: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``y`` before the output clamp, and the two exponents' arguments before the cap (where y
    has its kinks)."""
    shape = [1] * t.ndim
    shape[dim] = -1
    p = plan.reshape(19, *shape)
    H = (t > 0).to(plan.dtype)
    k = [p[j] + H * p[8 + j] for j in range(8)]
    arg1, arg2 = p[16] * t, p[18] * t
    e1, e2 = capped_exp(arg1), capped_exp(arg2)
    wt = p[17] * t
    y = (k[0] + t * (k[1] + t * k[2]) + k[3] * torch.sigmoid(STEP_SLOPE * t)
         + e1 * ((k[4] + k[5] * t) * torch.cos(wt) + k[6] * torch.sin(wt)) + k[7] * e2)
    return y, arg1, arg2


def near_kink(x: Tensor, coeffs: Tensor, dim: int = -1, rel: float = 1e-4) -> Tensor:
    """Where ``y`` is within ``rel`` (relative) of a kink: the output clamp (``|y| = OUT_CLAMP``)
    or an exponent's cap (argument ``= EXP_CAP``), in float64. Bool, ``x``'s shape.

    The gradient jumps there (to 0 past the clamp or cap), and a float32 result may land on either
    side: ``y = 999 + (1 + 2⁻²⁰)`` is ``1000`` in float32 (on the clamp's closed interval,
    gradient 1) and past it in float64 (gradient 0). The report's gradient check leaves these elements out
    (:func:`make_inputs`). On an H200 (2026-11-26, 32×256×56×56 channels-last) cuda, triton and
    both compiled baselines were 1.3e-3 off (tolerance 1e-4), all by the same amount to 7 digits,
    eager not: the signature of one element on the two sides of a kink (not yet rerun there).
    """
    y, arg1, arg2 = _template(x.detach().double(), deu_plan(coeffs.detach().double(), torch.float64), dim)
    at_cap = ((arg1 - EXP_CAP).abs() <= rel * EXP_CAP) | ((arg2 - EXP_CAP).abs() <= rel * EXP_CAP)
    return at_cap | ((y.abs() - OUT_CLAMP).abs() <= rel * OUT_CLAMP)


def deu_planned(x: Tensor, coeffs: Tensor, dim: int = -1) -> Tensor:
    """DEU in plain PyTorch as a performance-minded user would write it: a baseline.

    The reference (:func:`kfuse.reference.deu.deu_reference`) evaluates all eleven cases on every
    element and selects one, ~20 transcendentals per element: ``torch.compile`` of it is a weak
    baseline. Here each neuron's case logic runs once, on ``[N]`` tensors (:func:`deu_plan`), and
    the elementwise part is one generic template (:func:`deu_template`), as in the kfuse kernels
    and the spec's advice. Same function and, through autograd, same gradients as the reference
    (tests/test_deu.py checks both in float64). ``torch.compile`` of it, 4096×1024 fp32 on the
    2-core CPU: forward 9.8 ms, forward+backward 57 ms (of the reference: 112 and 780 ms). The
    plan is stacked into one ``[19, N]`` tensor on purpose: built from separate ``[N]`` tensors,
    Inductor inlined it into the elementwise kernel and recomputed it per element (71 ms forward).

    Args / returns: as :func:`kfuse.reference.deu.deu_reference`.
    """
    return deu_template(x, deu_plan(coeffs, torch.float64 if x.dtype == torch.float64 else torch.float32), dim)


def _call(case: Case, inputs: Inputs, fn: Callable[..., Tensor]) -> Callable[[], Any]:
    args = (inputs.x, inputs.coeffs, case.params["dim"])
    return measured_call(case.mode, fn, args, (inputs.x, inputs.coeffs), inputs.grad_y)


def candidates(case: Case, inputs: Inputs) -> list[Candidate]:
    """``triton``, ``cuda``, ``cpu`` (skipped with the reason where they cannot run), then the
    baselines: ``eager`` (the reference), ``compile`` (``torch.compile`` of it) and ``planned``
    (``torch.compile`` of :func:`deu_planned`, the strong one); compiled on first call."""
    skips = backend_skips(backend_reasons(inputs.x), case.device)
    out = [
        Candidate(name, "backend", skip=skips[name]) if skips[name]
        else Candidate(name, "backend", _call(case, inputs, functools.partial(kfuse.deu, backend=name)))
        for name in BACKENDS
    ]
    out.append(Candidate("eager", "baseline", _call(case, inputs, deu_reference)))
    out.append(Candidate("compile", "baseline", _call(case, inputs, torch.compile(deu_reference, dynamic=False))))
    out.append(Candidate("planned", "baseline", _call(case, inputs, torch.compile(deu_planned, dynamic=False))))
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
