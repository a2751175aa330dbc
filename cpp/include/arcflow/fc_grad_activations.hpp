// Tangents of the activations' pair and diagonal formulas, for the forward-mode gradients of fc_grad.hpp.
#pragma once
// Contract: header-only, host only. Each grad_rule<Act> takes the values that the activation's own pair code
// produced (pair_out with the output scale w = 1: T, Tdot, and the gaps sqrt(T11 T22) -/+ T) and the
// tangents of the pair's inputs in one direction, and returns the tangents of those four values.
//
// Notation (docs/mathematics.md §1.2 and §1.5): S11, S22, S12 one layer's variances and covariance, P = sqrt(S11 S22),
// gm = P - S12, gp = P + S12 the carried gaps, hl = dS11 / (2 S11) + dS22 / (2 S22) = dP / P.
// A positively homogeneous phi of degree n (ABReLU n = 1, max(x, 0)^n, Sign n = 0) has T = P^n f(theta), so
//   dT = n T hl + P^n f'(theta) dtheta,  and by Price's theorem P^n f'(theta) = -P sin(theta) Tdot,
// with P sin(theta) dtheta = dgm - gm hl = gp hl - dgp =: A (the "angular tangent"). A is taken from the
// smaller gap, so that it is exact (0) for collinear and antiparallel pairs and does not cancel near them;
// dtheta = A / sqrt(gm gp) is needed only where Tdot or its tangent is singular (Sign, Step, the NTK of the
// ReLU family), and is 0 where gm gp = 0 (exactly collinear pairs keep theta = 0 or pi).
// The gaps are homogeneous too: d(sqrt(T11 T22) -/+ T) = n (gap) hl +/- Tdot A.
#include <cmath>

#include "arcflow/activations.hpp"

namespace arcflow {

// One direction's tangents of a pair's inputs (see the notation above).
struct pair_tangent_in {
  double hl;        // dP / P (0 where P = 0)
  double a;         // A = P sin(theta) dtheta
  double dtheta;    // A / sqrt(gm gp), 0 where gm gp = 0
  double ds12;      // dS12
  double ds1, ds2;  // dS11, dS22
  double dtt;       // d(t1 t2), t = sqrt(T11)
};

struct pair_tangent_out {
  double dt, dtdot, dgm, dgp;
};

template <class Act>
struct grad_rule;

// ABReLU: degree 1; Tdot = k2 - k1 theta, so dTdot = -k1 dtheta.
template <class T, bool Z>
struct grad_rule<abrelu_act<T, Z>> {
  static constexpr bool uses_angle = true;
  // T11 = k2 s: dT11 = k2 ds.
  static double diag_dt(const act_params& p, double, double, double ds) { return (p.a * p.a + p.b * p.b) / 2.0 * ds; }
  static pair_tangent_out pair(const abrelu_act<T, Z>& act, const act_params&, const pair_out<double>& o, double,
                               double, const pair_tangent_in& d) {
    pair_tangent_out r;
    r.dt = o.t * d.hl - o.tdot * d.a;
    r.dgm = o.gm * d.hl + o.tdot * d.a;
    r.dgp = o.gp * d.hl - o.tdot * d.a;
    r.dtdot = -double(act.k1) * d.dtheta;
    return r;
  }
};

// max(x, 0)^n: degree n; Tdot_n = n^2 P^(n-1) J_(n-1) / 2pi and J_m' = -m^2 sin(theta) J_(m-1) give
// dTdot_n = (n-1) Tdot_n hl - n^2 Tdot_(n-1) A (n >= 2), with Tdot_(n-1) the order n-1 monomial's Tdot
// (passed in as lower), and dTdot_1 = -dtheta / 2pi. Step (n = 0): T = (pi - theta) / 2pi.
template <class T, int N>
struct grad_rule<monomial_act<T, N>> {
  static constexpr bool uses_angle = true;
  static double diag_dt(const act_params& p, double s, double t11, double ds) {
    return p.n >= 1 && s > 0 ? p.n * t11 * (ds / s) : 0.0;
  }
  static pair_tangent_out pair(const monomial_act<T, N>& act, const act_params&, const pair_out<double>& o,
                               double lower, double h, const pair_tangent_in& d) {
    pair_tangent_out r;
    const int n = act.order();  // a constant where N >= 0, so that the callers' loops vectorise
    constexpr double inv_2pi = 0.5 / 3.14159265358979323846;
    if (n == 0) {
      const double dt = h > 0 ? -inv_2pi * d.dtheta : 0.0;  // next to a zero-variance row T is the constant 1/4
      r.dt = dt;
      r.dgm = -dt;
      r.dgp = dt;
      r.dtdot = 0.0;
      return r;
    }
    r.dt = n * o.t * d.hl - o.tdot * d.a;
    r.dgm = n * o.gm * d.hl + o.tdot * d.a;
    r.dgp = n * o.gp * d.hl - o.tdot * d.a;
    r.dtdot = n == 1 ? -inv_2pi * d.dtheta : (n - 1) * o.tdot * d.hl - double(n) * n * lower * d.a;
    return r;
  }
};

// Sign: T = 1 - 2 theta / pi (0 next to a zero-variance row), the gaps 2 theta / pi and 2 - 2 theta / pi.
template <class T>
struct grad_rule<sign_act<T>> {
  static constexpr bool uses_angle = true;
  static double diag_dt(const act_params&, double, double, double) { return 0.0; }
  static pair_tangent_out pair(const sign_act<T>&, const act_params&, const pair_out<double>&, double, double h,
                               const pair_tangent_in& d) {
    const double dt = h > 0 ? -(2.0 / 3.14159265358979323846) * d.dtheta : 0.0;
    return pair_tangent_out{dt, 0.0, -dt, dt};
  }
};

// Erf (not homogeneous): T = 2/pi asin(2 S12 / sqrt(u1 u2)), u = 1 + 2 S, Tdot = 4/pi / sqrt(D),
// D = u1 u2 - 4 S12^2 = u1 + u2 - 1 + 4 gm gp. Differentiated directly:
//   dT = Tdot (dS12 - S12 (dS11 / u1 + dS22 / u2)),   dTdot = -Tdot dD / (2 D),
// and the gaps t1 t2 -/+ T from d(t1 t2), with T11 = 2/pi asin(2s / (1 + 2s)), dT11 = 4/pi ds / ((1+2s) sqrt(1+4s)).
template <class T>
struct grad_rule<erf_act<T>> {
  static constexpr bool uses_angle = false;
  static double diag_dt(const act_params&, double s, double, double ds) {
    return (4.0 / 3.14159265358979323846) * ds / ((1.0 + 2.0 * s) * std::sqrt(1.0 + 4.0 * s));
  }
  // Tdot = c_d / sqrt(D) scaled as in pair_erf: the activation's own form (for the fused engine, whose rows out of
  // range take the long double path) forms gm gp, which overflows double for variances beyond ~1e154.
  template <class Act>
  static double tdot(const Act& act, double gm, double gp, double u1, double u2) {
    const double ic = 1.0 / (u1 > u2 ? u1 : u2);
    return double(act.c_d) * ic / std::sqrt((u1 + u2 - 1.0) * ic * ic + 4.0 * (gm * ic) * (gp * ic));
  }
  // Erf's own pair terms: S11, S22, S12 and the gaps (u = 1 + 2 S is the row factor pa).
  static pair_tangent_out pair_erf(const pair_out<double>& o, double s12, double gm, double gp, double u1, double u2,
                                   double dgm, double dgp, const pair_tangent_in& d) {
    pair_tangent_out r;
    // dD / D with both scaled by 1 / c^2, c = max(u1, u2) >= 1 (gm, gp <= u1 + u2): gm gp overflows double for
    // variances beyond ~1e154 while the ratio stays of order 1 / S.
    const double ic = 1.0 / (u1 > u2 ? u1 : u2);
    const double gmc = gm * ic, gpc = gp * ic;
    const double D = (u1 + u2 - 1.0) * ic * ic + 4.0 * gmc * gpc;
    const double dD = 2.0 * (d.ds1 + d.ds2) * ic * ic + 4.0 * (dgm * ic * gpc + gmc * dgp * ic);
    r.dt = o.tdot * (d.ds12 - s12 * (d.ds1 / u1 + d.ds2 / u2));
    r.dtdot = -0.5 * o.tdot * dD / D;
    r.dgm = d.dtt - r.dt;
    r.dgp = d.dtt + r.dt;
    return r;
  }
};

}  // namespace arcflow
