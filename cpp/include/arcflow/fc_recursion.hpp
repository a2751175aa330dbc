// The per-pair steps of the fully-connected recursion, written once for the CPU tile kernel and the CUDA tile.
#pragma once
// Contract: header-only, no CUDA headers; the step functions are ARCFLOW_HD (host and device). Included by
// cpp/src/cpu/fc_kernel.cpp and cpp/src/cuda/fc_tile.cuh (and so by the host emulation of the CUDA tile),
// which call the same formulas in the same order, so both backends round alike:
// - the first layer's gaps |x||y| -/+ <x,y> with the bias's share (bias_gap, first_gap_minus/plus),
// - the cancellation-free gap of near-collinear rows (unit_dist2, on the unit vectors, in double),
// - the layer step Sigma^(l+1) -> Sigma^(l+2) from an activation's pair_out (next_sigma) and Theta alongside
//   (next_theta),
// - the choice of the activation type from fc_params (by_activation, host only).
// The per-row diagonal recursion (Sigma(x,x), Theta(x,x): diag_row, fill_row_table) is in fc_kernel.hpp; both
// backends run it on the host.
#include <cmath>
#include <stdexcept>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"
#include "arcflow/fc_kernel.hpp"

namespace arcflow {

ARCFLOW_HD constexpr index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }

// The bias's share of a pair's gaps: b (q1 - q2)^2 / (r1 r2 + q1 q2 + b), with q = sqrt(w) t of the previous
// layer (sqrt(gram_scale) |x| in the first) and r = sqrt(Sigma(x,x)) of this one. It is the part of
// sqrt(S11 S22) -/+ S12 that the bias adds, in a form without cancellation.
template <class T>
ARCFLOW_HD T bias_gap(T b, T q1, T q2, T r1, T r2) {
  // b / den <= 1 first: b dq^2 underflows long before the result does (inputs and bias ~1e-90 in double).
  const T dq = q1 - q2;
  return b / (r1 * r2 + q1 * q2 + b) * dq * dq;
}

// The first layer's gaps gm = P - Sigma, gp = P + Sigma from the raw gap g = |x||y| -/+ <x,y> (or its refined
// value), clamped at 0 once here: they are >= 0 in exact arithmetic and make_angle does not clamp.
template <class T>
ARCFLOW_HD T first_gap_minus(T bterm, T gs, T g) {
  const T m = bterm + gs * g;
  return m > T(0) ? m : T(0);
}
template <class T>
ARCFLOW_HD T first_gap_plus(T bterm, T b, T gs, T g) {
  const T p = bterm + T(2) * b + gs * g;
  return p > T(0) ? p : T(0);
}

// One layer of a pair: Sigma^(l+2) = t + b and its gaps from the activation's pair_out (t, tgm, tgp). Without
// a bias no add of a 0 (x + 0 does not fold: -0). Scalars, not the pair_out: GCC did not vectorise the CPU
// pair loop through a pair_out passed in.
template <bool Bias, class T>
ARCFLOW_HD T next_sigma(T t, T tgm, T tgp, T b, T bterm, T& gm, T& gp) {
  if constexpr (Bias) {
    gm = bterm + tgm;
    gp = bterm + T(2) * b + tgp;
    return t + b;
  } else {
    (void)b;
    (void)bterm;
    gm = tgm;
    gp = tgp;
    return t;
  }
}

// Theta^(l+2) = [layer not frozen] Sigma^(l+2) + Tdot Theta^(l+1).
template <bool Add, class T>
ARCFLOW_HD T next_theta(T s, T tdot, T th) {
  if constexpr (Add)
    return s + tdot * th;
  else
    return tdot * th;
}

// Products and sums in unit_dist2 rounded one by one: the device contracts a * b + c into an FMA unless told
// not to; the host code that calls these is compiled without FMA contraction.
namespace rn {
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
#else
inline double add(double a, double b) { return a + b; }
inline double mul(double a, double b) { return a * b; }
#endif
}  // namespace rn

// |x| as an unevaluated sum hi + lo (about 1e-32 relative): the sum of squares with each square's rounding
// error and each addition's, then one Newton correction of the square root.
template <class T>
ARCFLOW_HD void norm_dd(const T* x, index_t d, double& hi, double& lo) {
  double s = 0.0, c = 0.0;
  for (index_t k = 0; k < d; ++k) {
    const double v = double(x[k]), p = rn::mul(v, v), pe = std::fma(v, v, -p);
    const double t = rn::add(s, p), bb = rn::add(t, -s);
    c = rn::add(c, rn::add(rn::add(rn::add(s, -rn::add(t, -bb)), rn::add(p, -bb)), pe));
    s = t;
  }
  const double t = rn::add(s, c), tl = rn::add(c, -rn::add(t, -s));
  hi = std::sqrt(t);
  lo = hi > 0 ? rn::add(std::fma(-hi, hi, t), tl) / rn::mul(2.0, hi) : 0.0;
}

// |u + sgn v|^2 for the unit vectors u = x / |x|, v = y / |y|, in double. |x||y| -/+ <x,y> equals
// |x||y| |u -/+ v|^2 / 2 without the cancellation of the Gram route. Near-collinear rows have
// |u -/+ v| ~ 1e-12 and less, and Sign or Step turn the gap into its square root at every layer, so each
// component of u is carried as q + e to about 1e-32 (norm_dd; fma gives each quotient's exact remainder):
// with plain quotients only a few digits of the gap are left. A duplicate row gives exactly 0. Callers keep it
// out of line and out of the vector kernels (the same bits on every instruction-set variant).
template <class T>
ARCFLOW_HD double unit_dist2(const T* x, const T* y, index_t d, double sgn) {
  double ha, la, hb, lb;
  norm_dd(x, d, ha, la);
  norm_dd(y, d, hb, lb);
  double acc = 0.0;
  for (index_t k = 0; k < d; ++k) {
    const double xa = double(x[k]), yb = double(y[k]);
    const double qa = xa / ha, qb = yb / hb;
    const double ea = rn::add(std::fma(-qa, ha, xa), -rn::mul(qa, la)) / ha;
    const double eb = rn::add(std::fma(-qb, hb, yb), -rn::mul(qb, lb)) / hb;
    const double u = rn::add(rn::add(qa, rn::mul(sgn, qb)), rn::add(ea, rn::mul(sgn, eb)));
    acc = rn::add(acc, rn::mul(u, u));
  }
  return acc;
}

// Calls f with the activation object (outputs scaled by w_var) whose type specialises the kernels. With
// Specialise (the CPU) ReLU-like ABReLUs (a b = 0) and monomials of order <= 4 get types of their own, so that
// their loops vectorise; the CUDA tile takes the general types (the order at run time).
template <class T, bool Specialise, class F>
void by_activation(const fc_params& fp, F&& f) {
  const act_params& p = fp.act;
  const double w = fp.w_var;
  switch (p.kind) {
    case act_kind::abrelu:
      if constexpr (Specialise) {
        if (p.a * p.b == 0.0) {
          f(abrelu_act<T, true>(p, w));
          return;
        }
      }
      f(abrelu_act<T>(p, w));
      return;
    case act_kind::monomial:
      if constexpr (Specialise) {
        switch (p.n) {
          case 0:
            f(monomial_act<T, 0>(p, w));
            return;
          case 1:
            f(monomial_act<T, 1>(p, w));
            return;
          case 2:
            f(monomial_act<T, 2>(p, w));
            return;
          case 3:
            f(monomial_act<T, 3>(p, w));
            return;
          case 4:
            f(monomial_act<T, 4>(p, w));
            return;
          default:
            break;
        }
      }
      f(monomial_act<T>(p, w));
      return;
    case act_kind::sign:
      f(sign_act<T>(p, w));
      return;
    case act_kind::erf:
      f(erf_act<T>(p, w));
      return;
  }
  throw std::invalid_argument("arcflow: unknown activation kind");
}

}  // namespace arcflow
