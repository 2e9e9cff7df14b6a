"""Triton kernels for DEU activations (see specs/deu.md and csrc/deu/deu_math.h).

Same math as the C++ kernels: each of the eleven cases is one generic template over eight
basis functions of t,

    B(t) = [1, t, t², σ(100t), E1·cos ωt, t·E1·cos ωt, E1·sin ωt, E2],
    E1 = E(ρ1 t), E2 = E(ρ2 t), E(z) = exp(min(z, 14)),
    y(t) = clamp(Σ_j (hom_j + H(t)·part_j)·B_j(t), -1000, 1000),

so the case logic runs once per neuron (``_plan``) and the element loop is branch-free
apart from program-level skips of terms no neuron of the program uses. ``hom[2]`` and
``part[3]`` are zero in every case, so the plan carries 17 parameters π = (hom 0,1,3..7,
part 0,1,2,4..7, ρ1, ω, ρ2). The backward reduces ∂L/∂π per program in registers and maps
it to (a, b, c, c1, c2) with the plan's Jacobian, obtained by running ``_plan`` in forward
mode (value + tangent) once per coefficient direction: no hand-derived case derivatives.

Launchers take ``x`` as ``[M, N, K]`` (N = neurons), ``coeffs`` ``[N, 5]`` in the
accumulation dtype (float64 for float64 ``x``, else float32) and compute in that dtype.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kfuse._backends import cdiv, next_pow2, on_input_device
from kfuse.triton_kernels import INTERPRETED

# Constants of the definition (python/kfuse/reference/deu.py).
EPS: tl.constexpr = tl.constexpr(0.01)
EXP_CAP: tl.constexpr = tl.constexpr(14.0)
SHIFT_PART: tl.constexpr = tl.constexpr(64.0)  # deu_math.h kShiftPart
DD_RATIO: tl.constexpr = tl.constexpr(4.0)  # deu_math.h kDdRatio
OUT_CLAMP: tl.constexpr = tl.constexpr(1000.0)
STEP_SLOPE: tl.constexpr = tl.constexpr(100.0)

# K > 1 (spatial) tiles: elements per tile, 4 warps. Fixed, not autotuned: the partial-gradient
# layout [T, N, 5] (hence the summation order) must not depend on a timing run. Measured on
# an H200 with the earlier 2-D tiles of the K == 1 kernels, x 8192x4096 fp32: forward 1024
# (8/thread) beat 512/2048/4096; backward, which keeps 16 accumulators (then 17) per element in
# registers, was fastest at 256 (370 us vs 409 us at 512).
_FWD_TILE = 1024
_BWD_TILE = 256
_NUM_WARPS = 4
# K == 1: neurons per program (one per thread), rows per group (fixed at 4 in the kernels)
# and rows per program at least, so each thread's plan (and Jacobian, backward) is amortised.
_ROWS_BLOCK_N = 32 * _NUM_WARPS
_ROW_GROUP = 4
_ROWS_MIN_PER_PROG = 32
# Programs to aim for when splitting rows into chunks (several waves on a 132-SM GPU). A
# constant rather than the device's SM count, so results do not depend on the device.
_TARGET_PROGRAMS = 2048


@triton.jit
def _sqrt(x):
    # tl.sqrt is approximate for fp32 on the GPU; sqrt_rn is IEEE (fp32 only). Per-neuron
    # work, so the exact one costs nothing.
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _range_scale(a, b, c):
    """σ = 2^-k bringing max(|a|, |b|, |c|) below 2^60 (1 if it is below, or not finite): the
    bits of csrc/deu/deu_math.h's range_scale, from the exponent field."""
    m = tl.maximum(tl.abs(a), tl.maximum(tl.abs(b), tl.abs(c)))
    if a.dtype == tl.float64:
        e = (m.to(tl.int64, bitcast=True) >> 52) - 1023
        sig = ((1023 + 59 - e) << 52).to(tl.float64, bitcast=True)
        big = 1023
    else:
        e = (m.to(tl.int32, bitcast=True) >> 23) - 127
        sig = ((127 + 59 - e) << 23).to(tl.float32, bitcast=True)
        big = 127
    return tl.where((e >= 60) & (e <= big), sig, 1.0)


# ----------------------------------------------------------------------------------------
# Per-neuron plan, in forward mode: values of π and their tangents along (da, db, dc, dc1,
# dc2). Works on scalars (one neuron per program) and on vectors of neurons alike: every
# case is computed with safe operands and selected with tl.where.
# ----------------------------------------------------------------------------------------
@triton.jit
def _plan(a, b, c, c1, c2, da, db, dc, dc1, dc2):
    # The case is decided on the exact values, as the float64 reference does (and deu_math.h):
    # |p| < 0.01 exactly. In float32 the threshold rounds down (float32(0.01) < 0.01), so the
    # test there is |p| <= float32(0.01); D is computed in float64. (A float literal is rounded
    # to float32 even against float64, as the TTIR shows: hence tl.full. Testing |p| in float64
    # as well cost the fp32 rows forward 6 registers, 56 -> 62.)
    eps = tl.full([], EPS, tl.float64)
    if a.dtype == tl.float64:
        za = tl.abs(a) < eps
        zb = tl.abs(b) < eps
        zc = tl.abs(c) < eps
    else:
        eps32 = tl.full([], EPS, tl.float32)
        za = tl.abs(a) <= eps32
        zb = tl.abs(b) <= eps32
        zc = tl.abs(c) <= eps32
    a64 = a.to(tl.float64)
    b64 = b.to(tl.float64)
    c64 = c.to(tl.float64)
    # Range: the cases run on (a, b, c)·σ and the particular coefficients are multiplied by σ
    # at the end (deu_math.h: range_scale says why); the case is decided on the unscaled values.
    sig = _range_scale(a, b, c)
    # Tangents stay those of the scaled a, b, c (scaled, small ones underflowed in products such as
    # ∂(1/a) = −da/a²): c1's and c2's are divided by σ here and every tangent is multiplied by σ at
    # the end, which gives ∂/∂a = σ·∂/∂(σa) and leaves ∂/∂c1, ∂/∂c2 as they are (σ is a power of two).
    a = a * sig
    b = b * sig
    c = c * sig
    dc1 = dc1 / sig
    dc2 = dc2 / sig
    nza = ~za
    nzb = ~zb
    nzc = ~zc
    idn = za & zb & zc
    stp = za & zb & nzc
    rmp = za & nzb & zc
    fst = za & nzb & nzc
    par = nza & zb & zc
    osc = nza & zb & nzc & (a64 * c64 > 0)
    hyp = nza & zb & nzc & ~(a64 * c64 > 0)
    nnz = nza & nzb & zc
    nnn = nza & nzb & nzc
    dsc = b64 * b64 - 4.0 * a64 * c64
    und = nnn & (dsc < -eps)
    ovr = nnn & (dsc > eps)
    crt = nnn & ~(dsc < -eps) & ~(dsc > eps)

    # Safe denominators (1 where the parameter counts as zero: those branches are unused).
    A = tl.where(za, 1.0, a)
    dA = tl.where(za, 0.0, da)
    B = tl.where(zb, 1.0, b)
    dB = tl.where(zb, 0.0, db)
    C = tl.where(zc, 1.0, c)
    dC = tl.where(zc, 0.0, dc)
    iA = 1.0 / A
    diA = -iA * iA * dA
    iB = 1.0 / B
    diB = -iB * iB * dB
    iC = 1.0 / C
    diC = -iC * iC * dC
    sg = tl.where(a > 0, 1.0, -1.0)

    # Oscillator / hyperbolic: w = √(c/a), k = √(-c/a), k' = sign(a)·k.
    # c/a rounded once, as deu_math.h and the reference compute it: c·(1/a) was 1 ulp off where
    # c/a is exact, a phase error of ω·t ulps (4.8e-2 in y at t = 5000 for c/a = 1).
    if C.dtype == tl.float32:
        ca = tl.div_rn(C, A)  # Triton's float32 `/` is approximate (div.full, 2 ulp)
    else:
        ca = C / A
    dca = dC * iA + C * diA
    w = _sqrt(tl.where(osc, ca, 1.0))
    dw = tl.where(osc, dca, 0.0) / (2.0 * w)
    kh = _sqrt(tl.where(hyp, -ca, 1.0))
    dkh = tl.where(hyp, -dca, 0.0) / (2.0 * kh)
    kp = sg * kh
    dkp = sg * dkh
    # α = -b/(2a) (underdamped, critical).
    al = -0.5 * B * iA
    dal = -0.5 * (dB * iA + B * diA)
    # Underdamped Dd = √(4ac - b²); overdamped S = √(b² - 4ac), of the scaled a, b, c: from the
    # float64 D (in float, 4ac − b² cancels for large a, c), √ in float64 (D·σ² may be subnormal
    # in float).
    sig64 = sig.to(tl.float64)
    du = 4.0 * (dA * C + A * dC) - 2.0 * B * dB
    dd = (tl.sqrt(tl.where(und, -dsc, 1.0)) * sig64).to(A.dtype)
    ddd = tl.where(und, du, 0.0) / (2.0 * dd)
    idd = 1.0 / dd
    s = (tl.sqrt(tl.where(ovr, dsc, 1.0)) * sig64).to(A.dtype)
    ds = tl.where(ovr, -du, 0.0) / (2.0 * s)
    i_s = 1.0 / s
    di_s = -i_s * i_s * ds
    # Shared products.
    nh = A * c1 * iB  # a·c1/b (r = -b/a row)
    dnh = dA * c1 * iB + A * dc1 * iB + A * c1 * diB
    ab2 = A * iB * iB  # a/b²
    dab2 = dA * iB * iB + 2.0 * A * iB * diB
    isc = i_s * iC
    disc = di_s * iC + i_s * diC
    # Overdamped roots (-b ± S)/(2a) and weights -(b ± S)/(2Sc) without the difference of b and
    # S, which cancels for |b| >> sqrt|ac| (as in deu_math.h): with q = -(b + sign(b)·S)/2 the
    # roots are q/a ("fast") and c/q ("slow"). q is never 0, also where S and B are dummies.
    bpos = B >= 0
    q = tl.where(bpos, -0.5 * (B + s), 0.5 * (s - B))
    dq = tl.where(bpos, -0.5 * (dB + ds), 0.5 * (ds - dB))
    iq = 1.0 / q
    diq = -iq * iq * dq
    fast = q * iA
    dfast = dq * iA + q * diA
    slow = C * iq
    dslow = dC * iq + C * diq
    a_sq = A * i_s * iq  # a/(S·q)
    da_sq = dA * i_s * iq + A * di_s * iq + A * i_s * diq
    q_sc = q * isc  # q/(S·c)
    dq_sc = dq * isc + q * disc
    o4 = tl.where(bpos, q_sc, a_sq)
    do4 = tl.where(bpos, dq_sc, da_sq)
    o7 = -tl.where(bpos, a_sq, q_sc)
    do7 = -tl.where(bpos, da_sq, dq_sc)

    # Homogeneous coefficients.
    h0 = tl.where(rmp, c1, tl.where(par | nnz, c2, 0.0))
    dh0 = tl.where(rmp, dc1, tl.where(par | nnz, dc2, 0.0))
    h1 = tl.where(idn, 1.0, tl.where(par, c1, 0.0))
    dh1 = tl.where(par, dc1, 0.0)
    h3 = tl.where(stp, iC, 0.0)
    dh3 = tl.where(stp, diC, 0.0)
    use_c1 = fst | osc | hyp | und
    h4 = tl.where(use_c1, c1, tl.where(ovr | crt, c2, tl.where(nnz, -nh, 0.0)))
    dh4 = tl.where(use_c1, dc1, tl.where(ovr | crt, dc2, tl.where(nnz, -dnh, 0.0)))
    h5 = tl.where(crt, c1, 0.0)
    dh5 = tl.where(crt, dc1, 0.0)
    h6 = tl.where(osc, sg * c2, tl.where(und, c2, 0.0))  # sin(w't) = sign(a)·sin(wt)
    h7 = tl.where(hyp, c2, tl.where(ovr, c1, 0.0))
    dh7 = tl.where(hyp, dc2, tl.where(ovr, dc1, 0.0))
    # Particular coefficients (multiplied by H(t)).
    inv_c = fst | osc | hyp | und | ovr | crt
    p0 = tl.where(inv_c, iC, tl.where(nnz, -ab2, 0.0))
    dp0 = tl.where(inv_c, diC, tl.where(nnz, -dab2, 0.0))
    p1 = tl.where(rmp | nnz, iB, 0.0)
    dp1 = tl.where(rmp | nnz, diB, 0.0)
    p2 = tl.where(par, 0.5 * iA, 0.0)
    dp2 = tl.where(par, 0.5 * diA, 0.0)
    m_c = fst | osc | und | crt
    p4 = tl.where(m_c, -iC, tl.where(hyp, -0.5 * iC, tl.where(nnz, ab2, tl.where(ovr, o4, 0.0))))
    dp4 = tl.where(m_c, -diC, tl.where(hyp, -0.5 * diC, tl.where(nnz, dab2, tl.where(ovr, do4, 0.0))))
    p5 = tl.where(crt, al * iC, 0.0)
    dp5 = tl.where(crt, dal * iC + al * diC, 0.0)
    p6 = tl.where(und, -B * idd * iC, 0.0)
    p7 = tl.where(hyp, -0.5 * iC, tl.where(ovr, o7, 0.0))  # cosh = (E(kt) + E(-kt))/2
    dp7 = tl.where(hyp, -0.5 * diC, tl.where(ovr, do7, 0.0))
    # Rates.
    r1 = tl.where(ovr, tl.where(bpos, slow, fast), 0.0)
    dr1 = tl.where(ovr, tl.where(bpos, dslow, dfast), 0.0)
    r1 = tl.where(und | crt, al, r1)
    dr1 = tl.where(und | crt, dal, dr1)
    r1 = tl.where(nnz, -B * iA, r1)
    dr1 = tl.where(nnz, -(dB * iA + B * diA), dr1)
    r1 = tl.where(hyp, -kp, r1)
    dr1 = tl.where(hyp, -dkp, dr1)
    r1 = tl.where(fst, -C * iB, r1)
    dr1 = tl.where(fst, -(dC * iB + C * diB), dr1)
    om = tl.where(osc, w, tl.where(und, 0.5 * dd * iA, 0.0))
    dom = tl.where(osc, dw, tl.where(und, 0.5 * (ddd * iA + dd * diA), 0.0))
    # E1·sin(ωt)'s tangents on the basis E1·sin(ωt)/ω: those of h6·ω and p6·ω (p6·ω = α/c), over ω
    # (csrc/deu/deu_math.h's plan_with_jacobian says why; _backward_elem's s_om matches).
    iom = 1.0 / tl.where(om != 0, om, 1.0)
    dh6 = tl.where(osc | und, h6 * dom * iom, 0.0) + tl.where(osc, sg * dc2, tl.where(und, dc2, 0.0))
    dp6 = tl.where(und, (dal * iC + al * diC) * iom, 0.0)
    r2 = tl.where(hyp, kp, tl.where(ovr, tl.where(bpos, fast, slow), 0.0))
    dr2 = tl.where(hyp, dkp, tl.where(ovr, tl.where(bpos, dfast, dslow), 0.0))
    # The particular coefficients of the scaled equation σ(a y'' + b y' + c y) = σ·H (Range), and
    # every tangent times σ (see the tangents above): the particular ones twice.
    s2 = sig * sig
    h3, dh3 = h3 * sig, dh3 * s2
    p0, dp0, p1, dp1, p2, dp2 = p0 * sig, dp0 * s2, p1 * sig, dp1 * s2, p2 * sig, dp2 * s2
    p4, dp4, p5, dp5, p6, dp6 = p4 * sig, dp4 * s2, p5 * sig, dp5 * s2, p6 * sig, dp6 * s2
    p7, dp7 = p7 * sig, dp7 * s2
    dh0, dh1, dh4, dh5, dh6, dh7 = dh0 * sig, dh1 * sig, dh4 * sig, dh5 * sig, dh6 * sig, dh7 * sig
    dr1, dom, dr2 = dr1 * sig, dom * sig, dr2 * sig
    # A NaN or infinite a, b or c: NaN everywhere, as in the reference (x·0 is NaN exactly then).
    finite = (tl.abs(a) < float("inf")) & (tl.abs(b) < float("inf")) & (tl.abs(c) < float("inf"))
    h0 = tl.where(finite, h0, a * 0.0 + b * 0.0 + c * 0.0)
    # The part on E1 − 1, E2 − 1 (see _plan_values): the r = −b/a case, and ω = 0 neurons whose part
    # coefficients exceed SHIFT_PART (deu_math.h's kShiftPart).
    big = (tl.abs(p0) > SHIFT_PART) | (tl.abs(p4) > SHIFT_PART) | (tl.abs(p7) > SHIFT_PART)
    # Near-critical over-damped neurons (|b| > DD_RATIO·S) take their part on M1, M2 too, and in the
    # backward as −(M1 + M2)/(2c) + Q·DD, DD = (E1 − E2)/δ, Q = α/c, δ = ρ1 − ρ2 = S/a (deu_math.h's
    # Plan::dd): p6 holds Q and h6 holds δ (ω = 0: the forward multiplies them by sin 0 = 0), the
    # tangents are Q's and −1/(2c)'s (M1's and M2's), h6's is 0.
    dd = ovr & (tl.abs(B) > s * DD_RATIO)
    shf = nnz | ((om == 0) & big) | dd
    h6 = tl.where(dd, s * iA, h6)
    p6 = tl.where(dd, al * iC * sig, p6)
    dp6 = tl.where(dd, (dal * iC + al * diC) * s2, dp6)
    dp4 = tl.where(dd, -0.5 * diC * s2, dp4)
    dp7 = tl.where(dd, -0.5 * diC * s2, dp7)
    return (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2,
            dh0, dh1, dh3, dh4, dh5, dh6, dh7, dp0, dp1, dp2, dp4, dp5, dp6, dp7, dr1, dom, dr2, shf)


@triton.jit
def _plan_values(a, b, c, c1, c2):
    """The plan in evaluation form: π, with the particular E1 and E2 coefficients moved to m4, m7, on
    E1 − 1 and E2 − 1 (from expm1) for t > 0, and the part's constant p0 + p4 + p7 (0 for every θ)
    left out, for the r = −b/a case and for ω = 0 neurons with large part coefficients: from the
    constants, the r = −b/a case's part t/b − (a/b²)(1 − E1) ~ t²/(2a) erred by ε·|a|/b² (from
    E1 − 1 by ε·|t/b|, as the reference), a near-critical over-damped neuron's by ε·|b|/(S·c)
    (deu_math.h's Plan::m4). m4 = m7 = 0 in every other case."""
    z = a * 0.0
    (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2,
     _0, _1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, shf) = _plan(
        a, b, c, c1, c2, z, z, z, z, z)
    m4, m7 = tl.where(shf, p4, 0.0), tl.where(shf, p7, 0.0)
    return (h0, h1, h3, h4, h5, h6, h7, tl.where(shf, 0.0, p0), p1, p2, tl.where(shf, 0.0, p4), p5, p6,
            tl.where(shf, 0.0, p7), r1, om, r2, m4, m7)


@triton.jit
def _jvp_dot(a, b, c, c1, c2, da, db, dc, dc1, dc2,
             s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
             s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2):
    """Σ_i (∂L/∂π_i)·(∂π_i/∂θ · dθ): one coefficient gradient for a unit seed dθ."""
    (_0, _1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16,
     dh0, dh1, dh3, dh4, dh5, dh6, dh7, _dp0, dp1, dp2, dp4, dp5, dp6, dp7, dr1, dom, dr2, _shf) = _plan(
        a, b, c, c1, c2, da, db, dc, dc1, dc2)
    # s_p4, s_p7 are sums over the shifted bases B4 − 1, B7 − 1, on which the part's constant
    # p0 + p4 + p7 is 0 for every θ: it has no term (part_shifted in csrc/deu/deu_math.h).
    return (_term(s_h0, dh0) + _term(s_h1, dh1) + _term(s_h3, dh3) + _term(s_h4, dh4) + _term(s_h5, dh5)
            + _term(s_h6, dh6) + _term(s_h7, dh7) + _term(s_p1, dp1)
            + _term(s_p2, dp2) + _term(s_p4, dp4) + _term(s_p5, dp5) + _term(s_p6, dp6) + _term(s_p7, dp7)
            + _term(s_r1, dr1) + _term(s_om, dom) + _term(s_r2, dr2))


@triton.jit
def _term(s, d):
    """s·d, 0 where d is a structural 0: the sum s of a term the neuron does not use may be inf
    (Σ g·t² for |t| > 1.8e19 in float32), and 0·inf would make the gradient NaN."""
    return tl.where(d != 0, s * d, 0.0)


# ----------------------------------------------------------------------------------------
# Element math.
# ----------------------------------------------------------------------------------------
@triton.jit
def _exp(z, MATH: tl.constexpr):
    # MATH (chosen by the launcher): 0 = fp32 on the GPU, 1 = fp64 on the GPU
    # (libdevice), 2 = fp64 under the interpreter, 3 = fp32 under the interpreter (which does
    # not implement libdevice calls; there tl.* is numpy's math in the tensor's dtype).
    if MATH == 1:
        e = libdevice.exp(z)
    elif MATH == 0:
        # fp32 on the GPU: one MUFU ex2 (relative error ~1e-6 for |z| <= 14, well inside the
        # fp32 tolerance). tl.exp adds a 3-instruction fix-up for results below 2^-126, which
        # flush to 0 here (as in csrc/deu/deu_math.h).
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [z * 1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp(z)
    return e


@triton.jit
def _expm1(z, MATH: tl.constexpr):
    """E − 1: _plan_values' m4 in the forward (only programs with an r = −b/a neuron pay for it), and
    the backward's shifted bases (csrc/deu/deu_math.h's backward_one)."""
    if MATH <= 1:
        m = libdevice.expm1(z)
    else:
        # The interpreter has no libdevice: Kahan's (e − 1)·z/log(e), a few ulps with numpy's exp
        # and log (the error of e − 1 cancels against that of log e); z itself where e rounds to 1.
        # Only for |z| < 1/2: e − 1 cancels nowhere else, and for a subnormal e log(e) is coarse
        # (near-critical over-damped neurons at ρt ≈ −102: y 31× the float32 tolerance off; bug hunt).
        e = tl.exp(z)
        small = tl.abs(z) < 0.5
        log_e = tl.log(tl.where(small & (e != 1.0), e, 2.0))  # no 0/0 or log 0 where unused
        m = tl.where(e == 1.0, z, tl.where(small, (e - 1.0) * (z / log_e), e - 1.0))
    return m


@triton.jit
def _sincos(x, MATH: tl.constexpr):
    if MATH == 1:
        sn = libdevice.sin(x)
        cs = libdevice.cos(x)
    elif MATH == 0:
        # The hardware sin.approx/cos.approx (one SFU op each, abs error ~5e-7 on [-π, π])
        # after one shared Cody-Waite reduction x = q·2π + r (2π split in two, each product
        # fused so q·2π_hi is not rounded). It replaces a polynomial sincos (~25 FMA-pipe
        # ops per element) with which the forward ran at 2.27x the memory floor (H200,
        # 8192x4096 fp32), with every program needing both sin/cos and the second exp.
        q = tl.floor(x * 0.15915494309189535 + 0.5)
        r = tl.fma(-q, 6.28318548202514648, x)
        r = tl.fma(q, 1.7484556000744883e-07, r)
        sn = libdevice.fast_sinf(r)
        cs = libdevice.fast_cosf(r)
    else:
        sn = tl.sin(x)
        cs = tl.cos(x)
    return sn, cs


@triton.jit
def _pieces(t, r1, om, r2, any_trig, any_e2, any_step, any_m1, MATH: tl.constexpr):
    """E1, cap1, cos ωt, sin ωt, E2, cap2, σ(100t), E1 − 1, E2 − 1; unused terms skipped per program."""
    z1 = r1 * t
    cap1 = z1 > EXP_CAP
    e1 = _exp(tl.where(cap1, EXP_CAP, z1), MATH)
    if any_m1:
        m1 = _expm1(tl.where(cap1, EXP_CAP, z1), MATH)
    else:
        m1 = tl.zeros_like(t)
    if any_trig:
        sn, cs = _sincos(om * t, MATH)
    else:
        sn = tl.zeros_like(t)
        cs = sn + 1.0
    if any_e2:
        z2 = r2 * t
        cap2 = z2 > EXP_CAP
        e2 = _exp(tl.where(cap2, EXP_CAP, z2), MATH)
        if any_m1:
            m2 = _expm1(tl.where(cap2, EXP_CAP, z2), MATH)
        else:
            m2 = tl.zeros_like(t)
    else:
        cap2 = t != t  # all False (t is never NaN where E2 matters: its coefficient is 0)
        e2 = tl.zeros_like(t)
        m2 = tl.zeros_like(t)
    if any_step:
        sig = 1.0 / (1.0 + _exp(t * -STEP_SLOPE, MATH))
    else:
        sig = tl.zeros_like(t)
    return e1, cap1, cs, sn, e2, cap2, sig, m1, m2


@triton.jit
def _side(pos, h0, h1, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7):
    """The coefficients of t's side of 0 (hom, plus part where t > 0); k3 = h3 on both sides."""
    return (tl.where(pos, h0 + p0, h0), tl.where(pos, h1 + p1, h1), tl.where(pos, p2, 0.0),
            tl.where(pos, h4 + p4, h4), tl.where(pos, h5 + p5, h5), tl.where(pos, h6 + p6, h6),
            tl.where(pos, h7 + p7, h7))


@triton.jit
def _forward_elem(t, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                  any_trig, any_e2, any_step, any_m1, MATH: tl.constexpr):
    e1, cap1, cs, sn, e2, cap2, sig, m1, m2 = _pieces(t, r1, om, r2, any_trig, any_e2, any_step, any_m1, MATH)
    pos = t > 0
    k0, k1, k2, k4, k5, k6, k7 = _side(pos, h0, h1, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7)
    poly = t * (k1 + t * k2)
    if any_m1:  # m4·M1 with the t term it nearly cancels, then m7·M2 (_plan_values)
        poly = (poly + tl.where(pos, m4, 0.0) * m1) + tl.where(pos, m7, 0.0) * m2
    y = k0 + poly + h3 * sig + e1 * ((k4 + k5 * t) * cs + k6 * sn) + k7 * e2
    # Clamp with compares so a NaN stays NaN (as torch.clamp).
    y = tl.where(y < -OUT_CLAMP, -OUT_CLAMP, tl.where(y > OUT_CLAMP, OUT_CLAMP, y))
    return y


@triton.jit
def _series23(z):
    """Σ_{n≥1} 2n·zⁿ⁻¹/(2n+1)! for |z| <= 1/4 (csrc/deu/deu_math.h's series23); float64's
    coefficients through tl.full (a bare literal rounds to float32)."""
    if z.dtype == tl.float64:
        s = tl.full([], 1.0 / 93405312000.0, tl.float64) * z + tl.full([], 1.0 / 518918400.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 3991680.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 45360.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 840.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 30.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 3.0, tl.float64)
    else:
        s = ((z * (1.0 / 45360.0) + 1.0 / 840.0) * z + 1.0 / 30.0) * z + 1.0 / 3.0
    return s


@triton.jit
def _sinhc(z):
    """sinh(x)/x at z = x², |z| <= 1/4 (deu_math.h's sinhc_series)."""
    if z.dtype == tl.float64:
        s = tl.full([], 1.0 / 1307674368000.0, tl.float64) * z + tl.full([], 1.0 / 6227020800.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 39916800.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 362880.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 5040.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 120.0, tl.float64)
        s = s * z + tl.full([], 1.0 / 6.0, tl.float64)
    else:
        s = (z * (1.0 / 5040.0) + 1.0 / 120.0) * z + 1.0 / 6.0
    return s * z + 1.0


@triton.jit
def _cos_minus_sinc(x, sn, cs):
    """cos x − sin(x)/x, by series below |x| = 1/2, where it cancels (deu_math.h)."""
    x2 = x * x
    small = tl.abs(x) < 0.5
    return tl.where(small, -x2 * _series23(-x2), cs - sn / tl.where(small, 1.0, x))


@triton.jit
def _divided_difference(delta, t, e1, e2, m1, m2, cap1, cap2):
    """DD = (E1 − E2)/δ and its ∂/∂ρ1, ∂/∂ρ2 (deu_math.h's divided_difference): by series where
    neither exponent is capped and |δt/2| < 1/2, else from the differences. δ = 0 gives junk: select."""
    x = 0.5 * delta * t
    smooth = (~cap1) & (~cap2) & (tl.abs(x) < 0.5)
    x2 = x * x
    tea = t * tl.sqrt(e1 * e2)
    dds = tea * _sinhc(x2)
    w = t * (tea * (x * _series23(x2)))
    idel = 1.0 / tl.where(delta != 0, delta, 1.0)
    ddd = (m1 - m2) * idel
    dd = tl.where(smooth, dds, ddd)
    d1 = tl.where(smooth, 0.5 * (t * dds + w), (tl.where(cap1, 0.0, t * e1) - ddd) * idel)
    d2 = tl.where(smooth, 0.5 * (t * dds - w), (ddd - tl.where(cap2, 0.0, t * e2)) * idel)
    return dd, d1, d2


@triton.jit
def _backward_elem(t, g, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                   any_trig, any_e2, any_step, any_m1, MATH: tl.constexpr):
    """∂L/∂t and the element's contributions to ∂L/∂π (same order as _plan's outputs, less p0: its row is 0)."""
    e1, cap1, cs, sn, e2, cap2, sig, m1, m2 = _pieces(t, r1, om, r2, any_trig, any_e2, any_step, any_m1, MATH)
    pos = t > 0
    k0, k1, k2, k4, k5, k6, k7 = _side(pos, h0, h1, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7)
    pm = tl.where(pos, m4, 0.0)
    pm7 = tl.where(pos, m7, 0.0)
    poly = t * (k1 + t * k2)
    if any_m1:  # as _forward_elem
        poly = (poly + pm * m1) + pm7 * m2
    lin = k4 + k5 * t
    osc = lin * cs + k6 * sn  # the E1 bracket
    yraw = k0 + poly + h3 * sig + e1 * osc + k7 * e2
    k4h = k4
    k7h = k7
    if any_m1:  # for the derivatives: m4·M1 has m4·E1 as derivative, so E1's whole coefficient is k4 + m4
        lin = lin + pm
        osc = lin * cs + k6 * sn
        k7 = k7 + pm7  # and E2's k7 + m7
    dosc = k6 * cs - lin * sn  # its derivative w.r.t. ωt
    # The clamp's derivative: 0 outside; a NaN yraw (NaN coefficients) is not outside, so it reaches
    # the gradients as in the reference.
    outside = (yraw < -OUT_CLAMP) | (yraw > OUT_CLAMP)
    g = tl.where(outside, 0.0, g)
    # and t = 0 there (a select: the lanes inside keep their bits), as csrc/deu/deu_cpu_simd.h's
    # vbackward: g = 0 alone left 0·inf = NaN in the neuron's grad_coeffs where a huge finite t
    # (|t| > ~2.8e32 with E1 capped at e^14) makes t·E1·cos (b5), t·E1 (the ρ1 and ω sums) or t·E2
    # overflow (a bug hunt: NaN in grad a, b, c, c1 of a critical (1, 2, 1, .3, -.2) and an
    # under-damped (1, .5, 2, .3, -.2) neuron at t = -1e33 beside t = 0.5). The terms below are then
    # g·(finite) = 0 (the pieces are bounded: the exponents are capped), but for lin and osc, formed
    # above from the element's t (k5·t may overflow): s_om and s_r1 select on outside.
    t = tl.where(outside, 0.0, t)
    gp = tl.where(pos, g, 0.0)
    b4 = e1 * cs
    # B4 − 1 and B7 − 1 accurate where small, as csrc/deu/deu_math.h's backward_one: from the
    # (capped) exponents, (E1 − 1)·cos + (cos − 1) where ω != 0, cos − 1 as −sin²/(1 + cos) where
    # cos > 0. Programs with an r = −b/a neuron have M1 from _expm1 already.
    if any_m1:
        b4m1 = m1
    else:
        b4m1 = _expm1(tl.where(cap1, EXP_CAP, r1 * t), MATH)
    if any_trig:
        cosm1 = tl.where(cs > 0, -(sn * sn) / tl.where(cs > 0, 1.0 + cs, 1.0), cs - 1.0)
        b4m1 = tl.where(om != 0, b4m1 * cs + cosm1, b4m1)
    if any_m1:
        b7m1 = m2
    elif any_e2:
        b7m1 = _expm1(tl.where(cap2, EXP_CAP, r2 * t), MATH)
    else:
        b7m1 = tl.zeros_like(t)
    b5 = t * b4
    b6 = e1 * sn
    gt = g * t
    te1 = t * e1  # t·E first: g·t may overflow where E is 0
    # basis 6 as E1·sin(ωt)/ω: see _plan
    s_om = tl.where(outside, 0.0, g * te1 * (k6 * _cos_minus_sinc(om * t, sn, cs) - lin * sn))
    # The rates take E1's and E2's coefficients; a Plan::dd neuron's part on M1, M2 and DD (see _plan):
    # (m4 + m7)/2 = −σ/(2c), and p6 = Q times DD's own ∂/∂ρ (programs without one skip it).
    s_r1 = tl.where(cap1 | outside, 0.0, g * te1 * osc)
    s_r2 = tl.where(cap2, 0.0, g * (t * e2) * k7)
    s_p6 = gp * b6
    if any_m1:
        if any_e2:
            # (the plan may be one scalar per program: the interpreter has no tensor & scalar bool)
            # g != 0: DD's ∂/∂ρ may overflow where an exponent is capped, and 0·inf is NaN where the
            # output is clamped (g = 0 there; a bug hunt's NaN grad_coeffs)
            dd = pos & (g != 0) & ((tl.zeros_like(t) + tl.where(om == 0, p6, 0.0)) != 0)
            ddv, d1, d2 = _divided_difference(h6, t, e1, e2, m1, m2, cap1, cap2)
            half = 0.5 * (m4 + m7)
            s_r1 = tl.where(dd, tl.where(cap1, 0.0, g * te1 * (k4h + half)) + g * (p6 * d1), s_r1)
            s_r2 = tl.where(dd, tl.where(cap2, 0.0, g * (t * e2) * (k7h + half)) + g * (p6 * d2), s_r2)
            s_p6 = tl.where(dd, gp * ddv, s_p6)
    r1e = tl.where(cap1, 0.0, r1)
    r2e = tl.where(cap2, 0.0, r2)
    dy = (k1 + 2.0 * k2 * t + h3 * STEP_SLOPE * sig * (1.0 - sig)
          + e1 * (r1e * osc + k5 * cs + om * dosc) + k7 * r2e * e2)
    gx = tl.where(outside, 0.0, g * dy)  # not g·dy alone: 0·inf = NaN where the clamped dy overflows
    return (gx, g, gt, g * sig, g * b4, g * b5, g * b6, g * e2,
            gp * t, gp * t * t, gp * b4m1, gp * b5, s_p6, gp * b7m1, s_r1, s_om, s_r2)


@triton.jit
def _any(v):
    return tl.max(tl.where(v != 0, 1, 0).to(tl.int32)) > 0


# ----------------------------------------------------------------------------------------
# K == 1: x is [M, N]; a program owns BLOCK_N = 32·num_warps neurons (one per thread, so each
# thread keeps one plan and, backward, one set of accumulators in registers) and a chunk of
# rows, walked one row at a time (a 1-D row of BLOCK_N elements is one element per thread;
# a 2-D tile would be vectorised along the row, putting several neurons in each thread).
# Rows come in groups of 4, and the next group is loaded before the current one is computed,
# so loads are in flight during the math (as in the CUDA rows kernels). The first group is
# loaded before the plan, overlapping its computation.
# ----------------------------------------------------------------------------------------
@triton.jit
def _load_row(ptrs, r, row_end, cmask, dtype):
    # ptrs: row r's elements of the program's columns (advanced by N per row by the caller,
    # rather than computing r·N + col in 64 bits for every row).
    return tl.load(ptrs, mask=cmask & (r < row_end), other=0.0).to(dtype)


@triton.jit
def _store_row(ptrs, r, row_end, cmask, v):
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=cmask & (r < row_end))


@triton.jit
def _load_group(ptrs, r, row_end, cmask, N, dtype):
    """Rows r..r+3 (ptrs at row r). Rows are reached by adding N to a pointer, never k·N in
    32 bits, which could overflow."""
    return (_load_row(ptrs, r, row_end, cmask, dtype),
            _load_row(ptrs + N, r + 1, row_end, cmask, dtype),
            _load_row(ptrs + N + N, r + 2, row_end, cmask, dtype),
            _load_row(ptrs + N + N + N, r + 3, row_end, cmask, dtype))


@triton.jit
def _rows_program(M, N, rows_per_prog, BLOCK_N: tl.constexpr):
    """This program's columns, their mask, its row chunk [row0, row_end) and the offsets of
    its first row's elements (int64)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row0 = tl.program_id(1).to(tl.int64) * rows_per_prog  # int64: past 2^31 rows (bug hunt)
    return cols, cols < N, row0, tl.minimum(M, row0 + rows_per_prog), row0.to(tl.int64) * N + cols


@triton.jit
def _columns_coeffs(co_ptr, cols, cmask):
    co = co_ptr + cols.to(tl.int64) * 5  # int64: cols * 5 wrapped past 429M neurons (overflow hunt, 2026-12-07)
    a = tl.load(co + 0, mask=cmask, other=0.0)
    b = tl.load(co + 1, mask=cmask, other=0.0)
    c = tl.load(co + 2, mask=cmask, other=0.0)
    c1 = tl.load(co + 3, mask=cmask, other=0.0)
    c2 = tl.load(co + 4, mask=cmask, other=0.0)
    return a, b, c, c1, c2


@triton.jit
def _columns_plan(co_ptr, cols, cmask):
    """The plans of the program's neurons and the program's term flags (any neuron with trig
    terms, E2 terms, a step), which let the element loop skip work no neuron needs."""
    a, b, c, c1, c2 = _columns_coeffs(co_ptr, cols, cmask)
    h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7 = _plan_values(a, b, c, c1, c2)
    return (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
            _any(om), _any(h7) | _any(p7) | _any(r2), _any(h3), _any(m4) | _any(m7))  # r2: see deu_math.h's Plan::e2


@triton.jit
def _deu_fwd_rows(x_ptr, y_ptr, co_ptr, M, N, rows_per_prog, BLOCK_N: tl.constexpr, MATH: tl.constexpr):
    acc = co_ptr.dtype.element_ty
    cols, cmask, row0, row_end, first = _rows_program(M, N, rows_per_prog, BLOCK_N)
    xp = x_ptr + first  # the current group's first row
    yp = y_ptr + first
    t0, t1, t2, t3 = _load_group(xp, row0, row_end, cmask, N, acc)
    (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
     any_trig, any_e2, any_step, any_m1) = _columns_plan(co_ptr, cols, cmask)
    for r in range(row0, row_end, 4):
        xp = xp + N + N + N + N
        n0, n1, n2, n3 = _load_group(xp, r + 4, row_end, cmask, N, acc)
        y0 = _forward_elem(t0, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                           any_trig, any_e2, any_step, any_m1, MATH)
        y1 = _forward_elem(t1, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                           any_trig, any_e2, any_step, any_m1, MATH)
        y2 = _forward_elem(t2, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                           any_trig, any_e2, any_step, any_m1, MATH)
        y3 = _forward_elem(t3, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                           any_trig, any_e2, any_step, any_m1, MATH)
        _store_row(yp, r, row_end, cmask, y0)
        _store_row(yp + N, r + 1, row_end, cmask, y1)
        _store_row(yp + N + N, r + 2, row_end, cmask, y2)
        _store_row(yp + N + N + N, r + 3, row_end, cmask, y3)
        yp = yp + N + N + N + N
        t0, t1, t2, t3 = n0, n1, n2, n3


@triton.jit
def _bwd_row(gxp, r, row_end, cmask, t, g,
             h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
             s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
             s_r1, s_om, s_r2, any_trig, any_e2, any_step, any_m1, MATH: tl.constexpr):
    """One row of the backward: stores grad_x, returns the accumulators plus its terms (rows
    past the chunk load t = g = 0, which contribute 0)."""
    (gx, q_h0, q_h1, q_h3, q_h4, q_h5, q_h6, q_h7, q_p1, q_p2, q_p4, q_p5, q_p6, q_p7,
     q_r1, q_om, q_r2) = _backward_elem(t, g, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6,
                                        p7, r1, om, r2, m4, m7, any_trig, any_e2, any_step, any_m1, MATH)
    _store_row(gxp, r, row_end, cmask, gx)
    return (s_h0 + q_h0, s_h1 + q_h1, s_h3 + q_h3, s_h4 + q_h4, s_h5 + q_h5, s_h6 + q_h6, s_h7 + q_h7,
            s_p1 + q_p1, s_p2 + q_p2, s_p4 + q_p4, s_p5 + q_p5, s_p6 + q_p6, s_p7 + q_p7,
            s_r1 + q_r1, s_om + q_om, s_r2 + q_r2)


@triton.jit
def _deu_bwd_rows(gy_ptr, x_ptr, co_ptr, gx_ptr, part_ptr, M, N, rows_per_prog,
                  BLOCK_N: tl.constexpr, MATH: tl.constexpr):
    acc = co_ptr.dtype.element_ty
    cols, cmask, row0, row_end, first = _rows_program(M, N, rows_per_prog, BLOCK_N)
    xp = x_ptr + first  # the current group's first row, in each tensor
    gp = gy_ptr + first
    gxp = gx_ptr + first
    t0, t1, t2, t3 = _load_group(xp, row0, row_end, cmask, N, acc)
    g0, g1, g2, g3 = _load_group(gp, row0, row_end, cmask, N, acc)
    (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
     any_trig, any_e2, any_step, any_m1) = _columns_plan(co_ptr, cols, cmask)
    zero = tl.zeros([BLOCK_N], dtype=acc)
    s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7 = zero, zero, zero, zero, zero, zero, zero
    s_p1, s_p2, s_p4, s_p5, s_p6, s_p7 = zero, zero, zero, zero, zero, zero
    s_r1, s_om, s_r2 = zero, zero, zero
    for r in range(row0, row_end, 4):
        xp = xp + N + N + N + N
        gp = gp + N + N + N + N
        n0, n1, n2, n3 = _load_group(xp, r + 4, row_end, cmask, N, acc)
        m0, m1, m2, m3 = _load_group(gp, r + 4, row_end, cmask, N, acc)
        (s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
         s_r1, s_om, s_r2) = _bwd_row(gxp, r, row_end, cmask, t0, g0,
                                      h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                                      s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4,
                                      s_p5, s_p6, s_p7, s_r1, s_om, s_r2, any_trig, any_e2, any_step, any_m1, MATH)
        (s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
         s_r1, s_om, s_r2) = _bwd_row(gxp + N, r + 1, row_end, cmask, t1, g1,
                                      h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                                      s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4,
                                      s_p5, s_p6, s_p7, s_r1, s_om, s_r2, any_trig, any_e2, any_step, any_m1, MATH)
        (s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
         s_r1, s_om, s_r2) = _bwd_row(gxp + N + N, r + 2, row_end, cmask, t2, g2,
                                      h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                                      s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4,
                                      s_p5, s_p6, s_p7, s_r1, s_om, s_r2, any_trig, any_e2, any_step, any_m1, MATH)
        (s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
         s_r1, s_om, s_r2) = _bwd_row(gxp + N + N + N, r + 3, row_end, cmask, t3, g3,
                                      h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                                      s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4,
                                      s_p5, s_p6, s_p7, s_r1, s_om, s_r2, any_trig, any_e2, any_step, any_m1, MATH)
        gxp = gxp + N + N + N + N
        t0, t1, t2, t3 = n0, n1, n2, n3
        g0, g1, g2, g3 = m0, m1, m2, m3
    # Epilogue: one partial per (row chunk, neuron, coefficient); each thread holds its
    # neuron's sums already, so there is no cross-thread reduction. The coefficients are
    # loaded again rather than kept live through the loop.
    a, b, c, c1, c2 = _columns_coeffs(co_ptr, cols, cmask)
    _store_coeff_grads(part_ptr + tl.program_id(1).to(tl.int64) * N * 5 + cols.to(tl.int64) * 5, cmask, a, b, c, c1, c2,
                       s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7, s_p1, s_p2, s_p4, s_p5, s_p6, s_p7,
                       s_r1, s_om, s_r2)


@triton.jit
def _store_coeff_grads(out_ptr, mask, a, b, c, c1, c2,
                       s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                       s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2):
    """Apply the plan's Jacobian (5 forward-mode passes) and store ∂L/∂(a, b, c, c1, c2)."""
    z = a * 0.0
    o = z + 1.0
    g_a = _jvp_dot(a, b, c, c1, c2, o, z, z, z, z, s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                   s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2)
    g_b = _jvp_dot(a, b, c, c1, c2, z, o, z, z, z, s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                   s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2)
    g_c = _jvp_dot(a, b, c, c1, c2, z, z, o, z, z, s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                   s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2)
    g_c1 = _jvp_dot(a, b, c, c1, c2, z, z, z, o, z, s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                    s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2)
    g_c2 = _jvp_dot(a, b, c, c1, c2, z, z, z, z, o, s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7,
                    s_p1, s_p2, s_p4, s_p5, s_p6, s_p7, s_r1, s_om, s_r2)
    tl.store(out_ptr + 0, g_a, mask=mask)
    tl.store(out_ptr + 1, g_b, mask=mask)
    tl.store(out_ptr + 2, g_c, mask=mask)
    tl.store(out_ptr + 3, g_c1, mask=mask)
    tl.store(out_ptr + 4, g_c2, mask=mask)


# ----------------------------------------------------------------------------------------
# K > 1 (e.g. NCHW): a program owns one neuron n and a chunk of rows m; tiles are
# [BLOCK_R rows, BLOCK_K spatial], contiguous along K. The plan is scalar.
# ----------------------------------------------------------------------------------------
@triton.jit
def _neuron_coeffs(co_ptr, n):
    co = co_ptr + n.to(tl.int64) * 5  # (see _columns_coeffs)
    return tl.load(co + 0), tl.load(co + 1), tl.load(co + 2), tl.load(co + 3), tl.load(co + 4)


@triton.jit
def _neuron_plan(co_ptr, n):
    """Neuron n's plan (scalars) and its term flags (trig, E2, step)."""
    a, b, c, c1, c2 = _neuron_coeffs(co_ptr, n)
    h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7 = _plan_values(a, b, c, c1, c2)
    return (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
            om != 0, (h7 != 0) | (p7 != 0) | (r2 != 0), h3 != 0, (m4 != 0) | (m7 != 0))


@triton.jit
def _spatial_tile(n, rows, k0, M, N, K, BLOCK_K: tl.constexpr):
    """Offsets (int64) and mask of the tile rows × [k0, k0 + BLOCK_K) of neuron n's planes."""
    ks = k0 + tl.arange(0, BLOCK_K)[None, :]
    return rows.to(tl.int64) * N * K + n.to(tl.int64) * K + ks, (rows < M) & (ks < K)


@triton.jit
def _deu_fwd_spatial(x_ptr, y_ptr, co_ptr, M, N, K, rows_per_prog,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, MATH: tl.constexpr):
    n = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * rows_per_prog
    acc = co_ptr.dtype.element_ty
    (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
     any_trig, any_e2, any_step, any_m1) = _neuron_plan(co_ptr, n)
    for i in range(0, rows_per_prog, BLOCK_R):
        rows = row0 + i + tl.arange(0, BLOCK_R)[:, None]
        for k0 in range(0, K, BLOCK_K):
            offs, mask = _spatial_tile(n, rows, k0, M, N, K, BLOCK_K)
            t = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            y = _forward_elem(t, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
                              any_trig, any_e2, any_step, any_m1, MATH)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _deu_bwd_spatial(gy_ptr, x_ptr, co_ptr, gx_ptr, part_ptr, M, N, K, rows_per_prog,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, MATH: tl.constexpr):
    n = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * rows_per_prog
    acc = co_ptr.dtype.element_ty
    (h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5, p6, p7, r1, om, r2, m4, m7,
     any_trig, any_e2, any_step, any_m1) = _neuron_plan(co_ptr, n)
    zero = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc)
    s_h0, s_h1, s_h3, s_h4, s_h5, s_h6, s_h7 = zero, zero, zero, zero, zero, zero, zero
    s_p1, s_p2, s_p4, s_p5, s_p6, s_p7 = zero, zero, zero, zero, zero, zero
    s_r1, s_om, s_r2 = zero, zero, zero
    for i in range(0, rows_per_prog, BLOCK_R):
        rows = row0 + i + tl.arange(0, BLOCK_R)[:, None]
        for k0 in range(0, K, BLOCK_K):
            offs, mask = _spatial_tile(n, rows, k0, M, N, K, BLOCK_K)
            t = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(acc)
            (gx, q_h0, q_h1, q_h3, q_h4, q_h5, q_h6, q_h7, q_p1, q_p2, q_p4, q_p5, q_p6, q_p7,
             q_r1, q_om, q_r2) = _backward_elem(t, g, h0, h1, h3, h4, h5, h6, h7, p0, p1, p2, p4, p5,
                                                p6, p7, r1, om, r2, m4, m7, any_trig, any_e2, any_step, any_m1, MATH)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            s_h0 += q_h0
            s_h1 += q_h1
            s_h3 += q_h3
            s_h4 += q_h4
            s_h5 += q_h5
            s_h6 += q_h6
            s_h7 += q_h7
            s_p1 += q_p1
            s_p2 += q_p2
            s_p4 += q_p4
            s_p5 += q_p5
            s_p6 += q_p6
            s_p7 += q_p7
            s_r1 += q_r1
            s_om += q_om
            s_r2 += q_r2
    a, b, c, c1, c2 = _neuron_coeffs(co_ptr, n)
    _store_coeff_grads(part_ptr + (tl.program_id(1).to(tl.int64) * N + n) * 5, n < N, a, b, c, c1, c2,
                       tl.sum(tl.sum(s_h0, axis=1), axis=0), tl.sum(tl.sum(s_h1, axis=1), axis=0),
                       tl.sum(tl.sum(s_h3, axis=1), axis=0), tl.sum(tl.sum(s_h4, axis=1), axis=0),
                       tl.sum(tl.sum(s_h5, axis=1), axis=0), tl.sum(tl.sum(s_h6, axis=1), axis=0),
                       tl.sum(tl.sum(s_h7, axis=1), axis=0),
                       tl.sum(tl.sum(s_p1, axis=1), axis=0), tl.sum(tl.sum(s_p2, axis=1), axis=0),
                       tl.sum(tl.sum(s_p4, axis=1), axis=0), tl.sum(tl.sum(s_p5, axis=1), axis=0),
                       tl.sum(tl.sum(s_p6, axis=1), axis=0), tl.sum(tl.sum(s_p7, axis=1), axis=0),
                       tl.sum(tl.sum(s_r1, axis=1), axis=0), tl.sum(tl.sum(s_om, axis=1), axis=0),
                       tl.sum(tl.sum(s_r2, axis=1), axis=0))


# ----------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------
def _row_split(M: int, block_rows: int, col_programs: int, min_rows: int = 1) -> tuple[int, int]:
    """(rows per program, number of row chunks): about _TARGET_PROGRAMS programs in all, each
    a whole number of row tiles and at least ``min_rows`` rows where M allows. Depends only on
    the shape, so it is deterministic."""
    tiles = cdiv(M, block_rows)
    chunks = max(1, min(tiles, cdiv(_TARGET_PROGRAMS, col_programs), cdiv(M, min_rows)))
    rows_per_prog = cdiv(tiles, chunks) * block_rows
    return rows_per_prog, cdiv(M, rows_per_prog)


def _blocks(K: int, tile: int) -> tuple[int, int]:
    """(rows per tile, spatial elements per tile) of the K > 1 kernels."""
    cols = max(2, min(tile, next_pow2(K)))
    return max(2, tile // cols), cols


def _rows_grid(M: int, N: int) -> tuple[int, int, int]:
    """(column programs, rows per program, row chunks) of the K == 1 kernels."""
    n_prog = cdiv(N, _ROWS_BLOCK_N)
    rpp, chunks = _row_split(M, _ROW_GROUP, n_prog, _ROWS_MIN_PER_PROG)
    return n_prog, rpp, chunks


def _math_mode(coeffs: torch.Tensor) -> int:
    """The kernels' MATH mode: 0 fp32 GPU, 1 fp64 GPU, 2 fp64 / 3 fp32 interpreter."""
    if coeffs.dtype != torch.float64:
        return 3 if INTERPRETED else 0
    return 2 if INTERPRETED else 1


def _check(x: torch.Tensor, coeffs: torch.Tensor) -> None:
    if x.ndim != 3 or not x.is_contiguous():
        raise ValueError(f"deu triton: x must be a contiguous [M, N, K] tensor; got {tuple(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if coeffs.shape != (x.shape[1], 5) or coeffs.dtype != acc or not coeffs.is_contiguous():
        raise ValueError(f"deu triton: coeffs must be contiguous [{x.shape[1]}, 5] {acc}; "
                         f"got {tuple(coeffs.shape)} {coeffs.dtype}")


@on_input_device
def deu_forward(x: torch.Tensor, coeffs: torch.Tensor, out: torch.Tensor) -> None:
    """y = DEU(x) for x viewed as [M, N, K], written into ``out`` (contiguous, like x)."""
    _check(x, coeffs)
    M, N, K = x.shape
    if not (out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.is_contiguous()):
        raise ValueError("kfuse.triton_kernels.deu_forward: out must be a contiguous tensor like x")
    if x.numel() == 0:
        return
    math_mode = _math_mode(coeffs)
    if K == 1:
        n_prog, rpp, chunks = _rows_grid(M, N)
        _deu_fwd_rows[(n_prog, chunks)](x, out, coeffs, M, N, rpp, BLOCK_N=_ROWS_BLOCK_N, MATH=math_mode,
                                        num_warps=_NUM_WARPS)
    else:
        rows, cols = _blocks(K, _FWD_TILE)
        rpp, chunks = _row_split(M, rows, N)
        _deu_fwd_spatial[(N, chunks)](x, out, coeffs, M, N, K, rpp, BLOCK_R=rows, BLOCK_K=cols, MATH=math_mode,
                                      num_warps=_NUM_WARPS)


@on_input_device
def deu_backward(grad_y: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x like x, grad_coeffs [N, 5] in coeffs' dtype); deterministic (no atomics)."""
    _check(x, coeffs)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype or not grad_y.is_contiguous():
        raise ValueError("deu triton: grad_y must be contiguous with the shape and dtype of x")
    M, N, K = x.shape
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(coeffs)
    math_mode = _math_mode(coeffs)
    if K == 1:
        n_prog, rpp, chunks = _rows_grid(M, N)
        partials = torch.empty((chunks, N, 5), dtype=coeffs.dtype, device=x.device)
        _deu_bwd_rows[(n_prog, chunks)](grad_y, x, coeffs, grad_x, partials, M, N, rpp,
                                        BLOCK_N=_ROWS_BLOCK_N, MATH=math_mode, num_warps=_NUM_WARPS)
    else:
        rows, cols = _blocks(K, _BWD_TILE)
        rpp, chunks = _row_split(M, rows, N)
        partials = torch.empty((chunks, N, 5), dtype=coeffs.dtype, device=x.device)
        _deu_bwd_spatial[(N, chunks)](grad_y, x, coeffs, grad_x, partials, M, N, K, rpp,
                                      BLOCK_R=rows, BLOCK_K=cols, MATH=math_mode, num_warps=_NUM_WARPS)
    return grad_x, partials.sum(0)
