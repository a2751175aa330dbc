// Branch-free arcsine that vectorises under `#pragma omp simd` (CPU) and runs as is on CUDA.
#pragma once
// Contract: pure functions of their arguments, no errno, no tables; inline in every caller so each
// instruction-set variant of a kernel (fc_kernel.cpp, run_tile_avx2 ...) gets its own vector code.
// Accuracy: a few ulp in double on the documented ranges (the rational approximation of asin on [0, 1/2] is
// the classic one of fdlibm, Sun Microsystems 1993, e_asin.c); float uses the same formula in float.
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

// asin(u) for 0 <= u <= 1/sqrt(2) without a division: u + u z R(z), z = u^2, R a polynomial of 18 terms
// (double) or 8 (float), the Chebyshev interpolant of (asin(u) - u) / (u z) on 0 <= z <= 1/2 (bench/fit_asin.py,
// against mpmath: 2.2e-16 relative (1 ulp) in double, 6.4e-8 in float, both evaluated in their own precision). The
// polynomial is evaluated in four (double) or two (float) interleaved Horner chains in powers of z^4 or z^2:
// the same multiply-adds give a dependency chain a quarter as long, which the kernels that use it need (their
// out-of-order window holds fewer pairs than one long chain would want).
template <class T>
ARCFLOW_HD T asin_poly(T u) {
  const T z = u * u, z2 = z * z, z4 = z2 * z2;
  // c16, c17, c14, c15
  T a = T(-2.27799048944163296e+00), b = T(6.62947554836909703e-01), c = T(-3.74159930020013665e+00),
    d = T(3.73164748163152238e+00);
  a = a * z4 + T(-1.25868130039458803e+00);  // c12
  b = b * z4 + T(2.57350806440159285e+00);   // c13
  c = c * z4 + T(-1.17478413955545799e-01);  // c10
  d = d * z4 + T(4.65810610838920058e-01);   // c11
  a = a * z4 + T(5.89196238384891244e-03);   // c8
  b = b * z4 + T(3.38239774772275542e-02);   // c9
  c = c * z4 + T(1.39298243013627875e-02);   // c6
  d = d * z4 + T(1.19855590327312585e-02);   // c7
  a = a * z4 + T(2.23720863036868424e-02);   // c4
  b = b * z4 + T(1.73547306689968428e-02);   // c5
  c = c * z4 + T(4.46428571235851571e-02);   // c2
  d = d * z4 + T(3.03819460780238582e-02);   // c3
  a = a * z4 + T(1.66666666666666602e-01);   // c0
  b = b * z4 + T(7.50000000000898281e-02);   // c1
  const T p = (a + z * b) + z2 * (c + z * d);
  return u + u * (z * p);
}
template <>
ARCFLOW_HD float asin_poly<float>(float u) {
  const float z = u * u, z2 = z * z;
  float a = -7.972071320e-02f, b = 9.469734877e-02f;  // c6, c7
  a = a * z2 + 1.043532602e-02f;                      // c4
  b = b * z2 + 6.379697472e-02f;                      // c5
  a = a * z2 + 4.453881457e-02f;                      // c2
  b = b * z2 + 3.199023753e-02f;                      // c3
  a = a * z2 + 1.666666567e-01f;                      // c0
  b = b * z2 + 7.500252128e-02f;                      // c1
  return u + u * (z * (a + z * b));
}

// arccos(x) for -1 <= x <= 1 with one square root and asin_poly, no division: the fastest vectorised arccos
// of this library (the roofline's arccos rate, acos_throughput). x = cos(t), 0 <= t <= pi.
template <class T>
ARCFLOW_HD T acos_poly(T x) {
  const T a = std::fabs(x);
  const T s = std::sqrt((T(1) - a) * (T(1) + a));  // sin(t)
  const bool small = s <= a;                       // acos(|x|) <= pi/4
  const T as = asin_poly(small ? s : a);
  const T t = small ? as : consts<T>::half_pi - as;
  return x < T(0) ? consts<T>::pi - t : t;
}

template <class T>
ARCFLOW_HD T clamp01(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

}  // namespace arcflow::fm
