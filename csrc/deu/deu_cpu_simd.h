// SIMD form of the DEU element math for the float CPU kernels (deu_cpu.cpp).
//
// This is the same template as deu_math.h's Plan / pieces / eval_raw / backward_one (that
// file stays the single source of the per-neuron plan, its Jacobian and the scalar f64
// path), evaluated on W lanes at once (Lanes<W>) with GCC vector extensions:
//   * lanes are W neurons (x viewed as [M, N, 1]) or W positions of one neuron (K > 1);
//   * the case logic is already folded into the plan, so the lane code is branch-free:
//     the side of t = 0, the exponent cap and the output clamp are selects;
//   * exp and sincos are branch-free polynomials (Cephes expf / sinf / cosf minimax
//     coefficients with Cody-Waite range reduction), ~1-2 ulp in float, since glibc's
//     vector libm is only reachable with -ffast-math;
//   * terms a whole block of lanes does not use (trig, second exponential, smooth step,
//     Plan::m4's E1 − 1) are compiled out through template flags, chosen per block at run time.
// deu_cpu.cpp builds the callers once per ISA, each with its registers' width W (cpu_isa.h's
// pick_isa), so the .so runs everywhere. Everything here is always_inline so it is compiled with
// the ISA of the entry that calls it.
#pragma once

#include <cstdint>
#include <cstring>

#include "deu_math.h"

namespace kfuse {
namespace deu {
namespace simd {

#define KF_SIMD inline __attribute__((always_inline))

// Neurons per block of the plans' layout and flags (FloatPlans in deu_cpu.cpp), whatever the lanes.
constexpr int kBlock = 16;

// Per-lane-block flags: which optional terms some lane of the block uses.
// kDD: a Plan::dd lane (then kM1 and kE2 too), for the backward only (kFwdFlags): its divided
// differences cost a block ~2× (a microbenchmark of a kTrig|kE2|kM1 block), which blocks holding only
// other kM1 lanes (r = −b/a, ~1 % of neurons at the paper's init) do not pay.
enum : int { kTrig = 1, kE2 = 2, kStep = 4, kM1 = 8, kDD = 16, kFwdFlags = 15, kAllFlags = 31 };
// f(std::integral_constant<int, m>{}) for the backward's block flags m: a flag with kDD is widened to
// kM1 | kE2 too, so only the 16 masks without kDD and the 4 with kDD | kM1 | kE2 are compiled (20
// vbackward instantiations per call site instead of 32; kDD had doubled deu_cpu.cpp's build). Exact:
// a block's flags are already a superset of each lane's (their OR), every lane carrying zero
// coefficients for the terms it lacks, and a dd lane's code uses both anyway.
template <typename F>
KF_SIMD void with_bwd_flags(int m, F&& f) {
  if (m & kDD) m |= kM1 | kE2;
  with_mask_of<kAllFlags>(m & kAllFlags, f,
                          std::integer_sequence<int, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                kDD | kM1 | kE2, kDD | kM1 | kE2 | kTrig, kDD | kM1 | kE2 | kStep,
                                                kAllFlags>{});
}
KF_SIMD int plan_flags(const Plan<float>& p) {
  return (p.trig ? kTrig : 0) | (p.e2 ? kE2 : 0) | (p.step ? kStep : 0) |
         (p.m4 != 0.0f || p.m7 != 0.0f ? kM1 : 0) | (is_dd(p) ? kDD : 0);
}

// Plans in structure-of-arrays form: row i of kSoaRows rows (neg[8], pos[8], ρ1, ω, ρ2, m4, m7)
// holds that field for every neuron, padded to a multiple of kBlock.
constexpr int kRowRho1 = 2 * kBasis, kRowOmega = 2 * kBasis + 1, kRowRho2 = 2 * kBasis + 2;
constexpr int kRowM4 = 2 * kBasis + 3, kRowM7 = 2 * kBasis + 4, kSoaRows = 2 * kBasis + 5;
KF_SIMD void plan_to_soa(const Plan<float>& p, float* soa, int64_t stride, int64_t n) {
  for (int j = 0; j < kBasis; ++j) {
    soa[j * stride + n] = p.neg[j];
    soa[(kBasis + j) * stride + n] = p.pos[j];
  }
  soa[kRowRho1 * stride + n] = p.rho1;
  soa[kRowOmega * stride + n] = p.omega;
  soa[kRowRho2 * stride + n] = p.rho2;
  soa[kRowM4 * stride + n] = p.m4;
  soa[kRowM7 * stride + n] = p.m7;
}
// The lane math on W lanes: vectors of W floats, W the width of the caller's registers (16 with AVX-512, 8 with
// AVX2, 4 otherwise: deu_cpu.cpp has one tile entry per ISA, picked by pick_isa). GCC 12 keeps a vector wider
// than the registers in memory: with 16 lanes everywhere, the AVX2 clone took 5x the time of the compiled
// PyTorch baseline, where the AVX-512 one takes a third of it.
#define KF_LANE static inline __attribute__((always_inline))
template <int W> struct Lanes {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int32_t vi __attribute__((vector_size(4 * W)));
  typedef uint32_t vu __attribute__((vector_size(4 * W)));

  KF_LANE vf splat(float v) { return vf{} + v; }
  KF_LANE vf loadu(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  KF_LANE void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  // min/max that return a when a is NaN (b never is here), so NaN propagates through the
  // clamps of vexp and vsincos as it does through the scalar code. (Written `a < b ? a : b` they
  // returned b: a NaN plan, from an infinite a, b or c, gave finite outputs on the CPU only.)
  KF_LANE vf vmin(vf a, vf b) { return b < a ? b : a; }
  KF_LANE vf vmax(vf a, vf b) { return b > a ? b : a; }
  // Round to nearest integer (ties to even), valid for |v| < 2^22.
  KF_LANE vf vround(vf v) {
    const float magic = 12582912.0f;  // 1.5 * 2^23
    return (v + magic) - magic;
  }
  // The integers of integral lanes n, |n| <= 2^22: 1.5 * 2^23 + n is exact, its bits 0x4B400000 + n.
  // (__builtin_convertvector, the same values, is refused by GCC 12 on a class template's vector types.)
  KF_LANE vi to_int(vf n) { return (vi)(n + 12582912.0f) - 0x4B400000; }

  // exp(z) = 2^n·(1 + u), the core of vexp and vexpm1 (Cephes expf: |r| <= ln2/2 after a
  // Cody-Waite reduction, u = r + r²·P(r)). z is clamped to [-87.34, 88.38]; NaN propagates.
  KF_LANE void vexp_core(vf z, vf& u, vf& scale) {
    z = vmax(z, splat(-87.33654f));
    z = vmin(z, splat(88.37626f));
    const vf n = vround(z * 1.44269504088896341f);
    vf r = z - n * 0.693359375f;  // ln 2 split in two (Cody-Waite)
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    u = p * (r * r) + r;
    const vi ni = to_int(n);
    scale = (vf)((ni + 127) << 23);  // 2^n, n in [-126, 127]
  }

  // exp(z), ~1 ulp. Returns 0 below -87.33 (where expf goes subnormal) and saturates at
  // exp(88.37); callers cap their exponents at 14 anyway. NaN propagates.
  KF_LANE vf vexp(vf z) {
    const vi under = z < -87.33654f;
    vf u, scale;
    vexp_core(z, u, scale);
    return under ? splat(0.0f) : (u + 1.0f) * scale;
  }

  // vexp(z) and exp(z) − 1 from one core: the latter without the cancellation near z = 0, as
  // 2^n·u + (2^n − 1), which is u itself for |z| <= ln2/2 (n = 0). Within 1.42 ulp of the result
  // (vexp: 0.99), measured against double expm1 at 6.4M points with |z| from 1e-8 to 14; -1 below
  // -87.33. Plan::m4's basis, for the cost of two more operations than vexp.
  KF_LANE void vexp_expm1(vf z, vf& e, vf& m) {
    const vi under = z < -87.33654f;
    vf u, scale;
    vexp_core(z, u, scale);
    e = under ? splat(0.0f) : (u + 1.0f) * scale;
    m = under ? splat(-1.0f) : scale * u + (scale - 1.0f);
  }

  // sin(x) and cos(x): within 8e-8 of the exact values for |x| up to 1e5 (measured, 2M points
  // per decade; π/2 is split in three parts, the leading two exact in products with the
  // quadrant index up to 2^16 and 2^13); bounded (never inf) for finite x, and off by up to
  // 6e-2 from 1e5 to 1e6, where a float32 argument ω·t is itself off by 1e-2 or more.
  KF_LANE void vsincos(vf x, vf& s, vf& c) {
    vf j = x * 0.636619772367581343f;  // 2/π
    j = vmin(vmax(j, splat(-4194304.0f)), splat(4194304.0f));
    j = vround(j);
    vf r = x - j * 1.5703125f;
    r = r - j * 4.837512969970703125e-4f;
    r = r - j * 7.54978995489188216e-8f;
    // x·(2/π) is rounded in float, so near a half-integer j can round the wrong way, leaving |r|
    // past π/4 by up to |x|·1.2e-7·π/2 (0.012 at |x| = 1e5), where the polynomials are still
    // accurate. The clamp only bounds them past the capped index. (At ±π/4, as before, it pinned
    // such points at cos(π/4): 5e-4 off at |x| ~ 9e3. Moving r one quadrant instead cost the rows
    // forward ~12%.)
    r = vmin(vmax(r, splat(-0.8f)), splat(0.8f));
    const vf z = r * r;
    const vf sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    const vf cp =
        ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
        0.5f * z + 1.0f;
    const vu q = (vu)to_int(j);
    const vi swap = (q & 1u) != 0u;  // odd quadrant: sin <-> cos
    const vf ss = swap ? cp : sp;
    const vf cc = swap ? sp : cp;
    s = (vf)((vu)ss ^ ((q & 2u) << 30));         // sin < 0 in quadrants 2, 3
    c = (vf)((vu)cc ^ (((q + 1u) & 2u) << 30));  // cos < 0 in quadrants 1, 2
  }

  // Plan of W lanes, same fields as Plan<float>: neg/pos coefficients, ρ1, ω, ρ2, m4, m7.
  struct VPlan {
    vf neg[kBasis], pos[kBasis];
    vf rho1, omega, rho2, m4, m7;
  };
  // W consecutive neurons starting at n0.
  KF_LANE VPlan load_plan(const float* soa, int64_t stride, int64_t n0) {
    VPlan p;
    for (int j = 0; j < kBasis; ++j) {
      p.neg[j] = loadu(soa + j * stride + n0);
      p.pos[j] = loadu(soa + (kBasis + j) * stride + n0);
    }
    p.rho1 = loadu(soa + kRowRho1 * stride + n0);
    p.omega = loadu(soa + kRowOmega * stride + n0);
    p.rho2 = loadu(soa + kRowRho2 * stride + n0);
    p.m4 = loadu(soa + kRowM4 * stride + n0);
    p.m7 = loadu(soa + kRowM7 * stride + n0);
    return p;
  }
  // One neuron's plan on every lane.
  KF_LANE VPlan splat_plan(const float* soa, int64_t stride, int64_t n) {
    VPlan p;
    for (int j = 0; j < kBasis; ++j) {
      p.neg[j] = splat(soa[j * stride + n]);
      p.pos[j] = splat(soa[(kBasis + j) * stride + n]);
    }
    p.rho1 = splat(soa[kRowRho1 * stride + n]);
    p.omega = splat(soa[kRowOmega * stride + n]);
    p.rho2 = splat(soa[kRowRho2 * stride + n]);
    p.m4 = splat(soa[kRowM4 * stride + n]);
    p.m7 = splat(soa[kRowM7 * stride + n]);
    return p;
  }

  // Transcendental pieces at t (see pieces() in deu_math.h). kShifted (the backward): E1 − 1 and
  // E2 − 1 as well, from the exponentials' cores (backward_one's expm1 of the exponents).
  struct VPieces {
    vf e1, cs, sn, e2, sig, m1, m2;
    vi cap1, cap2;
  };
  template <int F, bool kShifted = false>
  KF_LANE VPieces vpieces(const VPlan& p, vf t) {
    VPieces q;
    const vf cap = splat(float(kExpCap));
    const vf z1 = p.rho1 * t;
    q.cap1 = z1 > cap;
    if constexpr (kShifted || (F & kM1) != 0) {
      vexp_expm1(vmin(z1, cap), q.e1, q.m1);
    } else {
      q.e1 = vexp(vmin(z1, cap));
      q.m1 = splat(0.0f);
    }
    if (F & kTrig) {
      vsincos(p.omega * t, q.sn, q.cs);
    } else {
      q.cs = splat(1.0f);
      q.sn = splat(0.0f);
    }
    if (F & kE2) {
      const vf z2 = p.rho2 * t;
      q.cap2 = z2 > cap;
      if constexpr (kShifted || (F & kM1) != 0) {
        vexp_expm1(vmin(z2, cap), q.e2, q.m2);
      } else {
        q.e2 = vexp(vmin(z2, cap));
        q.m2 = splat(0.0f);
      }
    } else {
      q.cap2 = vi{};
      q.e2 = splat(0.0f);
      q.m2 = splat(0.0f);
    }
    q.sig = (F & kStep) ? 1.0f / (1.0f + vexp(t * float(-kStepSlope))) : splat(0.0f);
    return q;
  }

  // Coefficients of the side of t = 0 each lane is on (m, m7: Plan::m4, m7 for t > 0, kM1 blocks).
  struct VSide {
    vf k[kBasis];
    vf m, m7;
  };
  template <int F>
  KF_LANE VSide side(const VPlan& p, vi pos) {
    VSide s;
    for (int j = 0; j < kBasis; ++j) s.k[j] = pos ? p.pos[j] : p.neg[j];
    if constexpr ((F & kM1) != 0) {
      s.m = pos ? p.m4 : splat(0.0f);
      s.m7 = pos ? p.m7 : splat(0.0f);
    } else {
      s.m = splat(0.0f);
      s.m7 = splat(0.0f);
    }
    return s;
  }

  template <int F>
  KF_LANE vf veval_raw(const VSide& s, const VPieces& q, vf t) {
    const vf* k = s.k;
    const vf poly = (F & kM1) ? (t * (k[1] + t * k[2]) + s.m * q.m1) + s.m7 * q.m2  // as eval_raw
                               : t * (k[1] + t * k[2]);
    vf y = k[0] + poly + q.e1 * ((k[4] + k[5] * t) * q.cs + k[6] * q.sn);
    if (F & kStep) y += k[3] * q.sig;
    if (F & kE2) y += k[7] * q.e2;
    return y;
  }

  // clamp_out() on W lanes: keeps NaN, as the scalar one does.
  KF_LANE vf vclamp_out(vf y) {
    const float m = float(kOutClamp);
    return y < -m ? splat(-m) : (y > m ? splat(m) : y);
  }

  // forward_one() on W lanes.
  template <int F>
  KF_LANE vf vforward(const VPlan& p, vf t) {
    const VPieces q = vpieces<F>(p, t);
    return vclamp_out(veval_raw<F>(side<F>(p, t > 0.0f), q, t));
  }

  // Accumulators of ∂L/∂π, one per plan parameter and lane (order of deu_math.h's Jacobian).
  struct VAcc {
    vf a[kPlanParams];
  };

  // deu_math.h's series23 and sinhc_series (float's terms) on W lanes.
  KF_LANE vf vseries23(vf z) { return ((z * (1.0f / 45360.0f) + 1.0f / 840.0f) * z + 1.0f / 30.0f) * z + 1.0f / 3.0f; }
  KF_LANE vf vsinhc_series(vf z) { return ((z * (1.0f / 5040.0f) + 1.0f / 120.0f) * z + 1.0f / 6.0f) * z + 1.0f; }

  // t·E1·(cos x − sin(x)/x) at x = ω·t (deu_math.h's cos_minus_sinc times te1 = t·E1): by series below
  // |x| = 1/2, else t·E1·cos x − E1·sin(x)/ω with 1/ω per lane (inv_om, 0 where ω = 0), so no element
  // pays a division (with sin(x)/x divided per element the all-under-damped backward took 1.34×).
  KF_LANE vf vte1_cos_minus_sinc(vf x, vf te1, vf e1, vf sn, vf cs, vf inv_om) {
    const vf x2 = x * x;
    return vmax(x, -x) < 0.5f ? te1 * (-x2 * vseries23(-x2)) : te1 * cs - e1 * sn * inv_om;
  }

  // deu_math.h's divided_difference on W lanes (e^(αt) from vexp rather than √(E1·E2): no vector √
  // in GCC's extensions). Lanes where delta is 0 (not Plan::dd) give inf or NaN: callers select.
  KF_LANE void vdivided_difference(const VPlan& p, vf delta, vf inv_delta, vf t, const VPieces& q, vf& dd, vf& d1,
                                   vf& d2) {
    const vf x = 0.5f * delta * t;
    // One compare, no & of masks (see vbackward's dd): capped lanes read |κt| as 1.
    const vi smooth = (q.cap1 ? splat(1.0f) : q.cap2 ? splat(1.0f) : vmax(x, -x)) < 0.5f;
    const vf x2 = x * x;
    const vf tea = t * vexp(vmin(0.5f * (p.rho1 + p.rho2) * t, splat(float(kExpCap))));
    const vf dds = tea * vsinhc_series(x2);
    const vf w = t * (tea * (x * vseries23(x2)));
    const vf ddd = (q.m1 - q.m2) * inv_delta;
    dd = smooth ? dds : ddd;
    d1 = smooth ? 0.5f * (t * dds + w) : ((q.cap1 ? splat(0.0f) : t * q.e1) - ddd) * inv_delta;
    d2 = smooth ? 0.5f * (t * dds - w) : (ddd - (q.cap2 ? splat(0.0f) : t * q.e2)) * inv_delta;
  }

  // backward_one() on W lanes: returns ∂L/∂t, adds ∂L/∂π into acc. Elements whose raw
  // output lies outside the clamp contribute nothing (their g and t are masked to 0 before use).
  template <int F>
  KF_LANE vf vbackward(const VPlan& p, vf t, vf g, VAcc& acc) {
    const VPieces q = vpieces<F, true>(p, t);
    const vi pos = t > 0.0f;
    const VSide s = side<F>(p, pos);
    const vf* k = s.k;
    const vf yraw = veval_raw<F>(s, q, t);
    // outside = |yraw| > m (false for NaN, which reaches the gradients as in backward_one), as one
    // compare: GCC 12 scalarises `(yraw < -m) | (yraw > m)` on 64-byte vectors (16 vcomiss per block;
    // the backward ran 26 ms instead of ~12 ms on 4096x1024, 1 thread). yraw² > m² is |yraw| > m
    // exactly: m² = 1e6 is a float and rounding is monotonic (±inf and overflow give inf > m²).
    const float m = float(kOutClamp);
    const vi outside = yraw * yraw > splat(m * m);
    const vf zero = splat(0.0f);
    g = outside ? zero : g;
    // and t = 0 there (one select, and the lanes inside keep their bits): g = 0 alone left 0·inf =
    // NaN in the neuron's grad_coeffs where a huge finite t (|t| > ~2.8e32 with E1 capped at e^14)
    // makes t·E1·cos (basis 5), t·E1 (the ρ1 and ω rows), t·E2 (ρ2) or k5·t overflow: a bug hunt's
    // critical neuron (1, 2, 1, .3, -.2) at t = -1e33 beside t = 0.5 had NaN in grad c1, an
    // under-damped one (1, .5, 2, .3, -.2) in grad a, b, c. What follows is then g·(finite) = 0
    // (q's pieces are bounded: the exponents are capped); pos, side and q keep the element's own t.
    t = outside ? zero : t;
    const vf gt = g * t;
    const vf e1cs = q.e1 * q.cs;
    // B4 − 1: E1 − 1 from the exponential's core where ω = 0, (E1 − 1)·cos + (cos − 1) elsewhere,
    // as backward_one does.
    vf b4m1 = q.m1;
    if constexpr ((F & kTrig) != 0) {
      const vf cosm1 = q.cs > 0.0f ? -(q.sn * q.sn) / (1.0f + q.cs) : q.cs - 1.0f;
      b4m1 = p.omega != 0.0f ? q.m1 * q.cs + cosm1 : q.m1;
    }
    // Basis terms B_j(t) times g; hom gets every element, part only t > 0.
    vf gb[kBasis];
    gb[0] = g;
    gb[1] = gt;
    gb[2] = gt * t;
    gb[3] = g * q.sig;
    gb[4] = g * e1cs;
    gb[5] = g * (t * e1cs);
    gb[6] = g * (q.e1 * q.sn);
    gb[7] = g * q.e2;
    for (int j = 0; j < kBasis; ++j) {
      if (j == 3 && !(F & kStep)) continue;
      if (j == 6 && !(F & kTrig)) continue;
      if (j == 7 && !(F & kE2)) continue;
      acc.a[j] += gb[j];
      if (j == 0) continue;  // the part's constant: its Jacobian row is 0 (part_shifted, deu_math.h)
      const vf part = j == 4 ? g * b4m1 : j == 7 ? g * q.m2 : gb[j];  // part_shifted
      acc.a[kBasis + j] += pos ? part : zero;
    }
    const vf lin = ((F & kM1) ? k[4] + s.m : k[4]) + k[5] * t;  // E1's whole coefficient (backward_one)
    const vf osc = lin * q.cs + k[6] * q.sn;    // e1-bracket
    const vf dosc = k[6] * q.cs - lin * q.sn;   // its derivative w.r.t. (ω t)
    const vf r1 = q.cap1 ? zero : p.rho1;
    const vf gte1 = g * (t * q.e1);  // t·E1 first: g·t may overflow where E1 is 0
    // Plan::dd lanes (backward_one): the rates take E1's and E2's coefficients of the part on
    // M1, M2 and DD, and DD's own ∂/∂ρ.
    vf c1 = osc, half = zero;
    vi dd = vi{};
    if constexpr ((F & kDD) != 0) {  // (a run-time branch per block instead made GCC's code for the rest slower)
      // Plan::dd lanes with t > 0 and g != 0 (DD's ∂/∂ρ may overflow where an exponent is capped, and
      // 0·inf is NaN where the output is clamped: g = 0 there; backward_one returns before; a bug
      // hunt's NaN grad_coeffs), as one compare: ANDing the masks (pos & (g != 0) & ...) made GCC
      // scalarise every later select on pos (the paper-init backward ran 5× slower).
      dd = (pos ? g * (p.omega == 0.0f ? p.pos[6] : zero) : zero) != 0.0f;
      vf ddv, d1, d2;
      vdivided_difference(p, p.neg[6], 1.0f / p.neg[6], t, q, ddv, d1, d2);  // 1/δ: per lane, hoisted
      half = 0.5f * (s.m + s.m7);
      c1 = dd ? k[4] + half : osc;
      acc.a[kBasis + 6] += dd ? g * ddv : zero;
      acc.a[kRowRho1] += dd ? g * (k[6] * d1) : zero;
      acc.a[kRowRho2] += dd ? g * (k[6] * d2) : zero;
    }
    acc.a[kRowRho1] += q.cap1 ? zero : gte1 * c1;
    vf de1 = r1 * osc + k[5] * q.cs;
    if (F & kTrig) {
      const vf inv_om = p.omega == 0.0f ? zero : 1.0f / p.omega;  // per lane: hoisted out of the row loop
      const vf te1 = t * q.e1;
      acc.a[kRowOmega] += g * (k[6] * vte1_cos_minus_sinc(p.omega * t, te1, q.e1, q.sn, q.cs, inv_om) -
                               te1 * (lin * q.sn));  // backward_one
      de1 += p.omega * dosc;
    }
    vf dy = k[1] + 2.0f * k[2] * t + q.e1 * de1;
    if (F & kStep) dy += k[3] * float(kStepSlope) * q.sig * (1.0f - q.sig);
    if (F & kE2) {
      const vf k7 = (F & kM1) ? k[7] + s.m7 : k[7];  // E2's whole coefficient (backward_one)
      const vf r2 = q.cap2 ? zero : p.rho2;
      const vf c2 = dd ? k[7] + half : k7;
      acc.a[kRowRho2] += q.cap2 ? zero : g * (t * q.e2) * c2;
      dy += k7 * r2 * q.e2;
    }
    return outside ? zero : g * dy;
  }
};
#undef KF_LANE

}  // namespace simd
}  // namespace deu
}  // namespace kfuse
