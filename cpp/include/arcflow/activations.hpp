// The activations of the fully-connected recursion: E[phi(u)phi(v)], E[phi'(u)phi'(v)] and the gaps.
#pragma once
// Contract: header-only, usable on the host and in CUDA kernels (ARCFLOW_HD). Each activation is a small
// struct, a template parameter of the kernels, so the per-element code is specialised and inlined.
//
// Per pair the recursion carries s12 = Sigma(x,y) and the two gaps gm = P - s12, gp = P + s12, where
// P = sqrt(Sigma(x,x) Sigma(y,y)). The gaps are what keeps collinear pairs exact (docs/mathematics.md §1.3):
// with sigma = sin(theta/2) = sqrt(gm / 2P) and kappa = cos(theta/2) = sqrt(gp / 2P) the angle is taken
// from the smaller of the two half-angle sines, never from arccos(1 - eps). Each activation returns, in
// absolute units, T = E[phi phi], Tdot = E[phi' phi'] and its own gaps sqrt(T11 T22) -/+ T computed
// from formulas that do not cancel.
//
// Every activation takes an output scale w (the layer's weight variance): T, Tdot and the gaps come out
// multiplied by w, folded into the activation's constants so that the hot loops do not multiply again.
//
// The pair's two sides enter every formula symmetrically, products of the two rows' factors first
// ((t1 t2), (pb1 pb2)): k(x, y) and k(y, x) then hold the same bits, which kernels(x, x) relies on.
//
// Per row and layer the kernels precompute s = Sigma(x,x), r = sqrt(s), ir = 1/r (0 when r = 0), and
// two activation factors pa, pb (see row()), and t = sqrt(T11) where T11 = E[phi(u)^2], u ~ N(0, s).
#include <cmath>

#include "arcflow/common.hpp"
#include "arcflow/fast_math.hpp"

namespace arcflow {

enum class act_kind : int { abrelu = 0, monomial = 1, sign = 2, erf = 3 };

// The activation as the bindings pass it: kind plus its numbers (a, b for ABReLU, n for monomials).
struct act_params {
  act_kind kind = act_kind::abrelu;
  double a = 0.0, b = 1.0;
  int n = 1;
};

template <class T>
struct pair_out {
  T t, tdot, gm, gp;
};

// Half-angle description of the pair, from the carried gaps. h = 1 / (2P), 0 when P = 0 (a zero row):
// then the angle is pi/2 by convention (c = 0), as in the NumPy code of Arora et al.
template <class T>
struct angle {
  T sig2, kap2, theta, x, sin_t, cos_t;  // x = min(theta, pi - theta)
  // No bool member: a bool inside the struct stops gcc from vectorising the callers' loops.
  ARCFLOW_HD bool big() const { return sig2 > kap2; }  // theta > pi/2
};

// The carried gaps are >= 0 by construction (every producer clamps), so no clamping here: sig2 and kap2
// may exceed 1 by an ulp, which the ratio below does not mind. Few selects: this is the hot loop.
// Split so that the CPU kernel can run the long-latency part (a square root, a division and the arctangent
// polynomial) in loops of their own: half_sines() gives sig2 and kap2, angle_core() (angle_reduce() then
// angle_finish()) x and sin(theta), and angle_from() the rest. make_angle() is the three in a row.
//
// x = min(theta, pi - theta) and sin(theta) from the squared half-angle sines: x / 2 = atan2(min, max) =
// atan(sqrt(lo hi) / hi), one square root and one division; sin(theta) = 2 sig kap = 2 sqrt(lo hi).
// In two halves, so that the CPU kernel can run them as loops of their own (each half's dependency chain is
// short enough for the out-of-order window to overlap many pairs): angle_reduce() takes the square root and
// the division, and angle_finish() evaluates the arctangent polynomial. angle_core() is the two in a row.
// The reduction: with t = q / hi = tan(x / 2) in [0, 1], x / 2 = k pi/4 + atan((t - k) / (1 + k t)), k = 1 where
// t > tan(pi/8), so |z| <= tan(pi/8); z = (q - k hi) / (hi + k q) is that in one division.
template <class T>
ARCFLOW_HD void angle_reduce(T sig2, T kap2, T& z, T& base, T& sin_t) {
  const T lo = sig2 < kap2 ? sig2 : kap2;
  const T hi = sig2 < kap2 ? kap2 : sig2;  // >= 1/2 up to rounding
  const T q = std::sqrt(lo * hi);
  const T k = q > T(0.41421356237309504880) * hi ? T(1) : T(0);
  z = (q - k * hi) / (hi + k * q);
  base = k * fm::consts<T>::half_pi;
  sin_t = T(2) * q;
}

template <class T>
ARCFLOW_HD T angle_finish(T z, T base) {
  return base + T(2) * fm::atan_small(z);
}

template <class T>
ARCFLOW_HD void angle_core(T sig2, T kap2, T& x, T& sin_t) {
  T z, base;
  angle_reduce(sig2, kap2, z, base, sin_t);
  x = angle_finish(z, base);
}

template <class T>
ARCFLOW_HD void half_sines(T gm, T gp, T h, T& sig2, T& kap2) {
  const bool zero = !(h > T(0));
  sig2 = zero ? T(0.5) : gm * h;
  kap2 = zero ? T(0.5) : gp * h;
}

template <class T>
ARCFLOW_HD angle<T> angle_from(T sig2, T kap2, T x, T sin_t) {
  angle<T> a;
  a.sig2 = sig2;
  a.kap2 = kap2;
  a.x = x;
  a.theta = sig2 > kap2 ? fm::consts<T>::pi - x : x;
  a.sin_t = sin_t;
  a.cos_t = kap2 - sig2;
  return a;
}

// The same angle without a division, for kernels that run it in one loop with the pair formulas (the CPU
// kernel on AVX-512, where the vector divider is slow).
// x <= pi/4 where sin(theta) <= |cos(theta)|: x = asin(sin theta), else x = pi/2 - asin(|cos theta|); the
// argument of asin is then at most 1/sqrt(2), and sin(theta) = 2 sqrt(lo hi) and |cos theta| = hi - lo come
// without cancellation.
template <class T>
ARCFLOW_HD angle<T> angle_direct(T sig2, T kap2) {
  const T lo = sig2 < kap2 ? sig2 : kap2;
  const T hi = sig2 < kap2 ? kap2 : sig2;
  const T sin_t = T(2) * std::sqrt(lo * hi), abs_cos = hi - lo;
  const bool low = sin_t <= abs_cos;
  const T as = fm::asin_poly(low ? sin_t : abs_cos);
  return angle_from(sig2, kap2, low ? as : fm::consts<T>::half_pi - as, sin_t);
}

template <class T>
ARCFLOW_HD angle<T> make_angle(T gm, T gp, T h) {
  T sig2, kap2, x, sin_t;
  half_sines(gm, gp, h, sig2, kap2);
  angle_core(sig2, kap2, x, sin_t);
  return angle_from(sig2, kap2, x, sin_t);
}

// phi(x) = a min(x, 0) + b max(x, 0): ReLU (0, 1), LeakyReLU (alpha, 1), Abs (-1, 1), Identity (1, 1).
// T = P [k1 S(theta) + k2 cos(theta)], S(t) = sin t - t cos t, k1 = (a-b)^2 / 2pi, k2 = (a^2+b^2) / 2;
// Tdot = k2 - k1 theta. The gap near theta = pi uses x = pi - theta: k2 P - T = P [kd - 2ab kap^2 - k1 S(x)],
// kd = (a+b)^2 / 2, so that Abs at antiparallel inputs stays exact.
// ZeroAB: a b = 0 (ReLU, and phi = a min(x, 0)), so the 2 ab kap^2 term of the gap vanishes (the CPU
// kernels pick it at run time; the same bits as the general formula, two vector operations fewer).
template <class T, bool ZeroAB = false>
struct abrelu_act {
  T k1, k2, kd, ab;      // times w
  T k1n, k1h, kdh, abn;  // pair_scaled's: k1 / k2, k1 / 2k2, kd / 2k2, ab / k2 (0 when k2 = 0)
  ARCFLOW_HD explicit abrelu_act(const act_params& p, double w = 1.0)
      : k1(T(w * (p.a - p.b) * (p.a - p.b) / (2.0 * 3.14159265358979323846))),
        k2(T(w * (p.a * p.a + p.b * p.b) / 2.0)),
        kd(T(w * (p.a + p.b) * (p.a + p.b) / 2.0)),
        ab(T(w * p.a * p.b)) {
    const double q = p.a * p.a + p.b * p.b;  // 2 k2 / w
    const double k1n_ = q > 0 ? (p.a - p.b) * (p.a - p.b) / (3.14159265358979323846 * q) : 0.0;
    k1n = T(k1n_);
    k1h = T(0.5 * k1n_);
    kdh = T(q > 0 ? 0.5 * (p.a + p.b) * (p.a + p.b) / q : 0.0);
    abn = T(q > 0 ? 2.0 * p.a * p.b / q : 0.0);
  }
  template <class R>
  static R diag_t(const act_params& p, R s) {
    return R((p.a * p.a + p.b * p.b) / 2.0) * s;
  }
  // Tdot(x, x): theta = 0, or pi/2 for a zero-variance row (the convention of make_angle).
  template <class R>
  static R diag_tdot(const act_params& p, R s) {
    const double k2 = (p.a * p.a + p.b * p.b) / 2.0, k1 = (p.a - p.b) * (p.a - p.b) / (2.0 * 3.14159265358979323846);
    return R(s > 0 ? k2 : k2 - k1 * 1.57079632679489661923);
  }
  template <class R>
  ARCFLOW_HD static void row(const act_params&, R, R r, R& pa, R& pb) {
    pa = r;
    pb = R(1);
  }
  static double log2_j0(const act_params&) { return 0.0; }
  static constexpr bool angle_based = true;
  ARCFLOW_HD pair_out<T> pair(T s12, T gm, T gp, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    return pair_angle(make_angle(gm, gp, h), s12, P, h, pa1, pb1, t1, pa2, pb2, t2);
  }
  ARCFLOW_HD pair_out<T> pair_angle(const angle<T>& g, T s12, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    (void)s12;
    (void)h;
    (void)pa1;
    (void)pb1;
    (void)t1;
    (void)pa2;
    (void)pb2;
    (void)t2;
    const T s_theta = g.sin_t - g.theta * g.cos_t;
    const T abs_cos = std::fabs(g.cos_t);
    const T s_x = g.sin_t - g.x * abs_cos;
    const T gm_r = (g.big() ? (ZeroAB ? kd : kd - T(2) * ab * g.kap2) : T(2) * k2 * g.sig2) - k1 * s_x;
    // gp_r >= 0 needs no clamp: k1, k2, kap2 >= 0, and S(theta) >= 0 can round below 0 only near theta = 0,
    // where 2 k2 kap2 ~ 2 k2 dominates (k2 = 0 only with k1 = 0, phi = 0).
    const T gp_r = T(2) * k2 * g.kap2 + k1 * s_theta;
    pair_out<T> o;
    o.t = P * (k1 * s_theta + k2 * g.cos_t);
    o.tdot = k2 - k1 * g.theta;
    o.gm = P * (gm_r > T(0) ? gm_r : T(0));
    o.gp = P * gp_r;
    return o;
  }
  // Without a bias the activation is scale-free: Sigma(x,x) grows by k2 per layer (k2 > 0), so P' = k2 P and
  // the recursion can carry the pair in units of P: sig2 = gm / 2P and kap2 = gp / 2P themselves, the
  // correlation rho = Sigma(x,y) / P and Theta / P. pair() divided by k2 P (and the gaps by 2 k2 P):
  //   sig2' = (big ? kd / 2k2 - (ab / k2) kap2 : sig2) - (k1 / 2k2) S(x),   kap2' = kap2 + (k1 / 2k2) S(theta),
  //   rho' = (k1 / k2) S(theta) + cos(theta),   Tdot / k2 = 1 - (k1 / k2) theta.
  // No P, no 1 / 2P per pair and layer: the CPU kernel multiplies by P once, after the last layer.
  static constexpr bool scale_free = true;
  ARCFLOW_HD pair_out<T> pair_scaled(const angle<T>& g) const {
    const T s_theta = g.sin_t - g.theta * g.cos_t;
    const T s_x = g.sin_t - g.x * std::fabs(g.cos_t);
    const T sig = (g.big() ? (ZeroAB ? kdh : kdh - abn * g.kap2) : g.sig2) - k1h * s_x;
    pair_out<T> o;
    o.t = k1n * s_theta + g.cos_t;  // rho'
    o.tdot = T(1) - k1n * g.theta;
    o.gm = sig > T(0) ? sig : T(0);  // sig2'
    o.gp = g.kap2 + k1h * s_theta;   // kap2'
    return o;
  }
};

// phi(x) = max(x, 0)^n, the arc-cosine kernel of order n (Cho & Saul 2009): T = P^n J_n(theta) / 2pi,
// Tdot = n^2 P^(n-1) J_(n-1)(theta) / 2pi, with J_0 = pi - theta, J_1 = sin + (pi - theta) cos and
// J_k = (2k-1) cos J_(k-1) + (k-1)^2 sin^2 J_(k-2). The gap uses D_k = J_k(0) - J_k(theta), which obeys
// D_k = (2k-1) [J_(k-1)(0) (1 - cos) + cos D_(k-1)] - (k-1)^2 sin^2 J_(k-2), D_0 = theta,
// D_1 = pi (1 - cos) - S(theta): no cancellation at small theta. J_k(0) = pi (2k-1)!!.
// Row factors: pa = r^n, pb = r^(n-1). N >= 0 fixes the order at compile time (the loop over k unrolls and
// the callers' loops vectorise); N = -1 takes it at run time.
template <class T, int N = -1>
struct monomial_act {
  int n_rt;
  T w, c;  // c = w / 2pi
  ARCFLOW_HD explicit monomial_act(const act_params& p, double w_ = 1.0)
      : n_rt(p.n), w(T(w_)), c(T(w_ / (2.0 * 3.14159265358979323846))) {}
  ARCFLOW_HD int order() const { return N >= 0 ? N : n_rt; }
  static double j0_at_zero(int n) {
    double j = 3.14159265358979323846;
    for (int k = 1; k <= n; ++k) j *= (2 * k - 1);
    return j;
  }
  template <class R>
  static R diag_t(const act_params& p, R s) {
    // A zero-variance row takes the pi/2 convention of make_angle, as neural-tangents does: Step gives 1/4.
    if (p.n == 0) return s > 0 ? R(0.5) : R(0.25);
    return std::pow(s, p.n) * R(j0_at_zero(p.n)) / R(2.0 * 3.14159265358979323846);
  }
  template <class R>
  static R diag_tdot(const act_params& p, R s) {
    if (p.n == 0) return R(0);
    if (!(s > 0)) return p.n == 1 ? R(0.25) : R(0);  // the pi/2 convention: J_0(pi/2) / 2pi
    return R(p.n) * R(p.n) * std::pow(s, p.n - 1) * R(j0_at_zero(p.n - 1)) / R(2.0 * 3.14159265358979323846);
  }
  template <class R>
  ARCFLOW_HD static void row(const act_params& p, R, R r, R& pa, R& pb) {
    pa = std::pow(r, p.n);
    pb = p.n >= 1 ? std::pow(r, p.n - 1) : R(0);
  }
  // log2 of the largest constant factor in the pair formulas (J_n(0), n^2), for the engine's range check.
  static double log2_j0(const act_params& p) { return std::log2(j0_at_zero(p.n)) + std::log2(double(p.n) * p.n + 1); }
  static constexpr bool angle_based = true;
  static constexpr bool scale_free = false;  // P' = c P^n: not carried in units of P (see abrelu_act)
  ARCFLOW_HD pair_out<T> pair(T s12, T gm, T gp, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    return pair_angle(make_angle(gm, gp, h), s12, P, h, pa1, pb1, t1, pa2, pb2, t2);
  }
  ARCFLOW_HD pair_out<T> pair_angle(const angle<T>& g, T s12, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    (void)s12;
    (void)P;
    const int n = order();
    const T pi = fm::consts<T>::pi;
    const T one_m_cos = T(2) * g.sig2;
    const T sin2 = g.sin_t * g.sin_t;
    T j_prev = pi - g.theta;  // J_0
    T d_prev = g.theta;       // D_0
    T j0_prev = pi;           // J_0(0)
    T j_cur = j_prev, d_cur = d_prev, j0_cur = j0_prev;
    T j_before = j_prev;  // J_(n-1)
    if (n >= 1) {
      j_cur = g.sin_t + (pi - g.theta) * g.cos_t;
      d_cur = pi * one_m_cos - (g.sin_t - g.theta * g.cos_t);
      j0_cur = pi;
      j_before = j_prev;
      for (int k = 2; k <= n; ++k) {
        const T kk = T(2 * k - 1), km = T((k - 1) * (k - 1));
        const T j_next = kk * g.cos_t * j_cur + km * sin2 * j_prev;
        const T d_next = kk * (j0_cur * one_m_cos + g.cos_t * d_cur) - km * sin2 * j_prev;
        j_before = j_cur;
        j_prev = j_cur;
        j_cur = j_next;
        d_cur = d_next;
        j0_cur = kk * j0_cur;
      }
    }
    const T pn = pa1 * pa2;
    pair_out<T> o;
    o.t = pn * j_cur * c;
    o.tdot = n >= 1 ? T(n) * T(n) * (pb1 * pb2) * j_before * c : T(0);
    const T dm = d_cur > T(0) ? d_cur : T(0);
    o.gm = pn * dm * c;
    o.gp = pn * (T(2) * j0_cur - dm) * c;
    if (n == 0) {
      // Step next to a zero-variance row: theta = pi/2 so T = 1/4 exactly, and T11 is 1/4 there, so the
      // gaps come from sqrt(T11 T22) directly.
      const bool zero = !(h > T(0));
      o.t = zero ? T(0.25) * w : o.t;
      const T tt = w * (t1 * t2), m = tt - o.t;
      o.gm = zero ? (m > T(0) ? m : T(0)) : o.gm;
      o.gp = zero ? tt + o.t : o.gp;
    }
    return o;
  }
};

// phi(x) = sign(x): T = 1 - 2 theta / pi (NNGP only).
template <class T>
struct sign_act {
  T w;
  ARCFLOW_HD explicit sign_act(const act_params&, double w_ = 1.0) : w(T(w_)) {}
  template <class R>
  static R diag_t(const act_params&, R s) {
    return s > 0 ? R(1) : R(0);
  }  // pi/2 convention at s = 0
  template <class R>
  static R diag_tdot(const act_params&, R) {
    return R(0);
  }
  template <class R>
  ARCFLOW_HD static void row(const act_params&, R, R, R& pa, R& pb) {
    pa = R(1);
    pb = R(0);
  }
  static double log2_j0(const act_params&) { return 0.0; }
  static constexpr bool angle_based = true;
  static constexpr bool scale_free = false;
  ARCFLOW_HD pair_out<T> pair(T s12, T gm, T gp, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    return pair_angle(make_angle(gm, gp, h), s12, P, h, pa1, pb1, t1, pa2, pb2, t2);
  }
  ARCFLOW_HD pair_out<T> pair_angle(const angle<T>& g, T s12, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    (void)s12;
    (void)P;
    (void)pa1;
    (void)pb1;
    (void)pa2;
    (void)pb2;
    // The gaps 1 -/+ T are 2 theta / pi and 2 (pi - theta) / pi: the one that is small comes from x =
    // min(theta, pi - theta) directly, never as 2 - 2 theta / pi (which cancels to 0 in float32 near theta = pi,
    // and Sign's next angle is about the square root of that gap).
    const T ux = T(2) * g.x * fm::consts<T>::inv_pi;
    const bool zero = !(h > T(0));  // next to a zero-variance row T11 = 0: gaps from sqrt(T11 T22) directly
    const T tt = w * (t1 * t2);
    const T big_gap = T(2) - ux;
    pair_out<T> o;
    o.t = zero ? T(0) : w * (g.big() ? ux - T(1) : T(1) - ux);
    o.tdot = T(0);
    o.gm = zero ? (tt - o.t > T(0) ? tt - o.t : T(0)) : w * (g.big() ? big_gap : ux);
    o.gp = zero ? tt + o.t : w * (g.big() ? ux : big_gap);
    return o;
  }
};

// phi(x) = erf(x) (Williams 1997): T = 2/pi asin(2 s12 / sqrt(u1 u2)), u = 1 + 2 s,
// Tdot = 4/pi / sqrt(u1 u2 - 4 s12^2). Without cancellation: u1 u2 - 4 s12^2 = u1 + u2 - 1 + 4 gm gp and
// 1 -/+ z = [(u1 + u2 - 1) / (sqrt(u1 u2) + 2P) + 2 gm/gp] / sqrt(u1 u2). Row factors: pa = u, pb = sqrt(u).
template <class T>
struct erf_act {
  T w, c_t, c_d;  // c_t = 2w / pi, c_d = 4w / pi
  ARCFLOW_HD explicit erf_act(const act_params&, double w_ = 1.0)
      : w(T(w_)), c_t(T(2.0 * w_ / 3.14159265358979323846)), c_d(T(4.0 * w_ / 3.14159265358979323846)) {}
  static constexpr bool angle_based = false;
  static constexpr bool scale_free = false;
  // asin(z), z = 2s / (1 + 2s) = s / (1/2 + s) (no inf / inf for a huge s); above 1/2 from 1 - z = (1/2) / (1/2 + s)
  // (asin z = pi/2 - 2 asin sqrt((1 - z) / 2)): 1 - z rounded from z loses its digits for a large s, and the
  // pair formulas' gaps sqrt(T11 T22) - T need them.
  template <class R>
  static R diag_t(const act_params&, R s) {
    const R z = s / (R(0.5) + s);
    const R a = z <= R(0.5)
                    ? std::asin(z)
                    : R(1.57079632679489661923132169163975144L) - R(2) * std::asin(std::sqrt(R(0.25) / (R(0.5) + s)));
    return R(2.0 / 3.14159265358979323846) * a;
  }
  template <class R>
  static R diag_tdot(const act_params&, R s) {
    return R(4.0 / 3.14159265358979323846) / std::sqrt(R(1) + R(4) * s);
  }
  template <class R>
  ARCFLOW_HD static void row(const act_params&, R s, R, R& pa, R& pb) {
    pa = R(1) + R(2) * s;
    pb = std::sqrt(pa);
  }
  static double log2_j0(const act_params&) { return 0.0; }
  ARCFLOW_HD pair_out<T> pair(T s12, T gm, T gp, T P, T h, T pa1, T pb1, T t1, T pa2, T pb2, T t2) const {
    (void)h;
    const T U = pb1 * pb2;
    const T iU = T(1) / U;
    const T base = (pa1 + pa2 - T(1)) / (U + T(2) * P);
    const T z = T(2) * s12 * iU;
    const bool neg = z < T(0);
    const T az = neg ? -z : z;
    const T om = (base + T(2) * (neg ? gp : gm)) * iU;  // 1 - |z|
    const T as = fm::asin_pos(az, om);
    pair_out<T> o;
    o.t = c_t * (neg ? -as : as);
    o.tdot = c_d / std::sqrt(pa1 + pa2 - T(1) + T(4) * gm * gp);
    const T tt = w * (t1 * t2);
    const T m = tt - o.t, p = tt + o.t;
    o.gm = m > T(0) ? m : T(0);
    o.gp = p > T(0) ? p : T(0);
    return o;
  }
};

}  // namespace arcflow
