// Branch-free arcsine that vectorises under `#pragma omp simd` (CPU) and runs as is on CUDA.
#pragma once
// Contract: pure functions of their arguments, no errno, no tables; inline in every caller so each
// target_clones variant of a kernel gets its own vector code. Accuracy: a few ulp in double on the
// documented ranges (the rational approximation of asin on [0, 1/2] is the classic one of fdlibm,
// Sun Microsystems 1993, e_asin.c); float uses the same formula in float.
#include <cmath>

#include "arcflow/common.hpp"

namespace arcflow::fm {

template <class T>
struct consts {
  static constexpr T pi = T(3.14159265358979323846264338327950288);
  static constexpr T half_pi = T(1.57079632679489661923132169163975144);
  static constexpr T inv_pi = T(0.318309886183790671537767526745028724);
  static constexpr T inv_two_pi = T(0.159154943091895335768883763372514362);
};

// R(z) with asin(x) = x + x * R(x^2) for 0 <= x <= 1/2.
template <class T>
ARCFLOW_HD T asin_r(T z) {
  const T p = z * (T(1.66666666666666657415e-01) +
                   z * (T(-3.25565818622400915405e-01) +
                        z * (T(2.01212532134862925881e-01) +
                             z * (T(-4.00555345006794114027e-02) +
                                  z * (T(7.91534994289814532176e-04) + z * T(3.47933107596021167570e-05))))));
  const T q = T(1) + z * (T(-2.40339491173441421878e+00) +
                          z * (T(2.02094576023350569471e+00) +
                               z * (T(-6.88283971605453293030e-01) + z * T(7.70381505559019352791e-02))));
  return p / q;
}

// asin(m) for 0 <= m <= 1, given also om = 1 - m computed without cancellation by the caller
// (for m > 1/2: asin(m) = pi/2 - 2 asin(sqrt(om / 2))). Both branches are evaluated and blended.
template <class T>
ARCFLOW_HD T asin_pos(T m, T om) {
  const bool hi = m > T(0.5);
  const T w = T(0.5) * om;
  const T z = hi ? w : m * m;
  const T base = hi ? std::sqrt(w) : m;
  const T a = base + base * asin_r(z);
  return hi ? consts<T>::half_pi - T(2) * a : a;
}

// atan(z) for |z| <= tan(pi/8) (valid to 7/16): the odd polynomial of fdlibm's s_atan.c.
template <class T>
ARCFLOW_HD T atan_small(T x) {
  const T z = x * x, w = z * z;
  const T s1 = z * (T(3.33333333333329318027e-01) +
                    w * (T(1.42857142725034663711e-01) +
                         w * (T(9.09088713343650656196e-02) +
                              w * (T(6.66107313738753120669e-02) +
                                   w * (T(4.97687799461593236017e-02) + w * T(1.62858201153657823623e-02))))));
  const T s2 = w * (T(-1.99999999998764832476e-01) +
                    w * (T(-1.11111104054623557880e-01) +
                         w * (T(-7.69187620504482999495e-02) +
                              w * (T(-5.83357013379057348645e-02) + w * T(-3.65315727442169155270e-02)))));
  return x - x * (s1 + s2);
}

// float: fdlibm's 11 coefficients are for double; float needs 5. x + x z P(z), z = x^2, P of degree 4, a
// minimax fit of the relative error on |x| <= tan(pi/8) (bench/fit_atan_float.py, against mpmath): max
// relative error 5.8e-8 evaluated in float, the same as with the 11 terms (float rounding dominates).
template <>
ARCFLOW_HD float atan_small<float>(float x) {
  const float z = x * x;
  const float p = -3.333331645e-01f +
                  z * (1.999850720e-01f + z * (-1.424413919e-01f + z * (1.059794351e-01f + z * -6.087981537e-02f)));
  return x + x * (z * p);
}

template <class T>
ARCFLOW_HD T clamp01(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

}  // namespace arcflow::fm
