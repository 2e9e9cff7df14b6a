// DEU math shared by the CPU (.cpp) and CUDA (.cu) kernels. Framework-free.
//
// Every one of the eleven cases of python/kfuse/reference/deu.py is rewritten as one
// generic template over eight basis functions of t,
//
//   B(t) = [1, t, t², σ(100t), E1·cos ωt, t·E1·cos ωt, E1·sin ωt, E2],
//   E1 = E(ρ1·t), E2 = E(ρ2·t), E(z) = exp(min(z, 14)),
//   y(t) = clamp(Σ_j (hom_j + H(t)·part_j)·B_j(t), -1000, 1000),
//
// so the per-neuron case logic runs once per neuron ("the plan"), and the per-element work
// is branch-free apart from skipping terms a neuron does not use. Parameter gradients are
// first reduced against the 19 plan parameters π = (hom[8], part[8], ρ1, ω, ρ2) and then
// mapped to (a, b, c, c1, c2) with the plan's Jacobian, obtained by running the same plan
// code on forward-mode dual numbers (so there is no hand-derived derivative to get wrong).
// The part's sums use B4 − 1 and B7 − 1 for its exponentials (see part_shifted), and the
// r = −b/a case evaluates its particular E1 term on E1 − 1 (see Plan::m4).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define KF_HD __host__ __device__ __forceinline__
#define KF_HD_INLINE __host__ __device__ __forceinline__
#else
#define KF_HD inline
#define KF_HD_INLINE inline __attribute__((always_inline))
#endif

namespace kfuse {
namespace deu {

constexpr double kEps = 0.01;
constexpr double kExpCap = 14.0;
constexpr double kOutClamp = 1000.0;
constexpr int kScaleExp = 60;  // a, b, c are scaled below 2^60 (range_scale): b², 4ac < 2^122
constexpr double kScaleMin = 1152921504606846976.0;  // 2^60
constexpr double kStepSlope = 100.0;
constexpr int kBasis = 8;
constexpr int kPlanParams = 2 * kBasis + 3;  // hom[8], part[8], rho1, omega, rho2
constexpr int kCoeffs = 5;                   // a, b, c, c1, c2

// Forward-mode dual number carrying the derivative w.r.t. the 5 coefficients.
template <typename T>
struct Dual {
  T v;
  T d[kCoeffs];
};

template <typename T> KF_HD T val(T x) { return x; }
template <typename T> KF_HD T val(const Dual<T>& x) { return x.v; }

template <typename T> KF_HD Dual<T> dconst(T v) {
  Dual<T> r;
  r.v = v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = T(0);
  return r;
}
template <typename T> KF_HD Dual<T> operator+(const Dual<T>& x, const Dual<T>& y) {
  Dual<T> r;
  r.v = x.v + y.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = x.d[k] + y.d[k];
  return r;
}
template <typename T> KF_HD Dual<T> operator-(const Dual<T>& x, const Dual<T>& y) {
  Dual<T> r;
  r.v = x.v - y.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = x.d[k] - y.d[k];
  return r;
}
template <typename T> KF_HD Dual<T> operator-(const Dual<T>& x) {
  Dual<T> r;
  r.v = -x.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = -x.d[k];
  return r;
}
template <typename T> KF_HD Dual<T> operator*(const Dual<T>& x, const Dual<T>& y) {
  Dual<T> r;
  r.v = x.v * y.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = x.d[k] * y.v + x.v * y.d[k];
  return r;
}
template <typename T> KF_HD Dual<T> operator/(const Dual<T>& x, const Dual<T>& y) {
  Dual<T> r;
  r.v = x.v / y.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = (x.d[k] - r.v * y.d[k]) / y.v;
  return r;
}
template <typename T> KF_HD Dual<T> operator*(T s, const Dual<T>& x) {
  Dual<T> r;
  r.v = s * x.v;
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = s * x.d[k];
  return r;
}
template <typename T> KF_HD Dual<T> operator+(T s, const Dual<T>& x) { return dconst(s) + x; }
template <typename T> KF_HD Dual<T> operator/(T s, const Dual<T>& x) { return dconst(s) / x; }
template <typename T> KF_HD Dual<T> sqrt_(const Dual<T>& x) {
  Dual<T> r;
  r.v = std::sqrt(x.v);
  for (int k = 0; k < kCoeffs; ++k) r.d[k] = x.d[k] / (T(2) * r.v);
  return r;
}
template <typename T> KF_HD T sqrt_(T x) { return std::sqrt(x); }
// A constant of the same kind (scalar or dual) as the first argument.
template <typename T> KF_HD T cst(T, T v) { return v; }
template <typename T> KF_HD Dual<T> cst(const Dual<T>&, T v) { return dconst(v); }
// x·s, or for a dual number its value times s with its tangents kept (see make_plan's Range).
template <typename T> KF_HD T scale_value(T x, T s) { return x * s; }
template <typename T> KF_HD Dual<T> scale_value(Dual<T> x, T s) {
  x.v *= s;
  return x;
}
// √x whose value r was computed elsewhere (more accurately), its derivatives those of √x.
template <typename T> KF_HD T sqrt_given(T, T r) { return r; }
template <typename T> KF_HD Dual<T> sqrt_given(const Dual<T>& x, T r) {
  Dual<T> o;
  o.v = r;
  for (int k = 0; k < kCoeffs; ++k) o.d[k] = x.d[k] / (T(2) * r);
  return o;
}

// The scale σ = 2^-k of a neuron's (a, b, c) that brings the largest of them below 2^kScaleExp
// (1 if it is below already, or not finite). b², 4ac and the plan's products (S·c, S·q, Dd·c)
// overflow float for |a|, |b| or |c| past ~1e19 where the function itself is finite (a = 1e19,
// b = 1, c = -1e19 gave y = 1000 for t < 0 instead of 6.02, and NaN for t > 0). Roots,
// frequencies and homogeneous coefficients depend only on ratios of a, b, c, and the particular
// solution of the scaled equation σ(a y'' + b y' + c y) = σ·H is the one sought: so make_plan
// builds the plan from the scaled a, b, c and multiplies its particular coefficients (and the
// smooth step's 1/c) by σ. A power of two scales exactly; below the threshold nothing changes.
template <typename T>
KF_HD T range_scale(T a, T b, T c) {
  const T m = std::fmax(std::fabs(a), std::fmax(std::fabs(b), std::fabs(c)));
  if (!(m >= T(kScaleMin)) || !(m <= std::numeric_limits<T>::max())) return T(1);
  int e;
  std::frexp(m, &e);  // m = f·2^e, f in [0.5, 1)
  return std::ldexp(T(1), kScaleExp - e);
}

// Over-damped neurons with |b| > kDdRatio·S (|w1 − w2| = |b|/S) take the near-critical forms of
// Plan::dd: 0.6 % of neurons at the paper's init (a, b, c ~ U(0, 1)). Far from critical those forms
// cancel instead (a = 1.134, b = 1333.9, c = 0.0102, b/S ≈ 1: grad c 6× the float32 tolerance off),
// so a large part alone (kShiftPart) does not select them. Targeted fuzz (over-damped neurons, D in
// [0.01, 10], c1, c2 ~ N(0, 1), Triton under the interpreter): at 32, 5 of 286 were over the
// tolerance, up to 3.3× (a = 0.2837, b = 1.848, c = 3.0: b/S = 17); at 8, a = 4.0, b = −0.533,
// c = 0.0168 (b/S = 4.1) of another draw was 1.7×; at 4, none in three draws of ~380 (worst 0.16×).
constexpr double kDdRatio = 4.0;

// Per-neuron plan: the template coefficients of one neuron. S is a scalar or a Dual.
template <typename S>
struct PlanT {
  S hom[kBasis];
  S part[kBasis];
  S rho1, omega, rho2;
  // Coefficients on bases that stay smooth at critical damping, for the Jacobian (see
  // plan_with_jacobian), 0 in the other cases. sinc_hom, sinc_part: hom[6]·ω and part[6]·ω, of
  // E1·sin(ωt)/ω (under-damped, oscillator). dd_half, dd_q: the over-damped part
  // −(M1 + M2)/(2c) + (α/c)·(E1 − E2)/(ρ1 − ρ2), α = −b/(2a) (see Plan::dd).
  S sinc_hom, sinc_part;
  S dd_half, dd_q, dd_delta;
  bool part4_on_m1;  // the r = −b/a case: see Plan::m4
};

// The eleven cases of the spec (specs/deu.md), as template coefficients. Must agree with
// deu_reference() in python/kfuse/reference/deu.py; tests check every case through every
// backend against it.
template <typename S>
KF_HD PlanT<S> make_plan(S a, S b, S c, S c1, S c2) {
  using T = decltype(val(a));
  const S zero = cst(a, T(0));
  PlanT<S> p;
  for (int j = 0; j < kBasis; ++j) { p.hom[j] = zero; p.part[j] = zero; }
  p.rho1 = zero; p.omega = zero; p.rho2 = zero;
  p.sinc_hom = zero; p.sinc_part = zero;
  p.dd_half = zero; p.dd_q = zero; p.dd_delta = zero;
  p.part4_on_m1 = false;
  // The case is decided on the exact values, as the reference does in float64: a parameter is
  // zero when |p| < 0.01 exactly. In float that threshold rounds down (float(0.01) < 0.01), so
  // p = 0.01f is zero and the test is |p| <= float(0.01). D is computed in double, exact
  // enough near ±eps (b² and 4ac are exact there), and its value is the one √|D| takes: b² − 4ac
  // in float cancels for large a, c (a = 1000, b = 1897.3666, c = 900: D = −0.072, but NaN in
  // float, and so y for t > 0). (Testing |p| in double as well cost the
  // float NCHW forward kernel 9 registers, 48 -> 57: 4 blocks per SM instead of 5.)
  const T av = val(a), bv = val(b), cv = val(c);
  const auto is_zero = [](T v) {
    constexpr T eps = T(kEps);
    return double(eps) < kEps ? std::fabs(v) <= eps : std::fabs(v) < eps;
  };
  const bool za = is_zero(av), zb = is_zero(bv), zc = is_zero(cv);
  // Range: the cases run on (a, b, c)·σ (see range_scale) and the particular coefficients are
  // multiplied by σ at the end. The case itself is decided on the unscaled values. Dual numbers
  // keep their tangents: derivatives are taken with respect to the scaled a, b, c (products of σ
  // with small derivatives underflowed), and plan_with_jacobian scales those columns by σ.
  const T sigma = range_scale(av, bv, cv);
  a = scale_value(a, sigma);
  b = scale_value(b, sigma);
  c = scale_value(c, sigma);
  const S one = cst(a, T(1));
  if (za && zb && zc) {                       // identity
    p.hom[1] = one;
  } else if (za && zb) {                      // smooth step σ(100t)/c
    p.hom[3] = one / c;
  } else if (za && zc) {                      // ramp c1 + H t/b
    p.hom[0] = c1;
    p.part[1] = one / b;
  } else if (za) {                            // first order, k = c/b
    p.rho1 = -(c / b);
    p.hom[4] = c1;
    p.part[0] = one / c;
    p.part[4] = -(one / c);
  } else if (zb && zc) {                      // parabola
    p.hom[0] = c2;
    p.hom[1] = c1;
    p.part[2] = one / (T(2) * a);
  } else if (zb && av * cv > T(0)) {          // oscillator, w = √(c/a), w' = sign(a)·w
    p.omega = sqrt_(c / a);
    p.hom[4] = c1;
    p.hom[6] = (av > T(0) ? T(1) : T(-1)) * c2;  // sin(w't) = sign(a)·sin(wt)
    p.sinc_hom = p.hom[6] * p.omega;
    p.part[0] = one / c;
    p.part[4] = -(one / c);
  } else if (zb) {                            // hyperbolic, k = √(-c/a), k' = sign(a)·k
    const S kp = (av > T(0) ? T(1) : T(-1)) * sqrt_(-(c / a));
    p.rho1 = -kp;
    p.rho2 = kp;
    p.hom[4] = c1;
    p.hom[7] = c2;
    p.part[0] = one / c;
    p.part[4] = -(one / (T(2) * c));  // cosh(kt) = (E(kt) + E(-kt))/2, symmetric in ±k'
    p.part[7] = -(one / (T(2) * c));
  } else if (zc) {                            // r = -b/a
    p.rho1 = -(b / a);
    p.hom[0] = c2;
    p.hom[4] = -(a * c1 / b);
    p.part[1] = one / b;
    p.part[0] = -(a / (b * b));
    p.part[4] = a / (b * b);
    p.part4_on_m1 = true;
  } else {
    // D of the unscaled a, b, c in double (a float's square fits), and the square roots of the
    // scaled D·σ² from it.
    const double dv = double(bv) * bv - 4.0 * double(av) * cv;
    const S alpha = -(b / (T(2) * a));
    if (dv < -kEps) {                         // underdamped
      const S dd = sqrt_given(T(4) * a * c - b * b, T(std::sqrt(-dv) * sigma));  // see dv
      p.rho1 = alpha;
      p.omega = dd / (T(2) * a);
      p.hom[4] = c1;
      p.hom[6] = c2;
      p.part[0] = one / c;
      p.part[4] = -(one / c);
      p.part[6] = -(b / (dd * c));
      p.sinc_hom = c2 * p.omega;
      p.sinc_part = alpha / c;  // −(b/(Dd·c))·Dd/(2a)
    } else if (dv > kEps) {                   // overdamped
      // r1,2 = (-b ± S)/(2a) and the weights -(b ± S)/(2Sc), written without the difference
      // of b and S, which cancels when |b| >> sqrt|ac| (y 0.735 instead of 0.272 at x = 500 for
      // a = 0.0101, b = 1000, c = 1): with q = -(b + sign(b)·S)/2 the roots are q/a and c/q.
      const S s = sqrt_given(b * b - T(4) * a * c, T(std::sqrt(dv) * sigma));
      const bool bpos = bv >= T(0);
      const S q = T(0.5) * (bpos ? -(b + s) : s - b);
      const S fast = q / a, slow = c / q;  // slow = the root that cancelled
      p.rho1 = bpos ? slow : fast;
      p.rho2 = bpos ? fast : slow;
      p.hom[4] = c2;
      p.hom[7] = c1;
      p.part[0] = one / c;
      p.part[4] = bpos ? q / (s * c) : a / (s * q);
      p.part[7] = bpos ? -(a / (s * q)) : -(q / (s * c));
      p.dd_half = -(one / (T(2) * c));  // see Plan::dd: w1 + w2 = 1, w1 − w2 = b/S
      p.dd_q = alpha / c;
      p.dd_delta = s / a;  // ρ1 − ρ2, without their difference
    } else {                                  // critical, r = -b/(2a)
      p.rho1 = alpha;
      p.hom[4] = c2;
      p.hom[5] = c1;
      p.part[0] = one / c;
      p.part[4] = -(one / c);
      p.part[5] = alpha / c;
    }
  }
  for (int j = 0; j < kBasis; ++j) p.part[j] = sigma * p.part[j];  // see range_scale
  p.sinc_part = sigma * p.sinc_part;
  p.dd_half = sigma * p.dd_half;
  p.dd_q = sigma * p.dd_q;
  p.hom[3] = sigma * p.hom[3];
  // A NaN or infinite a, b or c makes the whole activation NaN, as in the reference (the tests
  // above take NaN for "not zero", and the cases leave parts of the plan finite, e.g. the
  // overdamped roots c/q, q/a for b = -inf); so does an infinite frequency (c/a overflowing):
  // the reference's cos(±inf) is NaN at every t, while the CPU's vector sincos bounds its input.
  const auto finite = [](T v) { return std::fabs(v) <= std::numeric_limits<T>::max(); };  // not NaN/inf
  if (!finite(av) || !finite(bv) || !finite(cv) || !finite(val(p.omega)))
    p.hom[0] = p.hom[0] + cst(a, std::numeric_limits<T>::quiet_NaN());
  return p;
}

// Plan in evaluation form: coefficients for each side of t = 0, plus flags that let the
// element loop skip terms no case of this neuron uses.
//
// m4, m7: the particular E1 and E2 coefficients part[4], part[7] on M1 = E1 − 1 and M2 = E2 − 1
// (from expm1) for t > 0, the part's constant part[0] + part[4] + part[7] (0 for every θ, see
// part_shifted) left out of pos[0], and pos[4], pos[7] the homogeneous coefficients alone; for
// the r = −b/a case, and for ω = 0 neurons whose part coefficients exceed kShiftPart. 0
// elsewhere. The r = −b/a case's part t/b − (a/b²)(1 − E1) is ~t²/(2a) where ρ1·t is small: from
// the constants −a/b² and a/b²·E1 it erred by ε·|a|/b² (float32 median relative error 2.4 at
// |a|/b² = 1e4), from M1 by ε·|t/b|, as the reference (bench/deu_r_case.py). A near-critical
// over-damped neuron with |a| >> 1 and small c has constants ~|b|/(S·c) ~ 1e4 that cancel for
// small t (a = 375902, b = −122.6, c = 0.01: y 78× the float32 tolerance off; mpmath-judged
// fuzz). Such neurons' term mask has kTermPoly, under which the element code adds m4·M1 + m7·M2
// (see plan_terms); the others' code skips them.
//
// dd: a near-critical over-damped neuron (|b| > kDdRatio·S) takes its part on M1, M2 as well, and its
// backward takes it as −(M1 + M2)/(2c) + Q·DD with
// DD = (E1 − E2)/δ, δ = ρ1 − ρ2, Q = α/c (both ·σ): its weights w1,2/c = (1/2 ± b/(2S))/c, ~1e4,
// and the roots' ∂/∂c = ∓1/S gave grad c terms ~|a·b|/S³ that cancel (a = 392293, b = −125.8,
// c = 0.0101: 110× the float32 tolerance; with c1, c2 ≠ 0 up to ~3000×, targeted fuzz). The
// coefficients −1/(2c) and Q stay bounded as S → 0, and DD and its ∂/∂ρ1, ∂/∂ρ2 come from a series
// where the roots are close (divided_difference). Such a neuron has ω = 0, so the forward multiplies
// basis 6 by sin 0 = 0: pos[6] holds Q and neg[6] holds δ (from S/a: ρ1 − ρ2 rounded cancels).
template <typename T>
struct Plan {
  T neg[kBasis];  // t <= 0
  T pos[kBasis];  // t > 0
  T rho1, omega, rho2;
  T l1, l2;       // ρ1·log2(e), ρ2·log2(e): the base-2 rates of forward_fast
  T m4, m7;       // see above (ω = 0 wherever they are not 0)
  bool trig, step, e2;
};

// See Plan::m4: part coefficients above this (in magnitude) are evaluated on M1, M2. The
// constants' rounding, ε·|part|, stays below a tenth of the float32 tolerance (5e-5) under it.
constexpr double kShiftPart = 64.0;

constexpr double kLog2e = 1.4426950408889634;

// ρ·log2(e), saturated at the largest finite value rather than overflowing for a finite ρ
// (an infinite rate times t = 0 would be NaN where ρ·0 is 0).
template <typename T>
KF_HD T base2_rate(T rho) {
  const T l = rho * T(kLog2e), big = std::numeric_limits<T>::max();
  return (std::fabs(l) <= big || !(std::fabs(rho) <= big)) ? l : (rho > T(0) ? big : -big);
}

template <typename T>
KF_HD Plan<T> eval_plan(const PlanT<T>& q) {
  Plan<T> p;
  for (int j = 0; j < kBasis; ++j) { p.neg[j] = q.hom[j]; p.pos[j] = q.hom[j] + q.part[j]; }
  p.m4 = T(0);
  p.m7 = T(0);
  const auto big = [](T v) { return std::fabs(v) > T(kShiftPart); };
  // Over-damped (δ != 0), and near critical: |b|/S = |ρ1 + ρ2|/δ (see kDdRatio, Plan::dd).
  const bool over = q.dd_delta != T(0);
  const bool near = over && std::fabs(q.rho1 + q.rho2) > T(kDdRatio) * std::fabs(q.dd_delta);
  if (q.part4_on_m1 || near || (q.omega == T(0) && (big(q.part[0]) || big(q.part[4]) || big(q.part[7])))) {
    p.pos[0] = q.hom[0];  // see Plan::m4
    p.pos[4] = q.hom[4];
    p.pos[7] = q.hom[7];
    p.m4 = q.part[4];
    p.m7 = q.part[7];
    if (near) {  // see Plan::dd
      p.pos[6] = q.dd_q;
      p.neg[6] = q.dd_delta;
    }
  }
  p.rho1 = q.rho1; p.omega = q.omega; p.rho2 = q.rho2;
  p.l1 = base2_rate(q.rho1); p.l2 = base2_rate(q.rho2);
  p.trig = q.omega != T(0);
  p.step = q.hom[3] != T(0);
  // ρ2 too: the backward needs E2 for hom[7]'s row (∂/∂c1 of the over-damped case) when the
  // coefficients are 0 (c1 = 0, and part[7] ~ a/b² underflowing: a = 1, b = 1e23 gave grad c1 = 0
  // instead of 1.2e6; bug hunt).
  p.e2 = q.hom[7] != T(0) || q.part[7] != T(0) || q.rho2 != T(0);
  return p;
}

// Plan::dd: a near-critical over-damped neuron whose backward takes its part on DD.
template <typename T>
KF_HD bool is_dd(const Plan<T>& p) {
  return !p.trig && p.pos[6] != T(0);
}

template <typename T>
KF_HD Plan<T> plan_from_coeffs(const T* co) {
  return eval_plan(make_plan<T>(co[0], co[1], co[2], co[3], co[4]));
}

// Plan plus its Jacobian jac[i][k] = ∂π_i/∂θ_k (π in the order hom, part, ρ1, ω, ρ2).
// The particular solutions are 1 − E-like: H·(1 − E1·cos ωt)/c, H·(1 − w1·E1 − w2·E2)/c, ...,
// part[0] = −(part[4] + part[7]): the particular part is 0 at t = 0+ in every case. Summed per
// basis function, Σg and Σg·E1·cos cancelled in ∂/∂c where E1·cos ≈ 1 (|t| small, c near eps):
// the first-order case's grad c was 34× the float32 tolerance off, and Σg/c² overflowed to
// inf − inf = NaN for g ~ 1e35. So the part is written on the shifted bases,
// π0 + π4·B4 + π7·B7 = (π0 + π4 + π7) + π4·(B4 − 1) + π7·(B7 − 1), whose constant is 0 for every
// θ: its Jacobian row is 0, and the part's constant needs no sum (backward_one skips it). The row
// is taken as 0, not summed from the three: in the overdamped case (1/c + q/(S·c) − a/(S·q)) the
// sum left a rounding residue ~ε/c² that gave grad c a constant error per element with t > 0
// (a = 1.134, b = 1333.9, c = 0.0102: 2⁻¹⁰, 20× the float32 tolerance). That needs B4 − 1 and
// B7 − 1 accurate where they are small: see backward_one.
constexpr bool part_shifted(int j) { return j == 4 || j == 7; }

template <typename T>
KF_HD Plan<T> plan_with_jacobian(const T* co, T jac[kPlanParams][kCoeffs]) {
  Dual<T> th[kCoeffs];
  for (int k = 0; k < kCoeffs; ++k) {
    th[k] = dconst(co[k]);
    th[k].d[k] = T(1);
  }
  const PlanT<Dual<T>> q = make_plan(th[0], th[1], th[2], th[3], th[4]);
  PlanT<T> qv;
  for (int j = 0; j < kBasis; ++j) {
    qv.hom[j] = q.hom[j].v;
    qv.part[j] = q.part[j].v;
    for (int k = 0; k < kCoeffs; ++k) {
      jac[j][k] = q.hom[j].d[k];
      jac[kBasis + j][k] = q.part[j].d[k];
    }
  }
  qv.rho1 = q.rho1.v; qv.omega = q.omega.v; qv.rho2 = q.rho2.v;
  qv.part4_on_m1 = q.part4_on_m1;
  qv.dd_q = q.dd_q.v;
  qv.dd_delta = q.dd_delta.v;
  for (int k = 0; k < kCoeffs; ++k) {
    jac[2 * kBasis][k] = q.rho1.d[k];
    jac[2 * kBasis + 1][k] = q.omega.d[k];
    jac[2 * kBasis + 2][k] = q.rho2.d[k];
    jac[kBasis][k] = T(0);  // the part's constant, 0 for every θ: see part_shifted
  }
  // E1·sin(ωt)'s rows on the basis E1·sin(ωt)/ω, whose coefficients hom[6]·ω, part[6]·ω stay
  // bounded as ω → 0 (part[6]·ω = −b/(2ac) for the under-damped case) while part[6] = −b/(Dd·c)
  // grows as 1/Dd: near critical damping (Dd → 0, |a| ≫ 1) ∂part[6]/∂c ~ 1/Dd³ and the ω row's
  // ~1/Dd cancelled to 1e-12 of their size (a = 568783.8, b = −785.83, c = 0.2714, t = 0.5056:
  // Triton's grad c −0.0078 for mpmath's −4.8e-8, 156× the float32 tolerance; bug hunt). On this
  // basis the ω accumulator's sin(ωt) term becomes t·(cos ωt − sin(ωt)/(ωt)) (backward_one), which
  // cos_minus_sinc evaluates without that cancellation. (Σ g·E1·sin(ωt))·∂(π·ω)/∂θ/ω: rows / ω.
  if (qv.omega != T(0)) {
    const T inv = T(1) / qv.omega;
    for (int k = 0; k < kCoeffs; ++k) {
      jac[6][k] = q.sinc_hom.d[k] * inv;
      jac[kBasis + 6][k] = q.sinc_part.d[k] * inv;
    }
  }
  const Plan<T> ev = eval_plan(qv);
  if (is_dd(ev)) {  // the part on M1, M2 and DD (Plan::dd): σ-scaled below with the other rows
    for (int k = 0; k < kCoeffs; ++k) {
      jac[kBasis + 4][k] = q.dd_half.d[k];
      jac[kBasis + 7][k] = q.dd_half.d[k];
      jac[kBasis + 6][k] = q.dd_q.d[k];
    }
  }
  // make_plan differentiated with respect to (a, b, c)·σ: ∂/∂a = σ·∂/∂(σa) (see its Range).
  const T sigma = range_scale(co[0], co[1], co[2]);
  if (sigma != T(1)) {
    for (int i = 0; i < kPlanParams; ++i)
      for (int k = 0; k < 3; ++k) jac[i][k] *= sigma;
  }
  return ev;
}

// Transcendentals of the element loop. On the GPU in float they use the hardware
// approximations (MUFU ex2 / rcp / sin / cos: one special-function op each) instead of libm's
// precise versions (~10 and ~40 instructions, with a slow path for large arguments), so the
// kernels stay memory-bound; double precision, and the CPU, keep the precise functions.
// ex2.approx.ftz is the MUFU op behind __expf without its 3-instruction fix-up for results
// below 2^-126 (flushed to 0 here, far below any tolerance); rcp.approx.ftz replaces an IEEE
// division with its slow path. Errors: exp within ~2 ulp for |z| <= 14 (as __expf); sincos
// within ~5e-7 absolute on [-π, π], where a Cody-Waite reduction puts the argument first.
// Define KFUSE_DEU_PRECISE_MATH to use the precise functions on the GPU too
// (bench/deu_cuda_micro.cu times both).
#if defined(__CUDA_ARCH__) && !defined(KFUSE_DEU_PRECISE_MATH)
#define KF_DEU_FAST_MATH 1
#endif
KF_HD double exp_(double z) { return std::exp(z); }
// E − 1: libm's expm1 everywhere (CUDA's expm1f, ~1 ulp). Plan::m4's basis in the forward (only
// elements of kTermPoly code pay for it) and the shifted bases of the backward (part_shifted).
template <typename T> KF_HD T expm1_(T z) { return std::expm1(z); }
KF_HD double rcp_(double x) { return 1.0 / x; }
KF_HD void sincos_(double x, double* s, double* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
KF_HD float exp2_(float z) {  // 2^z
#ifdef KF_DEU_FAST_MATH
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(z));
  return r;
#else
  return std::exp2(z);
#endif
}
KF_HD float exp_(float z) {
#ifdef KF_DEU_FAST_MATH
  return exp2_(z * float(kLog2e));
#else
  return std::exp(z);
#endif
}
KF_HD float rcp_(float x) {
#ifdef KF_DEU_FAST_MATH
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return 1.0f / x;
#endif
}
KF_HD void sincos_(float x, float* s, float* c) {
#ifdef KF_DEU_FAST_MATH
  const float q = rintf(x * 0.15915494309189535f);      // x = q·2π + r, |r| <= π
  const float r = fmaf(q, 1.7484556000744883e-07f, fmaf(-q, 6.28318548202514648f, x));
  __sincosf(r, s, c);
#else
  *s = std::sin(x);
  *c = std::cos(x);
#endif
}

// Optional terms of the template, as bits of a compile-time mask kTerms. A clear bit promises
// that the neuron's coefficients of those basis functions are 0 on both sides of t = 0 (and
// hence, case by case, that their Jacobian rows are 0 too), and drops their code. The GPU
// kernels pick the mask per warp (the union over its neurons, see plan_terms): the common
// neurons (the general, oscillator, hyperbolic and first-order cases) use none of them, and
// predicated code still costs every element its issue slots (the step's sigmoid alone, 2 MUFU
// ops and ~6 instructions). with_mask turns a run-time mask into kTerms.
constexpr int kTermStep = 1;  // σ(100t) (basis 3): the smooth step
constexpr int kTermPoly = 2;  // t, t² (basis 1, 2), m4·M1 + m7·M2: identity, ramp, parabola, Plan::m4
constexpr int kTermTE1 = 4;   // t·E1·cos ωt (basis 5): critical damping
constexpr int kAllTerms = kTermStep | kTermPoly | kTermTE1;

template <typename T>
KF_HD int plan_terms(const Plan<T>& p) {
  const auto used = [&](int j) { return p.neg[j] != T(0) || p.pos[j] != T(0); };
  const bool poly = used(1) || used(2) || p.m4 != T(0) || p.m7 != T(0);
  return (p.step ? kTermStep : 0) | (poly ? kTermPoly : 0) | (used(5) ? kTermTE1 : 0);
}

// f(std::integral_constant<int, m>{}) for a run-time mask m of the bits of kAll (the term
// masks here; deu_cpu_simd.h's block flags): the element code compiled for exactly the terms a
// neuron, a warp (CUDA) or a block of lanes (CPU SIMD) uses. Always inlined, also on the host:
// the CPU callers are compiled per ISA (target_clones) and the code behind the dispatch must be
// compiled with their ISA.
template <int kAll, typename F, int... kMasks>
KF_HD_INLINE void with_mask_of(int m, F&& f, std::integer_sequence<int, kMasks...>) {
  (void)((m == kMasks && (f(std::integral_constant<int, kMasks>{}), true)) || ...);
}
template <int kAll = kAllTerms, typename F>
KF_HD_INLINE void with_mask(int m, F&& f) {
  static_assert((kAll & (kAll + 1)) == 0, "with_mask covers the masks 0..kAll");
  with_mask_of<kAll>(m & kAll, f, std::make_integer_sequence<int, kAll + 1>{});
}

// Values of the template's transcendental pieces at one t.
template <typename T>
struct Pieces {
  T e1, cs, sn, e2, sig;
  T m1, m2;         // E1 − 1, E2 − 1 (kTermPoly code only; Plan::m4)
  bool cap1, cap2;  // the exponent hit the cap (its derivative is then 0)
};

template <int kTerms = kAllTerms, typename T>
KF_HD Pieces<T> pieces(const Plan<T>& p, T t) {
  Pieces<T> q;
  const T cap = T(kExpCap);
  const T z1 = p.rho1 * t;
  q.cap1 = z1 > cap;
  q.e1 = exp_(q.cap1 ? cap : z1);
  q.m1 = (kTerms & kTermPoly) ? expm1_(q.cap1 ? cap : z1) : T(0);
  if (p.trig) {
    sincos_(p.omega * t, &q.sn, &q.cs);
  } else {
    q.cs = T(1);
    q.sn = T(0);
  }
  const T z2 = p.rho2 * t;
  q.cap2 = z2 > cap;
  q.e2 = p.e2 ? exp_(q.cap2 ? cap : z2) : T(0);
  q.m2 = (kTerms & kTermPoly) && p.e2 ? expm1_(q.cap2 ? cap : z2) : T(0);
  q.sig = (kTerms & kTermStep) && p.step ? rcp_(T(1) + exp_(-T(kStepSlope) * t)) : T(0);
  return q;
}

template <typename T>
KF_HD T clamp_out(T y) {
  const T m = T(kOutClamp);
  return y < -m ? -m : (y > m ? m : y);
}

// The coefficients of t's side of 0 (m, m7: Plan::m4, m7 for t > 0). Selected by value, not as a
// pointer to p.pos/p.neg: a pointer select forces nvcc to spill the whole plan to local memory
// (8+ ld.local per element in the hot loop, seen in the PTX of the first CUDA kernels).
template <typename T>
struct Side {
  T k[kBasis];
  T m, m7;
};

template <typename T>
KF_HD Side<T> side_of(const Plan<T>& p, bool pos) {
  Side<T> s;
  for (int j = 0; j < kBasis; ++j) s.k[j] = pos ? p.pos[j] : p.neg[j];
  s.m = pos ? p.m4 : T(0);
  s.m7 = pos ? p.m7 : T(0);
  return s;
}

// y(t) before the output clamp, from t's side s. Terms are added only where kTerms says they
// may exist: x + 0 is not x in IEEE arithmetic, so a compiler keeps an added zero. Without the
// t, t² terms, t - t (0, or NaN for t = ±inf or NaN) keeps ±inf giving NaN, as t·0 did;
// kTrigAlways says sin and cos were evaluated at every t, NaN at ±inf, which then does that
// already. m·M1 goes in with the t term it nearly cancels, then m7·M2 (Plan::m4).
template <int kTerms = kAllTerms, bool kTrigAlways = false, typename T>
KF_HD T eval_raw(const Side<T>& s, const Pieces<T>& q, T t) {
  const T* k = s.k;
  T y = (kTerms & kTermPoly) ? k[0] + ((t * (k[1] + t * k[2]) + s.m * q.m1) + s.m7 * q.m2)
                             : (kTrigAlways ? k[0] : k[0] + (t - t));
  if (kTerms & kTermStep) y += k[3] * q.sig;
  const T lin = (kTerms & kTermTE1) ? k[4] + k[5] * t : k[4];
  return y + q.e1 * (lin * q.cs + k[6] * q.sn) + k[7] * q.e2;
}

// The forward's element code for float on the GPU: the same function as pieces + eval_raw +
// clamp_out, in fewer instructions. In sm_90 SASS of the rows kernel's common loop (term mask
// 0) an element's arithmetic took ~35 instructions in the generic form, ~27 in these:
//  * every exponential in base 2 with log2(e) folded into the plan's rates (l1, l2); ex2
//    needed an FMUL by log2(e) per exponential per element;
//  * sin/cos and E2 at every element, whether the neuron uses them or not: a warp mixing
//    neurons with and without them (under- and overdamped neurons, ~3 to 1 at the paper's
//    init) issues both anyway, predicated, and then also moves each predicated result's default
//    in. ω = 0 gives sin 0 = 0 and cos 0 = 1, ρ2 = 0 gives E2 = 1 against k7 = 0: the same y;
//  * without eval_raw's t - t: sin and cos of ±inf are NaN, hence y;
//  * the clamp as NaN-keeping max/min (max.NaN, min.NaN: sm_80+), not compare, min and select.
// KFUSE_DEU_FAST_FORMS builds these forms with the host's exp2/sin/cos, so that the CUDA
// emulator tests (tests/cuda_emu) run them on the CPU.
#if defined(KF_DEU_FAST_MATH) || defined(KFUSE_DEU_FAST_FORMS)
#define KF_DEU_FAST_FORMS 1
KF_HD float clamp_out_nan(float y) {
#ifdef KF_DEU_FAST_MATH
  const float m = float(kOutClamp);
  asm("max.NaN.f32 %0, %0, %1;" : "+f"(y) : "f"(-m));
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(y) : "f"(m));
  return y;
#else
  return clamp_out(y);
#endif
}

template <int kTerms>
KF_HD float forward_fast(const Plan<float>& p, const Side<float>& s, float t) {
  const float cap = float(kExpCap * kLog2e);
  const float z1 = p.l1 * t, z2 = p.l2 * t;
  Pieces<float> q;
  q.e1 = exp2_(z1 > cap ? cap : z1);
  q.e2 = exp2_(z2 > cap ? cap : z2);
  q.m1 = 0.0f;
  q.m2 = 0.0f;
  if (kTerms & kTermPoly) {  // M1, M2 from the natural rates: expm1 of a base-2 exponent would round them
    const float n1 = p.rho1 * t, n2 = p.rho2 * t;
    q.m1 = expm1_(n1 > float(kExpCap) ? float(kExpCap) : n1);
    q.m2 = expm1_(n2 > float(kExpCap) ? float(kExpCap) : n2);
  }
  sincos_(p.omega * t, &q.sn, &q.cs);
  q.sig = (kTerms & kTermStep) && p.step ? rcp_(1.0f + exp_(-float(kStepSlope) * t)) : 0.0f;
  return clamp_out_nan(eval_raw<kTerms, true>(s, q, t));
}
#endif

template <int kTerms = kAllTerms, typename T>
KF_HD T forward_one(const Plan<T>& p, T t) {
  const Side<T> s = side_of(p, t > T(0));
#ifdef KF_DEU_FAST_FORMS
  if constexpr (std::is_same<T, float>::value) return forward_fast<kTerms>(p, s, t);
#endif
  return clamp_out(eval_raw<kTerms>(s, pieces<kTerms>(p, t), t));
}

// Σ_{n≥1} 2n·zⁿ⁻¹/(2n+1)! = 1/3 + z/30 + z²/840 + ...: x·series23(x²) = d/dx(sinh(x)/x), and
// −x²·series23(−x²) = cos x − sin(x)/x. Used for |z| <= 1/4, where the terms left out are below
// 2⁻⁵⁶ of the sum (float: 2⁻²⁸).
template <typename T>
KF_HD T series23(T z) {
  T s = T(0);
  if (!std::is_same<T, float>::value) {
    s = T(1.0 / 93405312000.0);
    s = s * z + T(1.0 / 518918400.0);
    s = s * z + T(1.0 / 3991680.0);
    s = s * z;
  }
  s = s + T(1.0 / 45360.0);
  s = s * z + T(1.0 / 840.0);
  s = s * z + T(1.0 / 30.0);
  return s * z + T(1.0 / 3.0);
}

// sinh(x)/x = Σ zⁿ/(2n+1)! at z = x², |z| <= 1/4 (terms left out below 2⁻⁵⁶, float: 2⁻²⁷).
template <typename T>
KF_HD T sinhc_series(T z) {
  T s = T(0);
  if (!std::is_same<T, float>::value) {
    s = T(1.0 / 1307674368000.0);
    s = s * z + T(1.0 / 6227020800.0);
    s = s * z + T(1.0 / 39916800.0);
    s = s * z + T(1.0 / 362880.0);
    s = s * z;
  }
  s = s + T(1.0 / 5040.0);
  s = s * z + T(1.0 / 120.0);
  s = s * z + T(1.0 / 6.0);
  return s * z + T(1);
}

// cos x − sin(x)/x (= x·d/dx(sin(x)/x)), with sn = sin x, cs = cos x: by series below |x| = 1/2,
// where the difference cancels (it is −x²/3 + ...); 0 at x = 0. Beyond, the difference loses at
// most a factor 12 of its inputs' accuracy.
template <typename T>
KF_HD T cos_minus_sinc(T x, T sn, T cs) {
  const T x2 = x * x;
  return std::fabs(x) < T(0.5) ? -x2 * series23(-x2) : cs - sn * rcp_(x);  // (GPU: MUFU rcp, not a division)
}

// Plan::dd's DD = (E1 − E2)/δ and its ∂/∂ρ1, ∂/∂ρ2, from the pieces at t (m1, m2: E1 − 1, E2 − 1).
// Where neither exponent is capped and |κt| < 1/2 (κ = δ/2), DD = t·e^(αt)·sinh(κt)/(κt) with
// α = (ρ1 + ρ2)/2 and e^(αt) = √(E1·E2), and ∂/∂ρ1,2 = (t·DD ± t²·e^(αt)·d/dx(sinh(x)/x))/2 from
// series: as differences of E1 and E2 they cancel by |κt|. Elsewhere the differences themselves
// (E1/E2 = e^(2κt) is at least e apart, or an exponent is capped: its derivative is 0).
template <typename T>
KF_HD void divided_difference(T delta, T t, const Pieces<T>& q, T m1, T m2, T* dd, T* d1, T* d2) {
  const T x = T(0.5) * delta * t;
  if (!q.cap1 && !q.cap2 && std::fabs(x) < T(0.5)) {
    const T tea = t * std::sqrt(q.e1 * q.e2);
    const T x2 = x * x;
    *dd = tea * sinhc_series(x2);
    const T w = t * (tea * (x * series23(x2)));
    *d1 = T(0.5) * (t * *dd + w);
    *d2 = T(0.5) * (t * *dd - w);
  } else {
    const T inv = rcp_(delta);
    *dd = (m1 - m2) * inv;
    *d1 = ((q.cap1 ? T(0) : t * q.e1) - *dd) * inv;
    *d2 = (*dd - (q.cap2 ? T(0) : t * q.e2)) * inv;
  }
}

// Backward for one element with upstream gradient g: returns ∂L/∂t and adds ∂L/∂π into
// acc (length kPlanParams, same order as the Jacobian rows; part_shifted bases for the part's
// exponentials). The accumulators of terms
// kTerms leaves out are left alone: their Jacobian rows are 0 for such neurons.
template <int kTerms = kAllTerms, typename T>
KF_HD T backward_one(const Plan<T>& p, T t, T g, T* acc) {
  constexpr bool kStep = kTerms & kTermStep, kPoly = kTerms & kTermPoly, kTE1 = kTerms & kTermTE1;
  const Pieces<T> q = pieces<kTerms>(p, t);
  const bool pos = t > T(0);
  const Side<T> s = side_of(p, pos);
  const T* k = s.k;
  const T yraw = eval_raw<kTerms>(s, q, t);
  const T m = T(kOutClamp);
  // The clamp's derivative is 0 outside [-m, m]; a NaN (from NaN coefficients) is not outside: it
  // reaches the gradients, as it does in the reference, instead of giving 0 for the neuron.
  if (yraw < -m || yraw > m) return T(0);
  const T basis[kBasis] = {T(1), t, t * t, q.sig, q.e1 * q.cs, t * q.e1 * q.cs, q.e1 * q.sn, q.e2};
  // B4 − 1 and B7 − 1 (part_shifted), from expm1 of the (capped) exponents: B4 − 1 = M1 where
  // ω = 0 (cos = 1), M1·cos + (cos − 1) where ω != 0, cos − 1 as −sin²/(1 + cos) where cos > 0
  // (an under-damped neuron with c just outside the zero band, a = −1.65, b = 0.01, c = −0.0100000026,
  // t = 2.3e-5: E1·cos − 1 by subtraction made grad c 10-14× the float32 tolerance off; bug hunt).
  // Formed as E − 1 they erred by ε absolutely, and the part's
  // Jacobian (~1/c²) carried that into the parameter gradients, where its terms cancel against
  // the roots' (a = 2, b = 0.5, c = 0.0105: grad c 15× the float32 tolerance off, also from E − 1
  // of the faster root; a = 1, b = 1e20, c = 1 has the slow root −1e-20, whose E − 1 rounds to
  // 0). A Taylor polynomial below |z| = 1/16 and E − 1 beyond (7 instructions on the GPU, not
  // expm1f's ~20) still erred 1.3× the tolerance there. The r = −b/a case's (ω = 0) is kTermPoly's
  // M1 (as E1 − 1 it made grad a, b ε·2|a|/|b|³ off: 24× the tolerance at a = 2, b = −0.0101).
  const T cap = T(kExpCap), z1 = p.rho1 * t, z2 = p.rho2 * t;
  const T m1 = kPoly ? q.m1 : expm1_(q.cap1 ? cap : z1);
  const T m2 = kPoly ? q.m2 : (p.e2 ? expm1_(q.cap2 ? cap : z2) : T(0));
  const T cosm1 = q.cs > T(0) ? -(q.sn * q.sn) / (T(1) + q.cs) : q.cs - T(1);
  const T shifted[2] = {p.trig ? m1 * q.cs + cosm1 : m1, m2};
  for (int j = 0; j < kBasis; ++j) {
    if ((!kPoly && (j == 1 || j == 2)) || (!kStep && j == 3) || (!kTE1 && j == 5)) continue;
    const T gb = g * basis[j];
    acc[j] += gb;
    if (pos && j != 0) acc[kBasis + j] += part_shifted(j) ? g * shifted[j == 7] : gb;  // no part[0]: its row is 0
  }
  // E1's and E2's whole coefficients: m·M1 has m·E1 as derivative (Plan::m4; ω = 0 where m != 0).
  const T k4 = kPoly ? k[4] + s.m : k[4];
  const T k7 = kPoly ? k[7] + s.m7 : k[7];
  const T lin = kTE1 ? k4 + k[5] * t : k4;
  const T osc = lin * q.cs + k[6] * q.sn;          // e1-bracket
  const T dosc = -lin * q.sn + k[6] * q.cs;        // its derivative w.r.t. (ω t)
  const T r1 = q.cap1 ? T(0) : p.rho1;
  const T r2 = q.cap2 ? T(0) : p.rho2;
  const T te1 = t * q.e1;  // t·E first: g·t may overflow where E is 0
  // The rates' accumulators take E1's and E2's coefficients; a Plan::dd neuron's part is
  // −(M1 + M2)/(2c) + Q·DD there (ω = 0: cos = 1, sin = 0), with (m4 + m7)/2 = −σ/(2c).
  T c1 = osc, c2 = k7;
  if (kPoly && pos && is_dd(p)) {  // (a branch: the common code, without kTermPoly, has no trace of it)
    T ddv, d1, d2;
    divided_difference(p.neg[6], t, q, m1, m2, &ddv, &d1, &d2);
    const T half = T(0.5) * (s.m + s.m7);
    c1 = k[4] + half;
    c2 = k[7] + half;
    acc[kBasis + 6] += g * ddv;
    acc[2 * kBasis] += g * (k[6] * d1);
    acc[2 * kBasis + 2] += g * (k[6] * d2);
  }
  acc[2 * kBasis] += q.cap1 ? T(0) : g * te1 * c1;
  // ∂/∂ω with E1·sin(ωt)/ω as basis 6 (see plan_with_jacobian): its k[6]·ω coefficient is held.
  acc[2 * kBasis + 1] += g * te1 * (k[6] * cos_minus_sinc(p.omega * t, q.sn, q.cs) - lin * q.sn);
  acc[2 * kBasis + 2] += q.cap2 ? T(0) : g * (t * q.e2) * c2;
  T dy = q.e1 * (r1 * osc + p.omega * dosc) + k7 * r2 * q.e2;
  if (kPoly) dy += k[1] + T(2) * k[2] * t;
  if (kStep) dy += k[3] * T(kStepSlope) * q.sig * (T(1) - q.sig);
  if (kTE1) dy += q.e1 * k[5] * q.cs;
  return g * dy;
}

// ∂L/∂θ_k = Σ_i acc[i]·jac[i][k], skipping structurally-zero Jacobian entries: a basis
// accumulator the neuron does not use (e.g. Σ g·t² with |t| > 1e19, inf in float) must not
// turn a parameter gradient into 0·inf = NaN.
template <typename T>
KF_HD void apply_jacobian(const T* acc, const T jac[kPlanParams][kCoeffs], T* out) {
  for (int k = 0; k < kCoeffs; ++k) {
    T s = T(0);
    for (int i = 0; i < kPlanParams; ++i) {
      if (jac[i][k] != T(0)) s += acc[i] * jac[i][k];
    }
    out[k] = s;
  }
}

}  // namespace deu
}  // namespace kfuse
