"""Pure-PyTorch reference for DEU activations: the definition of the op.

Each neuron ``n`` has parameters ``(a, b, c, c1, c2) = coeffs[n]`` and its activation
``y = f(t)`` is the closed-form solution of ``a·y'' + b·y' + c·y = H(t)`` with
``H(t) = 1 if t > 0 else 0`` (Torkamani et al., AAAI 2020). The eleven cases below are
written one per branch, for clarity, and are the ground truth every backend is tested
against. Gradients are autograd's through this function (computed in float64 in tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: A parameter counts as zero when ``|p| < EPS``.
EPS = 0.01
#: Every exponential is ``E(z) = exp(min(z, EXP_CAP))``.
EXP_CAP = 14.0
#: The output is clamped to ``[-OUT_CLAMP, OUT_CLAMP]``.
OUT_CLAMP = 1000.0
#: Slope of the smooth step used when only ``c`` is non-zero: ``sigmoid(STEP_SLOPE·t)/c``.
STEP_SLOPE = 100.0

#: Case names in the order of ``deu_cases`` ids (used by tests and the report).
CASE_NAMES = (
    "identity", "smooth_step", "ramp", "first_order", "parabola", "oscillator",
    "hyperbolic", "nnz", "underdamped", "overdamped", "critical",
)


def capped_exp(z: Tensor) -> Tensor:
    """``E(z) = exp(min(z, EXP_CAP))``; its derivative is 0 only past the cap (``z > EXP_CAP``).

    Written with ``where``, not ``torch.clamp``: clamp's gradient at the bound itself changed
    between torch 2.11 (passes) and 2.14 (0), and the spec's closed interval is what the kernels do.
    NaN stays NaN."""
    return torch.exp(torch.where(z > EXP_CAP, EXP_CAP, z))


def capped_expm1(z: Tensor) -> Tensor:
    """``E(z) − 1``, as ``expm1(min(z, EXP_CAP))``: exact near ``z = 0``, where ``E(z) − 1`` cancels."""
    return torch.expm1(torch.where(z > EXP_CAP, EXP_CAP, z))


#: Taylor coefficients 1/(2n+1)!, n = 9 down to 1, of (sinh(x)/x − 1)/x² in z = x².
_SINHC_COEFFS = tuple(1.0 / math.factorial(2 * n + 1) for n in range(9, 0, -1))
#: Taylor coefficients −(k − 1)/k!, k = 20 down to 2, of (expm1(z) − z·e^z)/z².
_XEXP_COEFFS = tuple(-(k - 1) / math.factorial(k) for k in range(20, 1, -1))


def _horner(z: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    s = torch.zeros_like(z)
    for k in coeffs:
        s = s * z + k
    return s


def sinhc_m1(z: Tensor) -> Tensor:
    """``sinh(x)/x − 1`` at ``z = x²`` (``sin(x)/x − 1`` at ``z = −x²``) by its Taylor series, for
    ``|z| <= 1``, where the first term left out, ``1/21!``, is below 2e-20: a polynomial, so autograd's
    derivative has none of the cancellation of ``cosh(x)/x − sinh(x)/x²`` for small x."""
    return z * _horner(z, _SINHC_COEFFS)


def expm1_minus_xexp(z: Tensor) -> Tensor:
    """``E(z) − 1 − z·E(z)`` (``−z²/2 − z³/3 − ...``): by its Taylor series for ``|z| < 1``, where the
    difference cancels (the first term left out is below 1e-18 of the sum), directly elsewhere."""
    small = z.abs() < 1
    zs = torch.where(small, z, 0)
    return torch.where(small, zs * zs * _horner(zs, _XEXP_COEFFS), capped_expm1(z) - z * capped_exp(z))


def clamp_output(y: Tensor) -> Tensor:
    """``y`` clamped to ``[-OUT_CLAMP, OUT_CLAMP]``; the derivative is 0 only outside the closed
    interval (see :func:`capped_exp` for why not ``torch.clamp``). NaN stays NaN."""
    return torch.where(y > OUT_CLAMP, OUT_CLAMP, torch.where(y < -OUT_CLAMP, -OUT_CLAMP, y))


def _neuron_view(coeffs: Tensor, x: Tensor, dim: int) -> list[Tensor]:
    shape = [1] * x.ndim
    shape[dim] = -1
    return [coeffs[:, k].reshape(shape) for k in range(5)]


def _case_masks(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """``(za, zb, zc, d)``: which of a, b, c count as zero, and ``D = b² − 4ac``.

    Decided on the exact parameter values, in float64 whatever their dtype: in float32 the
    threshold itself would round (``float32(0.01) < 0.01``, so ``a = 0.01`` stored in float32 is
    zero, while ``|a| < float32(0.01)`` says it is not) and ``D`` would round near ``±EPS``.
    (MPS has no float64; it compares in float32.)
    """
    exact = torch.float32 if a.device.type == "mps" else torch.float64
    a, b, c = (v.detach().to(exact) for v in (a, b, c))
    return a.abs() < EPS, b.abs() < EPS, c.abs() < EPS, b * b - 4 * a * c


def range_scale(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``σ = 2^-k`` per neuron bringing ``max(|a|, |b|, |c|)`` below ``2^60`` (1 if it is below
    already, or not finite), detached, in their dtype. See ``deu_reference``'s Range comment."""
    m = torch.maximum(a.detach().abs(), torch.maximum(b.detach().abs(), c.detach().abs()))
    e = torch.frexp(m).exponent  # m = f·2^e, f in [0.5, 1)
    k = torch.where(torch.isfinite(m) & (e > 60), 60 - e, 0)
    return torch.ldexp(torch.ones_like(m), k)


def deu_cases(coeffs: Tensor) -> Tensor:
    """Case id per neuron (index into ``CASE_NAMES``).

    Args:
        coeffs: ``[N, 5]`` floating, one row ``(a, b, c, c1, c2)`` per neuron.
    Returns:
        ``[N]`` int64.
    """
    a, b, c = coeffs[:, 0], coeffs[:, 1], coeffs[:, 2]
    za, zb, zc, d = _case_masks(a, b, c)
    ids = torch.full_like(a, -1, dtype=torch.int64)
    table = [
        za & zb & zc,
        za & zb & ~zc,
        za & ~zb & zc,
        za & ~zb & ~zc,
        ~za & zb & zc,
        ~za & zb & ~zc & (a * c > 0),
        ~za & zb & ~zc & (a * c < 0),
        ~za & ~zb & zc,
        ~za & ~zb & ~zc & (d < -EPS),
        ~za & ~zb & ~zc & (d > EPS),
        ~za & ~zb & ~zc & (d.abs() <= EPS),
    ]
    for i, m in enumerate(table):
        ids = torch.where(m, i, ids)
    return ids


def deu_reference(x: Tensor, coeffs: Tensor, dim: int = -1) -> Tensor:
    """DEU activation, reference implementation.

    Args:
        x: any shape, floating; the neuron axis is ``dim``.
        coeffs: ``[x.shape[dim], 5]`` floating, one row ``(a, b, c, c1, c2)`` per neuron.
        dim: the neuron axis (``-1`` for ``[..., N]``, ``1`` for NCHW).
    Returns:
        ``y`` with the shape and dtype of ``x``. Computed in float64 when ``x`` is float64,
        else in float32.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = x.to(compute)
    a, b, c, c1, c2 = _neuron_view(coeffs.to(compute), t, dim)
    one = torch.ones((), dtype=compute, device=x.device)
    za, zb, zc, d = _case_masks(a, b, c)
    nnn = ~za & ~zb & ~zc
    under, over = nnn & (d < -EPS), nnn & (d > EPS)
    osc = ~za & zb & ~zc & (a * c > 0)
    hyp = ~za & zb & ~zc & (a * c < 0)
    # Range: b², 4ac and products such as S·c overflow float32 for |a|, |b| or |c| past ~1e19,
    # where the function is finite. So the cases below solve the equation scaled by σ = 2^-k
    # (exact; 1 unless the largest of |a|, |b|, |c| is 2^60 or more), σ(a y'' + b y' + c y) = σ·H:
    # the same solution, with roots and homogeneous parts from ratios of a, b, c and the forcing
    # σ·H. The case is decided on the unscaled values, above.
    sig = range_scale(a, b, c)
    a, b, c = a * sig, b * sig, c * sig
    # Safe denominators: every branch is evaluated everywhere, so keep the unselected ones
    # finite (a NaN there would poison autograd through torch.where).
    A, B, C = torch.where(za, one, a), torch.where(zb, one, b), torch.where(zc, one, c)
    H = (t > 0).to(compute) * sig
    # D = b² − 4ac (of the scaled a, b, c): its value from _case_masks' float64 (in float32 it
    # cancels for large a, c: a = 1000, b = 1897.3666, c = 900 has D = −0.072 but gave NaN), its
    # gradient from autograd. Its square roots take their values from float64 too (D·σ² may be
    # subnormal in float32).
    sig64 = sig.to(torch.float64)
    disc = B * B - 4 * A * C
    disc = disc + ((d * sig64.square()).to(compute) - disc).detach()

    def sqrt_disc(mask: Tensor, sign: float) -> Tensor:
        r = torch.sqrt(torch.where(mask, sign * disc, one))
        exact = torch.where(mask, torch.sqrt(sign * d) * sig64, 1.0).to(compute)
        return r + (exact - r).detach()

    y_step = sig * torch.sigmoid(STEP_SLOPE * t) / C
    # The cases that divide by b alone (ramp, first order, r = -b/a) take b only where a or c
    # counts as zero: elsewhere b may be ~1e-21 of a and c (scaled), and their overflow in an
    # unselected branch made autograd's gradient NaN through torch.where.
    Bd = torch.where(za | zc, B, one)
    y_ramp = c1 + H * t / Bd
    k = C / Bd
    # 1 − E as −(E − 1) from expm1, here and in the hyperbolic and over-damped cases: with E rounded,
    # autograd's ∂/∂c of H·(1 − E)/c cancels (float64 gave 6× the exact grad c at a = 1, b = 1e20,
    # c = 1, whose slow root −1e-20 has E = 1; the kernels, on expm1, matched mpmath).
    y_first = c1 * capped_exp(-k * t) - H * capped_expm1(-k * t) / C
    y_parab = c1 * t + c2 + H * t * t / (2 * A)

    w = torch.sqrt(torch.where(osc, C / A, one))
    wp = torch.sign(A) * w
    y_osc = c1 * torch.cos(wp * t) + c2 * torch.sin(wp * t) + H * (1 - torch.cos(w * t)) / C

    kh = torch.sqrt(torch.where(hyp, -C / A, one))
    kp = torch.sign(A) * kh
    cosh_m1 = (capped_expm1(kh * t) + capped_expm1(-kh * t)) / 2  # cosh − 1, capped
    y_hyp = c1 * capped_exp(-kp * t) + c2 * capped_exp(kp * t) - H * cosh_m1 / C

    r = -Bd / A
    # 1 − E(rt) as −(E(rt) − 1), from expm1: with e^(rt) rounded, (a/b²)(1 − E(rt)) erred by ε·|a|/b²
    # (float64: a = 1e20, b = 8.85 gave c2 + t/b for c2 + t²/(2a)); from expm1, by ε·|t/b| (bug hunt).
    y_nnz = c2 - (A * c1 / Bd) * capped_exp(r * t) + H * (t / Bd + (A / (Bd * Bd)) * capped_expm1(r * t))

    alpha = -B / (2 * A)
    dd = sqrt_disc(under, -1.0)
    om = dd / (2 * A)
    ea = capped_exp(alpha * t)
    # (b/Dd)·sin(ωt) = −αt·sin(ωt)/(ωt): near critical b/Dd is large and autograd's ∂/∂c of the
    # former is b·t/Dd²·(cos ωt − sin(ωt)/(ωt)), a difference that cancels for small ωt (float64:
    # grad c −1.0617e-10 for −1.0392e-10 at a = 2e6, b = 2000, c = 0.5000006, t = 0.3, 2, 10;
    # mpmath; 5e4× the tolerance in the sweep below). So below |ωt| = 1 the part is written with
    # the latter, as 1 − E·cos ωt + αt·E·sinc = E·(2·sin²(ωt/2) + αt·(sinc − 1)) − (E − 1 − αt·E),
    # both from series (its terms ~(αt)², (ωt)², not 1 or αt: see y_first); as before above it.
    th = om * t
    small = th.abs() < 1
    th_s, at_s = torch.where(small, th, 0), torch.where(small, alpha * t, 0)  # finite where unselected
    part_small = ea * (2 * torch.sin(th_s / 2).square() + at_s * sinhc_m1(-th_s * th_s)) - expm1_minus_xexp(at_s)
    part = torch.where(small, part_small, 1 - ea * (torch.cos(th) + (B / dd) * torch.sin(th)))
    y_under = ea * (c1 * torch.cos(th) + c2 * torch.sin(th)) + H * part / C

    # Roots r1,2 = (-b ± s)/(2a), weights w1,2 = (b ± s)/(2s) of y = c2·e1 + c1·e2 + H·(1 - w1·e1
    # - w2·e2)/c. Written so, one root and one weight cancel when |b| >> sqrt|ac| (float32: y
    # 0.735 instead of 0.272 at t = 500 for a = 0.0101, b = 1000, c = 1). With q = -(b + sign(b)·s)/2
    # (no cancellation) they are q/a and c/q, |q|/s and -ac/(|q|·s); b's sign says which is which.
    # w1 + w2 = 1, so 1 - w1·e1 - w2·e2 = -(w1·(e1 - 1) + w2·(e2 - 1)), from expm1 (see y_first).
    s = sqrt_disc(over, 1.0)
    bpos = B >= 0
    q = -(B + torch.where(bpos, s, -s)) / 2  # |q| >= s/2 > 0, also where unselected
    fast, slow = q / A, C / q
    w_fast, w_slow = q.abs() / s, -(A * C) / (q.abs() * s)
    r1, w1 = torch.where(bpos, slow, fast), torch.where(bpos, w_fast, w_slow)  # r1 = (-b + s)/(2a)
    r2, w2 = torch.where(bpos, fast, slow), torch.where(bpos, w_slow, w_fast)
    e1, e2 = capped_exp(r1 * t), capped_exp(r2 * t)
    part = w1 * capped_expm1(r1 * t) + w2 * capped_expm1(r2 * t)
    # Near critical the weights ~±b/(2s) are large and the roots' ∂/∂c = ∓1/s: autograd's grad c
    # of that sum took terms ~|ab|/s³ that cancel (float64: −1.36e-2 for −4.3e-18 at a = 9.9e9,
    # b = 2e4, c = 0.0101, t = 0.3, 2, 10; mpmath), and w1' + w2' = 0, rounded, left grad a, b, c
    # ε·|w'| off where E1, E2 vanish. So where |b| > 1.5·s, with m = (r1 + r2)t/2 = αt and
    # δ = (r1 − r2)t/2 = st/(2a): for |δ| < 1 (neither exponent capped) the sum is written as
    # e^m·cosh δ − 1 − m·e^m·sinh(δ)/δ = (E(m) − 1 − m·E(m)) + e^m·(2·sinh²(δ/2) − m·(sinh(δ)/δ − 1)),
    # bounded as s → 0, from series (its terms ~m², δ² cancel by at most b²/(b² − s²) = 1.8); for
    # |δ| >= 1 with both exponents negative, as (E1 + E2)/2 − 1 + (b/(2s))·(E1 − E2) (E1/E2 =
    # e^(±2δ): no cancellation, and w1' = −w2' exactly). Towards |b| = s (roots of opposite signs,
    # or one slow root) those terms cancel instead, and the q form above holds. Targeted sweep
    # (|b|/s 1.1-30, D = ±(0.0100001-10), a, b, c over 1e-2-1e7, t in −1.3-100; mpmath): float64
    # grad c 2e-4 of the tolerance (was 3e10×), float32 0.7× (was 2e8×; 1.6× at |b| > 2·s, 9.8× at 4·s).
    delta = s * t / (2 * A)
    near = over & (B.abs() > 1.5 * s)
    tiny = near & (delta.abs() < 1) & (r1 * t <= EXP_CAP) & (r2 * t <= EXP_CAP)
    far = near & (delta.abs() >= 1) & (alpha * t < 0)
    m_n, d_n = torch.where(tiny, alpha * t, 0), torch.where(tiny, delta, 0)  # e^m finite where unselected
    part_tiny = expm1_minus_xexp(m_n) + torch.exp(m_n) * (2 * torch.sinh(d_n / 2).square() - m_n * sinhc_m1(d_n * d_n))
    part_far = (e1 + e2) / 2 - 1 + (B / (2 * s)) * (e1 - e2)
    part = torch.where(tiny, part_tiny, torch.where(far, part_far, part))
    y_over = c2 * e1 + c1 * e2 - H * part / C

    rc = -B / (2 * A)
    ec = capped_exp(rc * t)
    # The forcing part at t > 0 only (H is 0 elsewhere): at t = −1e34 its (1 − rc·t)·E overflowed float32 to
    # inf, and 0·inf gave NaN for a finite x (DEU hunt, 2026-12-05). With t_pos, 1 − 1·1 = 0 there.
    t_pos = torch.where(t > 0, t, 0)
    y_crit = (c1 * t + c2) * ec + H * (1 - (1 - rc * t_pos) * capped_exp(rc * t_pos)) / C

    y = torch.where(
        za,
        torch.where(zb, torch.where(zc, t, y_step), torch.where(zc, y_ramp, y_first)),
        torch.where(
            zb,
            torch.where(zc, y_parab, torch.where(osc, y_osc, y_hyp)),
            torch.where(zc, y_nnz, torch.where(under, y_under, torch.where(over, y_over, y_crit))),
        ),
    )
    # A NaN or infinite a, b or c: NaN for the whole neuron. (Most cases give NaN by themselves;
    # this makes it the rule, rather than a property of how each branch is written.)
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c)
    y = torch.where(finite, y, torch.nan)
    return clamp_output(y).to(x.dtype)


def deu_init_coeffs(num_features: int, generator: torch.Generator | None = None) -> Tensor:
    """The paper's initialisation: ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``. Returns ``[N, 5]`` fp32."""
    dev = None if generator is None else generator.device  # float32 whatever the default dtype (bug hunt)
    coeffs = torch.zeros(num_features, 5, dtype=torch.float32, device=dev)
    coeffs[:, :3] = torch.rand(num_features, 3, generator=generator, dtype=torch.float32, device=dev)
    return coeffs


#: Ridge of the gravitation gradient's 2×2 least-squares fit of ``(c̃1, c̃2)`` (official code).
GRAVITATION_RIDGE = 1e-9
#: Step of the forward finite difference giving the neighbour's basis slopes (official code).
GRAVITATION_DT = 1e-3


def deu_gravitation_grad(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int, grad_coeffs: Tensor) -> Tensor:
    """``grad_coeffs`` with the official code's "gravitation" gradient for near-zero a, b, c.

    With the exact gradient a parameter inside the zero band (``|p| < EPS``) gets gradient 0
    wherever the degenerate closed form does not depend on it (``a`` and ``c`` of a ramp, ``b``
    and ``c`` of a parabola), so it can never leave the band. The official training code
    (``get_adjusted_derivative`` / ``adjust_initial_cond`` of Torkamani et al.) replaces those
    gradients, per neuron with any of ``|a|, |b|, |c| < EPS``, by the gradients of the nearest
    non-degenerate neuron fitted to the current one:

    1. ``m`` = the mean of the neuron's t over every element of x (the batch);
    2. each near-zero parameter moves to ``θ' = EPS·sign(θ)`` (an exact 0 goes to ``+EPS``: the
       official code first draws ``θ = rand·EPS·0.07 ≥ 0``, whose only effect is that sign);
    3. ``(c̃1, c̃2)`` minimise ``‖A c̃ − r‖² + GRAVITATION_RIDGE·‖c̃‖²`` where the rows of A are the
       neighbour's homogeneous basis ``(∂y/∂c1, ∂y/∂c2)`` at ``m`` and their t-slopes (forward
       difference, step ``GRAVITATION_DT``), both clamped to ``±OUT_CLAMP``, and
       ``r = (y(m) − y'(m))`` of the current neuron minus those of the neighbour with
       ``c1 = c2 = 0``, so the neighbour matches the neuron's value and slope at ``m``;
    4. the near-zero parameters' gradients become the neighbour's ``Σ grad_y·∂y/∂θ`` at
       ``(θ', c̃1, c̃2)``, on every element.

    Slopes ``y'`` are the exact ``∂y/∂t`` of this module (``dH/dt = 0``; the official code used a
    ``sigmoid(100 t)`` delta there, which differs only for batch means within ~0.05 of 0). The
    neighbour's basis comes from autograd, so it is 0 where the neighbour's output is clamped
    (the official code clamps each basis function instead: they differ only past ``|y| = 1000``).
    Every other entry of ``grad_coeffs`` (c1, c2, the parameters outside the band, all neurons
    with none inside) is returned unchanged. Computed in float64 on the degenerate neurons only.

    Args:
        grad_y: like ``x``, the gradient of the loss with respect to ``y = deu(x, coeffs, dim)``.
        x: the op's input, any shape; the neuron axis is ``dim``.
        coeffs: ``[N, 5]``, ``N = x.shape[dim]``.
        dim: the neuron axis (non-negative).
        grad_coeffs: ``[N, 5]``, the exact gradient (any backend's); not modified.
    Returns:
        ``[N, 5]`` in ``grad_coeffs``' dtype.
    """
    za, zb, zc, _ = _case_masks(coeffs[:, 0], coeffs[:, 1], coeffs[:, 2])
    zero = torch.stack([za, zb, zc], 1)  # [N, 3]
    finite = torch.isfinite(coeffs[:, :3]).all(1)
    degenerate = zero.any(1) & finite
    if x.numel() == 0 or not bool(degenerate.any()):
        return grad_coeffs
    idx = degenerate.nonzero().squeeze(1)
    f64 = torch.float64
    cur = coeffs.detach().to(f64)[idx]  # [n, 5]
    xs = x.detach().to(f64).index_select(dim, idx).movedim(dim, -1).reshape(-1, len(idx))  # [rows, n]
    gys = grad_y.detach().to(f64).index_select(dim, idx).movedim(dim, -1).reshape(-1, len(idx))
    m = xs.mean(0)  # [n]
    abc = cur[:, :3]
    near = torch.where(abc == 0, EPS, EPS * torch.sign(abc))
    nb = torch.cat([torch.where(zero[idx], near, abc), torch.zeros_like(cur[:, 3:])], 1)  # (θ', 0, 0)
    # One reference call for everything the fit needs, one "neuron" column per (neuron, point):
    # the current neuron at m, and the neighbour (c1 = c2 = 0) at m and at m + dt.
    t = torch.cat([m, m, m + GRAVITATION_DT]).unsqueeze(0).requires_grad_()
    cc = torch.cat([cur, nb, nb]).requires_grad_()
    with torch.enable_grad():
        y = deu_reference(t, cc, -1)
        gt, gc = torch.autograd.grad(y.sum(), (t, cc))
    n = len(idx)
    y, gt = y.detach()[0], gt[0]
    basis = gc[n:2 * n, 3:].clamp(-OUT_CLAMP, OUT_CLAMP)  # [n, 2]: (∂y/∂c1, ∂y/∂c2) at m
    basis_dt = gc[2 * n:, 3:].clamp(-OUT_CLAMP, OUT_CLAMP)
    slope = ((basis_dt - basis) / GRAVITATION_DT).clamp(-OUT_CLAMP, OUT_CLAMP)
    a_mat = torch.stack([basis, slope], 1)  # [n, 2 (value, slope), 2 (c1, c2)]
    rhs = torch.stack([y[:n] - y[n:2 * n], gt[:n] - gt[n:2 * n]], 1).unsqueeze(2)  # [n, 2, 1]
    at = a_mat.transpose(1, 2)
    ridge = GRAVITATION_RIDGE * torch.eye(2, dtype=f64, device=x.device)
    c_tilde = torch.linalg.solve(at @ a_mat + ridge, at @ rhs).squeeze(2)  # [n, 2]
    fitted = torch.cat([nb[:, :3], c_tilde], 1).requires_grad_()
    with torch.enable_grad():
        (g_nb,) = torch.autograd.grad(deu_reference(xs, fitted, -1), fitted, gys)
    out = grad_coeffs.clone()
    rows = out[idx]
    rows[:, :3] = torch.where(zero[idx], g_nb[:, :3].to(out.dtype), rows[:, :3])
    out[idx] = rows
    return out
