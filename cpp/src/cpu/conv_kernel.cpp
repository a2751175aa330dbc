// CPU body of the convolutional NNGP / NTK (conv_kernel.hpp): one pair of images at a time per thread, every
// layer on the pixel-pair covariances in the thread's scratch.
#include "arcflow/conv_kernel.hpp"

#include "arcflow/conv_plan.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "arcflow/omp_threads.hpp"

#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif

// The pair recursion is compiled three times, for baseline x86-64, x86-64-v3 (AVX2) and x86-64-v4 (AVX-512), and
// the fc kernel's choice of level (fc_isa_level: the CPU, ARCFLOW_ISA, set_fc_isa) picks one per call. The file
// is compiled without FMA contraction (CMakeLists.txt), so that the vector body and the scalar remainder of a
// loop round alike: identical patches must give identical bits wherever they sit in a row.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ARCFLOW_CONV_DISPATCH 1
#define ARCFLOW_CONV_V3 __attribute__((target("arch=x86-64-v3")))
#define ARCFLOW_CONV_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define ARCFLOW_CONV_DISPATCH 0
#endif
#define ARCFLOW_STAGE inline __attribute__((always_inline))

namespace arcflow {

template <class T>
struct conv_engine<T>::plan {
  const T *x1, *x2;
  index_t n1, n2, h, w, c;
  bool symmetric, want_ntk;
  conv_layout L;  // the ops with their sizes, the table and scratch lengths (conv_plan.hpp)
  std::vector<T> tab1, tab2;
  std::vector<T> self_nngp1, self_ntk1;
};

namespace {

index_t out_size(index_t size, index_t window, index_t stride, conv_padding pad) {
  if (pad == conv_padding::valid) return size >= window ? (size - window) / stride + 1 : 0;
  return (size + stride - 1) / stride;
}

// lax's "SAME" padding before the first element: half of what the output needs, rounded down.
index_t pad_before(index_t size, index_t window, index_t stride, conv_padding pad) {
  if (pad == conv_padding::valid) return 0;
  const index_t out = (size + stride - 1) / stride;
  const index_t total = std::max<index_t>((out - 1) * stride + window - size, 0);
  return total / 2;
}

std::string op_name(const conv_op& op) {
  switch (op.kind) {
    case conv_op_kind::dense:
      return "Dense";
    case conv_op_kind::conv:
      return "Conv";
    case conv_op_kind::pool:
      return "AvgPool";
    case conv_op_kind::act:
      return "activation";
    case conv_op_kind::flatten:
      return "Flatten";
    case conv_op_kind::gap:
      return "GlobalAvgPool";
  }
  return "?";
}

// ---- the stages of one pair's recursion (always_inline: inlined into run_pair_isa, vectorised per level) ----

// Sigma of the input: <x[p], y[q]> / C, every position pair (full) or the same positions (diag). yt is y
// transposed (C x P), so that the inner loop runs over q with unit stride.
template <class T>
ARCFLOW_STAGE void input_full(const T* x, const T* y, index_t P, index_t c, T* yt, T* s) {
  for (index_t q = 0; q < P; ++q)
    for (index_t k = 0; k < c; ++k) yt[k * P + q] = y[q * c + k];
  const T inv_c = T(1) / T(c);
  for (index_t p = 0; p < P; ++p) {
    T* __restrict o = s + p * P;
    for (index_t q = 0; q < P; ++q) o[q] = T(0);
    for (index_t k = 0; k < c; ++k) {
      const T xv = x[p * c + k];
      const T* __restrict yk = yt + k * P;
      for (index_t q = 0; q < P; ++q) o[q] += xv * yk[q];
    }
    for (index_t q = 0; q < P; ++q) o[q] *= inv_c;
  }
}

template <class T>
ARCFLOW_STAGE void input_diag(const T* x, const T* y, index_t P, index_t c, T* s) {
  const T inv_c = T(1) / T(c);
  for (index_t p = 0; p < P; ++p) {
    T acc = T(0);
    for (index_t k = 0; k < c; ++k) acc += x[p * c + k] * y[p * c + k];
    s[p] = acc * inv_c;
  }
}

// One h x w plane padded for a conv into an hp x wp plane: zeros around it (SAME) or wrapped (CIRCULAR).
template <class T>
ARCFLOW_STAGE void pad_plane(const T* in, const conv_stage& g, T* out) {
  const index_t h = g.h, w = g.w, hp = g.hp, wp = g.wp, lw = g.lw, rw = wp - w - lw;
  const bool circ = g.op.padding == conv_padding::circular;
  for (index_t i2 = 0; i2 < hp; ++i2) {
    T* __restrict o = out + i2 * wp;
    const index_t si = conv_src_index(i2 - g.lh, h, g.op.padding);
    if (si < 0) {
      for (index_t j = 0; j < wp; ++j) o[j] = T(0);
      continue;
    }
    const T* __restrict row = in + si * w;
    if (circ) {
      for (index_t j = 0; j < lw; ++j) o[j] = row[conv_src_index(j - lw, w, g.op.padding)];
      for (index_t j = 0; j < rw; ++j) o[lw + w + j] = row[conv_src_index(w + j, w, g.op.padding)];
    } else {
      for (index_t j = 0; j < lw; ++j) o[j] = T(0);
      for (index_t j = 0; j < rw; ++j) o[lw + w + j] = T(0);
    }
    for (index_t j = 0; j < w; ++j) o[lw + j] = row[j];
  }
}

// The second position padded for a conv: every first position's h x w plane becomes an hp x wp plane. The
// first position is padded by index in conv_full_sep (no copy).
template <class T>
ARCFLOW_STAGE void pad_planes(const T* in, const conv_stage& g, T* out) {
  for (index_t p = 0; p < g.h * g.w; ++p) pad_plane(in + p * g.h * g.w, g, out + p * g.hp * g.wp);
}

// Conv on every position pair: out[p, q] = w mean_{a, b} in[p + (a, b), q + (a, b)] + b, and Theta alongside:
// w mean(Theta) + Sigma_out. `in` holds hp x wp planes (pad_planes; the input itself for VALID); the first
// position's padding is by index (a plane outside the image adds nothing, SAME; wrapped, CIRCULAR). With the
// accumulator in the planes' row stride wp, each offset is one flat shifted add over the plane (conv_full_sep,
// conv_diag). The offsets are summed in the same order for every pair, so equal receptive fields give equal bits.
// M more offsets added to the running sum in one pass (First: the sum starts with them), left to right.
template <class T, int M, bool First>
ARCFLOW_STAGE void sum_chunk(const T* in, const index_t* o, index_t span, T* __restrict acc) {
  const T* __restrict a = in + o[0];
  const T* __restrict b = in + o[M > 1 ? 1 : 0];
  const T* __restrict c = in + o[M > 2 ? 2 : 0];
  const T* __restrict d = in + o[M > 3 ? 3 : 0];
  for (index_t e = 0; e < span; ++e) {
    T v = First ? a[e] : acc[e] + a[e];
    if (M > 1) v = v + b[e];
    if (M > 2) v = v + c[e];
    if (M > 3) v = v + d[e];
    acc[e] = v;
  }
}

template <class T, bool First>
ARCFLOW_STAGE void sum_chunk_of(const T* in, const index_t* o, index_t m, index_t span, T* acc) {
  switch (m) {
    case 1:
      sum_chunk<T, 1, First>(in, o, span, acc);
      return;
    case 2:
      sum_chunk<T, 2, First>(in, o, span, acc);
      return;
    case 3:
      sum_chunk<T, 3, First>(in, o, span, acc);
      return;
    default:
      sum_chunk<T, 4, First>(in, o, span, acc);
  }
}

// acc[e] = sum_k in[offs[k] + e] for e < span, the offsets added one by one in their order (the same bits for
// every pair), four per pass over acc: one store per four loads instead of one per load.
template <class T>
ARCFLOW_STAGE void sum_offsets(const T* in, const index_t* offs, index_t n, index_t span, T* acc) {
  if (n == 0) {
    for (index_t e = 0; e < span; ++e) acc[e] = T(0);
    return;
  }
  for (index_t k = 0; k < n; k += 4) {
    const index_t m = std::min<index_t>(4, n - k);
    if (k == 0)
      sum_chunk_of<T, true>(in, offs, m, span, acc);
    else
      sum_chunk_of<T, false>(in, offs + k, m, span, acc);
  }
}

// A conv's outputs from its sums (ho x wo of them at row stride wp): Sigma = w mean + b, Theta = w mean(Theta) +
// Sigma. tz: the input Theta is identically 0 (before the first conv or Dense), so its sums were skipped and
// Theta is Sigma itself (w (0 / f) + Sigma: the same value).
template <class T, bool Ntk>
ARCFLOW_STAGE void conv_out(const T* acc_s, const T* acc_t, index_t wp, index_t ho, index_t wo, T wv, T inv_f, T bv,
                            bool tz, T* __restrict so, T* __restrict to) {
  for (index_t i = 0; i < ho; ++i)
    for (index_t j = 0; j < wo; ++j) {
      const T v = wv * (acc_s[i * wp + j] * inv_f) + bv;
      so[i * wo + j] = v;
      if (Ntk) to[i * wo + j] = tz ? v : wv * (acc_t[i * wp + j] * inv_f) + v;
    }
}

// The conv on every position pair, in two separable passes: the sums over the filter's columns b for every image
// row r of the first position and output column j1 (planes H[r, j1] of the second position, fw flat shifted adds
// over (hp - 1) wp + wo values each), then over its rows a (fh adds of H planes, rows wp apart); a tap of the
// first position outside the image is skipped (SAME) or wrapped (CIRCULAR) by index. 2 fh fw / (fh + fw) times
// fewer adds than one pass over the fh fw taps, for one more pass over an array of h wo planes (sh, th: a spare
// buffer; sin may be sout, since the first pass reads all of sin before the second writes).
template <class T, bool Ntk>
ARCFLOW_STAGE void conv_full_sep(const T* sin, const T* tin, T* sh, T* th, const conv_stage& g, index_t* offs, T* acc_s,
                                 T* acc_t, T* sout, T* tout, bool tz) {
  const index_t fh = g.op.fh, fw = g.op.fw, hp = g.hp, wp = g.wp, ho = g.ho, wo = g.wo, h = g.h, w = g.w;
  const index_t plane = hp * wp, span = (ho - 1) * wp + wo, span_h = (hp - 1) * wp + wo, Po = ho * wo;
  const T inv_f = T(1) / T(fh * fw), wv = T(g.op.w_var), bv = T(g.op.b_var);
  for (index_t r = 0; r < h; ++r)
    for (index_t j1 = 0; j1 < wo; ++j1) {
      index_t n = 0;
      for (index_t b = 0; b < fw; ++b) {
        const index_t sj = conv_src_index(j1 + b - g.lw, w, g.op.padding);
        if (sj >= 0) offs[n++] = (r * w + sj) * plane + b;
      }
      const index_t o = (r * wo + j1) * plane;
      sum_offsets(sin, offs, n, span_h, sh + o);
      if (Ntk && !tz) sum_offsets(tin, offs, n, span_h, th + o);
    }
  for (index_t i1 = 0; i1 < ho; ++i1)
    for (index_t j1 = 0; j1 < wo; ++j1) {
      index_t n = 0;
      for (index_t a = 0; a < fh; ++a) {
        const index_t si = conv_src_index(i1 + a - g.lh, h, g.op.padding);
        if (si >= 0) offs[n++] = (si * wo + j1) * plane + a * wp;
      }
      sum_offsets(sh, offs, n, span, acc_s);
      if (Ntk && !tz) sum_offsets(th, offs, n, span, acc_t);
      T* __restrict so = sout + (i1 * wo + j1) * Po;
      T* __restrict to = Ntk ? tout + (i1 * wo + j1) * Po : tout;
      conv_out<T, Ntk>(acc_s, acc_t, wp, ho, wo, wv, inv_f, bv, tz, so, to);
    }
}

// The same on the same-position pairs only: a 2-D conv of the diagonal, one hp x wp plane (pad_plane; the
// input itself for VALID), also separable: the sums along each row (fw flat shifted adds over (hp - 1) wp + wo
// values, into the second half of the accumulators), then down the columns (fh adds of rows wp apart). Equal
// receptive fields still give equal bits (the same values added in the same order).
template <class T, bool Ntk>
ARCFLOW_STAGE void conv_diag(const T* sin, const T* tin, const conv_stage& g, index_t* offs, T* acc_s, T* acc_t,
                             T* sout, T* tout, bool tz) {
  const index_t fh = g.op.fh, fw = g.op.fw, hp = g.hp, wp = g.wp, ho = g.ho, wo = g.wo;
  const index_t span = (ho - 1) * wp + wo, span_h = (hp - 1) * wp + wo;
  const T inv_f = T(1) / T(fh * fw), wv = T(g.op.w_var), bv = T(g.op.b_var);
  T* hs = acc_s + hp * wp;
  T* ht = Ntk ? acc_t + hp * wp : acc_t;  // without the NTK, acc_t is one value
  for (index_t b = 0; b < fw; ++b) offs[b] = b;
  sum_offsets(sin, offs, fw, span_h, hs);
  if (Ntk && !tz) sum_offsets(tin, offs, fw, span_h, ht);
  for (index_t a = 0; a < fh; ++a) offs[a] = a * wp;
  sum_offsets(hs, offs, fh, span, acc_s);
  if (Ntk && !tz) sum_offsets(ht, offs, fh, span, acc_t);
  conv_out<T, Ntk>(acc_s, acc_t, wp, ho, wo, wv, inv_f, bv, tz, sout, tout);
}

// Dense on the pair's scalar (after the readout, or rows): the conv's formula with one offset.
template <class T, bool Ntk>
ARCFLOW_STAGE void dense_scalar(T* s, T* t, const conv_op& op) {
  const T so = T(op.w_var) * (s[0] * T(1)) + T(op.b_var);
  s[0] = so;
  if (Ntk) t[0] = T(op.w_var) * (t[0] * T(1)) + so;
}

// AvgPool along one axis of an array seen as outer x len x inner: out[o, i, k] = mean_a in[o, i st + a - lo, k]
// (the full window's count, zeros outside for SAME, wrapped for CIRCULAR).
template <class T>
ARCFLOW_STAGE void pool_axis(const T* in, T* out, index_t outer, index_t len, index_t inner, index_t olen,
                             const conv_op& op, index_t window, index_t stride, index_t lo) {
  const T inv = T(1) / T(window);
  for (index_t o = 0; o < outer; ++o)
    for (index_t i = 0; i < olen; ++i) {
      T* __restrict dst = out + (o * olen + i) * inner;
      for (index_t k = 0; k < inner; ++k) dst[k] = T(0);
      for (index_t a = 0; a < window; ++a) {
        const index_t si = conv_src_index(i * stride + a - lo, len, op.padding);
        if (si < 0) continue;
        const T* __restrict src = in + (o * len + si) * inner;
        for (index_t k = 0; k < inner; ++k) dst[k] += src[k];
      }
      for (index_t k = 0; k < inner; ++k) dst[k] *= inv;
    }
}

// AvgPool on both positions of every pair: four one-axis passes (h1, h2, w1, w2), ping-ponging between the
// array and tmp; the result ends in tmp or back in the array (returns which).
template <class T>
ARCFLOW_STAGE T* pool_full(T* a, T* tmp, const conv_stage& g) {
  const conv_op& op = g.op;
  index_t d[4] = {g.h, g.w, g.h, g.w};
  const index_t od[4] = {g.ho, g.wo, g.ho, g.wo};
  const index_t win[4] = {op.fh, op.fw, op.fh, op.fw}, str[4] = {op.sh, op.sw, op.sh, op.sw};
  const index_t lo[4] = {g.lh, g.lw, g.lh, g.lw};
  T* src = a;
  T* dst = tmp;
  for (int ax : {0, 2, 1, 3}) {
    index_t outer = 1, inner = 1;
    for (int k = 0; k < ax; ++k) outer *= d[k];
    for (int k = ax + 1; k < 4; ++k) inner *= d[k];
    pool_axis(src, dst, outer, d[ax], inner, od[ax], op, win[ax], str[ax], lo[ax]);
    d[ax] = od[ax];
    std::swap(src, dst);
  }
  return src;
}

// Sum in double of n values at stride `step`, in eight interleaved partial sums (a fixed order: the same bits
// for every pair; one long dependency chain would cost as much as a layer).
template <class T>
ARCFLOW_STAGE double sum_double(const T* v, index_t n, index_t step) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += double(v[(i + k) * step]);
  for (; i < n; ++i) acc[i % 8] += double(v[i * step]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Per-position factors of an activation from the image's variances s: r = sqrt(s), 1/r (0 at s = 0), pa, pb.
template <class T, class Act>
ARCFLOW_STAGE void act_factors(const act_params& p, const T* s, index_t n, T* f) {
  for (index_t i = 0; i < n; ++i) {
    const T r = std::sqrt(s[i]);
    T pa, pb;
    Act::row(p, s[i], r, pa, pb);
    f[i] = r;
    f[n + i] = r > T(0) ? T(1) / r : T(0);
    f[2 * n + i] = pa;
    f[3 * n + i] = pb;
  }
}

// The activation on every position pair (full: P1 x P2 with the two images' factor arrays f1, f2) or on the
// same-position pairs (diag: P values).
template <class T, class Act, bool Ntk>
ARCFLOW_STAGE void act_full(const Act& act, const T* s1, const T* f1, const T* s2, const T* f2, index_t P, T* s, T* t) {
  for (index_t p = 0; p < P; ++p) {
    const T a_s = s1[p], a_r = f1[p], a_ir = f1[P + p], a_pa = f1[2 * P + p], a_pb = f1[3 * P + p];
    T* __restrict so = s + p * P;
    T* __restrict to = Ntk ? t + p * P : t;
    const T* __restrict b_s = s2, * __restrict b_r = f2, * __restrict b_ir = f2 + P, * __restrict b_pa = f2 + 2 * P, * __restrict b_pb = f2 + 3 * P;
    for (index_t q = 0; q < P; ++q) {
      const pair_out<T> o =
          conv_act_pair<T>(act, so[q], a_s, a_r, a_ir, a_pa, a_pb, b_s[q], b_r[q], b_ir[q], b_pa[q], b_pb[q]);
      so[q] = o.t;
      if (Ntk) to[q] = o.tdot * to[q];
    }
  }
}

template <class T, class Act, bool Ntk>
ARCFLOW_STAGE void act_diag(const Act& act, const T* s1, const T* f1, const T* s2, const T* f2, index_t P, T* s, T* t) {
  const T* __restrict a_s = s1, * __restrict a_r = f1, * __restrict a_ir = f1 + P, * __restrict a_pa = f1 + 2 * P, * __restrict a_pb = f1 + 3 * P;
  const T* __restrict b_s = s2, * __restrict b_r = f2, * __restrict b_ir = f2 + P, * __restrict b_pa = f2 + 2 * P, * __restrict b_pb = f2 + 3 * P;
  T* __restrict so = s;
  T* __restrict to = t;
#pragma GCC ivdep
  for (index_t p = 0; p < P; ++p) {
    const pair_out<T> o = conv_act_pair<T>(act, so[p], a_s[p], a_r[p], a_ir[p], a_pa[p], a_pb[p], b_s[p], b_r[p],
                                           b_ir[p], b_pa[p], b_pb[p]);
    so[p] = o.t;
    if (Ntk) to[p] = o.tdot * to[p];
  }
}

// One activation stage on the pairs, for the activation's own type (ReLU-like ABReLUs and monomials of order
// <= 4 specialised, as in the fully-connected engine). The images' table rows hold each position's variance
// and, after it, its factors (act_factors: 4 P values); an image's own run (self) computes them into its row.
template <class T, class Act, bool Ntk>
ARCFLOW_STAGE void act_typed(const Act& act, const act_params& p, bool diag, bool self, T* tab1, const T* tab2,
                             index_t P, T* s, T* t) {
  if (self) act_factors<T, Act>(p, tab1, P, tab1 + P);
  if (diag)
    act_diag<T, Act, Ntk>(act, tab1, tab1 + P, tab2, tab2 + P, P, s, t);
  else
    act_full<T, Act, Ntk>(act, tab1, tab1 + P, tab2, tab2 + P, P, s, t);
}

template <class T, bool Ntk>
ARCFLOW_STAGE void act_stage(const act_params& p, bool diag, bool self, T* s1, const T* s2, index_t P, T* s, T* t) {
  switch (p.kind) {
    case act_kind::abrelu:
      if (p.a * p.b == 0.0)
        act_typed<T, abrelu_act<T, true>, Ntk>(abrelu_act<T, true>(p), p, diag, self, s1, s2, P, s, t);
      else
        act_typed<T, abrelu_act<T>, Ntk>(abrelu_act<T>(p), p, diag, self, s1, s2, P, s, t);
      return;
    case act_kind::monomial:
      switch (p.n) {
        case 0:
          act_typed<T, monomial_act<T, 0>, Ntk>(monomial_act<T, 0>(p), p, diag, self, s1, s2, P, s, t);
          return;
        case 1:
          act_typed<T, monomial_act<T, 1>, Ntk>(monomial_act<T, 1>(p), p, diag, self, s1, s2, P, s, t);
          return;
        case 2:
          act_typed<T, monomial_act<T, 2>, Ntk>(monomial_act<T, 2>(p), p, diag, self, s1, s2, P, s, t);
          return;
        default:
          act_typed<T, monomial_act<T>, Ntk>(monomial_act<T>(p), p, diag, self, s1, s2, P, s, t);
          return;
      }
    case act_kind::sign:
      act_typed<T, sign_act<T>, Ntk>(sign_act<T>(p), p, diag, self, s1, s2, P, s, t);
      return;
    case act_kind::erf:
      act_typed<T, erf_act<T>, Ntk>(erf_act<T>(p), p, diag, self, s1, s2, P, s, t);
      return;
  }
}

// A thread's scratch: Sigma and Theta and a second buffer of each, the transposed image, the conv accumulators.
template <class T>
struct conv_scratch {
  std::vector<T> s, s2, t, t2, yt, acc_s, acc_t;
  std::vector<index_t> offs;
  conv_scratch(index_t buf, index_t pos, index_t c, bool ntk, index_t acc, index_t taps)
      : s(size_t(buf)),
        s2(size_t(buf)),
        t(ntk ? size_t(buf) : 1),
        t2(ntk ? size_t(buf) : 1),
        yt(size_t(pos * c)),
        acc_s(size_t(2 * acc)),
        acc_t(ntk ? size_t(2 * acc) : 1),
        offs(size_t(taps)) {}
};

// Where one pair's run reads its images' variances (tab1, tab2: rows of the tables) or, for an image with
// itself (self), writes them; the result (k, Theta) and, for self, the first op whose value left T's range.
template <class T>
struct pair_io {
  const T *x, *y;
  T* tab1;
  const T* tab2;
  bool self;
  T nngp, ntk;
  int bad_op;
};

template <class T>
bool finite_diag(const T* s, index_t P, bool diag) {
  for (index_t p = 0; p < P; ++p)
    if (!std::isfinite(double(diag ? s[p] : s[p * P + p]))) return false;
  return true;
}

// One pair's recursion, every op in order, in the scratch. Self runs record each activation's variances
// (the diagonal at that point) and stop at the first non-finite value.
template <class T, bool Ntk>
ARCFLOW_STAGE void run_pair(const typename conv_engine<T>::plan& pl, pair_io<T>& io, conv_scratch<T>& sc) {
  const bool diag = pl.L.diag_mode;
  T* s = sc.s.data();
  T* so = sc.s2.data();
  T* t = sc.t.data();
  T* to = sc.t2.data();
  index_t P = pl.h * pl.w;
  if (diag)
    input_diag(io.x, io.y, P, pl.c, s);
  else
    input_full(io.x, io.y, P, pl.c, sc.yt.data(), s);
  // Theta starts identically 0: until the first conv or Dense it is not stored (tz), and an op that needs its
  // values before then (an activation, a readout) writes the zeros first.
  bool tz = Ntk;
  auto zero_theta = [&]() {
    if (tz) std::fill(t, t + (diag || P == 1 ? P : P * P), T(0));
    tz = false;
  };
  io.bad_op = -1;
  if (io.self && !finite_diag(s, P, diag)) {
    io.bad_op = 0;
    return;
  }
  for (size_t k = 0; k < pl.L.st.size(); ++k) {
    const conv_stage& g = pl.L.st[k];
    const conv_op& op = g.op;
    switch (op.kind) {
      case conv_op_kind::dense:
        zero_theta();
        dense_scalar<T, Ntk>(s, t, op);
        break;
      case conv_op_kind::conv:
        if (op.padding == conv_padding::valid) {
          if (diag) {
            conv_diag<T, Ntk>(s, t, g, sc.offs.data(), sc.acc_s.data(), sc.acc_t.data(), so, to, tz);
            std::swap(s, so);
            std::swap(t, to);
          } else {  // the column sums into the spare buffers, the result back into the arrays
            conv_full_sep<T, Ntk>(s, t, so, to, g, sc.offs.data(), sc.acc_s.data(), sc.acc_t.data(), s, t, tz);
          }
        } else if (diag) {  // pad into the spare buffers, then convolve back into the arrays themselves
          pad_plane(s, g, so);
          if (Ntk && !tz) pad_plane(t, g, to);
          conv_diag<T, Ntk>(so, to, g, sc.offs.data(), sc.acc_s.data(), sc.acc_t.data(), s, t, tz);
        } else {
          pad_planes(s, g, so);  // padded into the spare buffers, column sums into the arrays, result in the spares
          if (Ntk && !tz) pad_planes(t, g, to);
          conv_full_sep<T, Ntk>(so, to, s, t, g, sc.offs.data(), sc.acc_s.data(), sc.acc_t.data(), so, to, tz);
          std::swap(s, so);
          std::swap(t, to);
        }
        tz = false;
        P = g.ho * g.wo;
        break;
      case conv_op_kind::pool:
        if (pool_full(s, so, g) != s) std::swap(s, so);
        if (Ntk && !tz && pool_full(t, to, g) != t) std::swap(t, to);
        P = g.ho * g.wo;
        break;
      case conv_op_kind::act: {
        zero_theta();
        T* own = io.tab1 + g.tab;  // self: written here from the diagonal
        if (io.self)
          for (index_t p = 0; p < P; ++p) own[p] = diag ? s[p] : s[p * P + p];
        const T* other = io.self ? own : io.tab2 + g.tab;
        act_stage<T, Ntk>(op.act, diag || P == 1, io.self, own, other, P, s, t);
        break;
      }
      case conv_op_kind::flatten:
      case conv_op_kind::gap: {
        zero_theta();
        const bool all = op.kind == conv_op_kind::gap;
        // the values summed: all P^2 pairs (GAP), or the P same-position pairs (Flatten; stride P + 1 in full)
        const index_t cnt_v = all ? P * P : P, step = all || diag ? 1 : P + 1;
        const double a = sum_double(s, cnt_v, step), b = Ntk ? sum_double(t, cnt_v, step) : 0.0;
        const double cnt = all ? double(P) * double(P) : double(P);
        s[0] = T(a / cnt);
        if (Ntk) t[0] = T(b / cnt);
        P = 1;
        break;
      }
    }
    if (io.self && !finite_diag(s, P, diag || P == 1)) {
      io.bad_op = int(k) + 1;
      return;
    }
  }
  io.nngp = s[0];
  io.ntk = Ntk ? t[0] : T(0);
}

template <class T, bool Ntk>
void run_pair_generic(const typename conv_engine<T>::plan& pl, pair_io<T>& io, conv_scratch<T>& sc) {
  run_pair<T, Ntk>(pl, io, sc);
}
#if ARCFLOW_CONV_DISPATCH
template <class T, bool Ntk>
ARCFLOW_CONV_V3 void run_pair_avx2(const typename conv_engine<T>::plan& pl, pair_io<T>& io, conv_scratch<T>& sc) {
  run_pair<T, Ntk>(pl, io, sc);
}
template <class T, bool Ntk>
ARCFLOW_CONV_V4 void run_pair_avx512(const typename conv_engine<T>::plan& pl, pair_io<T>& io, conv_scratch<T>& sc) {
  run_pair<T, Ntk>(pl, io, sc);
}
#endif

template <class T>
using pair_fn = void (*)(const typename conv_engine<T>::plan&, pair_io<T>&, conv_scratch<T>&);

template <class T>
pair_fn<T> select_pair_fn(bool ntk) {
#if ARCFLOW_CONV_DISPATCH
  const int isa = fc_isa_level();
  if (isa == 2) return ntk ? &run_pair_avx512<T, true> : &run_pair_avx512<T, false>;
  if (isa == 1) return ntk ? &run_pair_avx2<T, true> : &run_pair_avx2<T, false>;
#endif
  return ntk ? &run_pair_generic<T, true> : &run_pair_generic<T, false>;
}

// Values of one thread's scratch (conv_scratch): four pixel-pair arrays, two conv accumulators of two planes each, the
// transposed image.
index_t scratch_values(index_t buf, index_t acc, index_t pos, index_t c) { return 4 * buf + 4 * acc + pos * c; }

std::string mib(double bytes) { return std::to_string(static_cast<long long>(bytes / (1 << 20) + 0.5)) + " MiB"; }

template <class T>
std::vector<std::unique_ptr<conv_scratch<T>>> make_scratch(const typename conv_engine<T>::plan& pl, int threads) {
  std::vector<std::unique_ptr<conv_scratch<T>>> v;
  try {
    for (int k = 0; k < threads; ++k)
      v.push_back(std::make_unique<conv_scratch<T>>(pl.L.buf_len, pl.L.max_pos, pl.c, pl.want_ntk, pl.L.acc_len,
                                                    pl.L.max_taps));
  } catch (const std::bad_alloc&) {
    const double each = double(scratch_values(pl.L.buf_len, pl.L.acc_len, pl.L.max_pos, pl.c)) * sizeof(T);
    throw allocation_error("arcflow: out of memory allocating the pixel-pair buffers of " + std::to_string(threads) +
                           " threads (" + mib(double(threads) * each) + "); use fewer threads or smaller images");
  }
  return v;
}

// Runs f(item, scratch) for items [0, n) over `threads` threads; the calling thread polls the interrupt.
template <class T, class F>
void parallel_items(index_t n, int threads, std::vector<std::unique_ptr<conv_scratch<T>>>& sc,
                    const interrupt_fn& interrupt, F&& f) {
  std::atomic<bool> stop{false};
#ifdef ARCFLOW_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef ARCFLOW_HAVE_OPENMP
    const int me = omp_get_thread_num();
#else
    const int me = 0;
#endif
#ifdef ARCFLOW_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (index_t i = 0; i < n; ++i) {
      if (me == 0 && interrupt && !stop.load(std::memory_order_relaxed) && interrupt())
        stop.store(true, std::memory_order_relaxed);
      if (stop.load(std::memory_order_relaxed)) continue;
      f(i, *sc[size_t(me)]);
    }
  }
  if (stop.load()) throw interrupted();
}

int clamp_threads(int threads, index_t items) {
  threads = int(std::max<index_t>(1, std::min<index_t>(omp_threads(threads), std::max<index_t>(items, 1))));
#ifdef ARCFLOW_HAVE_OPENMP
  threads = std::min(threads, std::max(256, 4 * omp_get_num_procs()));
#endif
  return threads;
}

// The ops with their sizes; throws std::invalid_argument for an image too small or a bad op.
std::vector<conv_stage> make_stages(index_t h, index_t w, const std::vector<conv_op>& ops, index_t& tab_len) {
  std::vector<conv_stage> st;
  tab_len = 0;
  for (size_t k = 0; k < ops.size(); ++k) {
    const conv_op& op = ops[k];
    conv_stage g{};
    g.op = op;
    g.h = g.ho = g.hp = h;
    g.w = g.wo = g.wp = w;
    g.lh = g.lw = 0;
    g.tab = -1;
    switch (op.kind) {
      case conv_op_kind::conv:
      case conv_op_kind::pool: {
        const index_t sh = op.kind == conv_op_kind::conv ? 1 : op.sh, sw = op.kind == conv_op_kind::conv ? 1 : op.sw;
        ARCFLOW_CHECK(op.fh >= 1 && op.fw >= 1 && sh >= 1 && sw >= 1,
                      "bad window or stride in op " + std::to_string(k));
        g.ho = out_size(h, op.fh, sh, op.padding);
        g.wo = out_size(w, op.fw, sw, op.padding);
        ARCFLOW_CHECK(g.ho > 0 && g.wo > 0,
                      "the images are too small for " + op_name(op) + " (op " + std::to_string(k) + ")");
        g.lh = pad_before(h, op.fh, sh, op.padding);
        g.lw = pad_before(w, op.fw, sw, op.padding);
        if (op.kind == conv_op_kind::conv && op.padding != conv_padding::valid) {
          g.hp = g.ho + op.fh - 1;
          g.wp = g.wo + op.fw - 1;
        }
        break;
      }
      case conv_op_kind::act:  // the variances and the four factor arrays of act_factors
        g.tab = tab_len;
        tab_len += 5 * h * w;
        break;
      case conv_op_kind::flatten:
      case conv_op_kind::gap:
        g.ho = g.wo = 1;
        break;
      case conv_op_kind::dense:
        ARCFLOW_CHECK(h * w == 1, "Dense on images (op " + std::to_string(k) + ")");
        break;
    }
    st.push_back(g);
    h = g.ho;
    w = g.wo;
  }
  ARCFLOW_CHECK(h == 1 && w == 1, "the network has no readout");
  return st;
}

bool is_diag_mode(const std::vector<conv_op>& ops) {
  for (const conv_op& op : ops)
    if (op.kind == conv_op_kind::pool || op.kind == conv_op_kind::gap) return false;
  return true;
}

// Values per scratch array: the largest array of any op, its padded copy and the pooling passes included.
index_t buffer_len(index_t h, index_t w, const std::vector<conv_stage>& st, bool diag, index_t& max_pos, index_t& acc) {
  acc = 1;
  auto sq = [diag](index_t p) { return diag ? p : p * p; };
  index_t len = sq(h * w);
  max_pos = h * w;
  for (const conv_stage& g : st) {
    len = std::max({len, diag ? g.hp * g.wp : g.h * g.w * g.hp * g.wp, sq(g.ho * g.wo)});
    acc = std::max(acc, g.hp * g.wp);
    max_pos = std::max({max_pos, g.h * g.w, g.ho * g.wo});
    if (g.op.kind == conv_op_kind::pool) {
      // the passes h1, h2, w1, w2: after h1, after h1 and h2, ...
      const index_t a = std::max(g.h, g.ho), b = std::max(g.w, g.wo);
      len = std::max(len, a * a * b * b);
    }
  }
  return len;
}

}  // namespace

conv_layout make_conv_layout(index_t h, index_t w, const std::vector<conv_op>& ops) {
  conv_layout L;
  L.diag_mode = is_diag_mode(ops);
  L.st = make_stages(h, w, ops, L.tab_len);
  L.buf_len = buffer_len(h, w, L.st, L.diag_mode, L.max_pos, L.acc_len);
  for (const conv_op& op : ops) L.max_taps = std::max<index_t>(L.max_taps, index_t(op.fh) * op.fw);
  return L;
}

std::string conv_overflow_message(const std::vector<conv_op>& ops, int bad_op, bool single_precision) {
  const std::string where =
      bad_op == 0 ? "the input covariance"
                  : "after op " + std::to_string(bad_op - 1) + " (" + op_name(ops[size_t(bad_op - 1)]) + ")";
  return std::string("the kernel of an image with itself is not finite in ") +
         (single_precision ? "float32" : "float64") + " " + where +
         ": the exact kernel leaves the dtype's range; scale the inputs or the weights down";
}

template <class T>
conv_engine<T>::conv_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t h, index_t w, index_t c,
                            bool symmetric, const std::vector<conv_op>& ops, bool want_ntk, int threads,
                            const interrupt_fn& interrupt)
    : plan_(new plan) {
  std::unique_ptr<plan> own(plan_);
  plan& pl = *plan_;
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && h >= 1 && w >= 1 && c >= 1, "bad image shape");
  ARCFLOW_CHECK(!symmetric || (x2 == x1 && n2 == n1), "symmetric needs x2 == x1");
  pl.x1 = x1;
  pl.x2 = x2;
  pl.n1 = n1;
  pl.n2 = n2;
  pl.h = h;
  pl.w = w;
  pl.c = c;
  pl.symmetric = symmetric;
  pl.want_ntk = want_ntk;
  pl.L = make_conv_layout(h, w, ops);
  try {
    pl.tab1.resize(size_t(n1 * pl.L.tab_len));
    if (!symmetric) pl.tab2.resize(size_t(n2 * pl.L.tab_len));
    pl.self_nngp1.resize(size_t(n1));
    pl.self_ntk1.resize(size_t(n1));
  } catch (const std::bad_alloc&) {
    throw allocation_error("arcflow: out of memory allocating the per-image variance tables (" +
                           mib(double(n1 + n2) * double(pl.L.tab_len) * sizeof(T)) + ")");
  }
  // Every image's own recursion: its tables, its k(x, x) and the first op whose value overflowed.
  const index_t n_self = n1 + (symmetric ? 0 : n2);
  threads = clamp_threads(threads, n_self);
  auto scratch = make_scratch<T>(pl, threads);
  const pair_fn<T> fn = select_pair_fn<T>(want_ntk);
  std::atomic<int> bad_op{-1};
  std::atomic<index_t> bad_img{-1};
  const index_t img = h * w * c;
  parallel_items<T>(n_self, threads, scratch, interrupt, [&](index_t i, conv_scratch<T>& sc) {
    const bool first = i < n1;
    const T* x = first ? x1 + i * img : x2 + (i - n1) * img;
    T* tab = first ? pl.tab1.data() + i * pl.L.tab_len : pl.tab2.data() + (i - n1) * pl.L.tab_len;
    pair_io<T> io{x, x, tab, tab, true, T(0), T(0), -1};
    fn(pl, io, sc);
    if (io.bad_op >= 0) {
      int cur = bad_op.load();
      while ((cur < 0 || io.bad_op < cur) && !bad_op.compare_exchange_weak(cur, io.bad_op)) {
      }
      bad_img.store(first ? i : i - n1);
      return;
    }
    if (first) {
      pl.self_nngp1[size_t(i)] = io.nngp;
      pl.self_ntk1[size_t(i)] = io.ntk;
    }
  });
  if (bad_op.load() >= 0) throw fp_overflow(conv_overflow_message(ops, bad_op.load(), sizeof(T) == 4));
  own.release();
}

template <class T>
conv_engine<T>::~conv_engine() {
  delete plan_;
}

template <class T>
void conv_engine<T>::rows(index_t r0, index_t r1, T* nngp, T* ntk, int threads, const interrupt_fn& interrupt) const {
  const plan& pl = *plan_;
  ARCFLOW_CHECK(0 <= r0 && r0 <= r1 && r1 <= pl.n1, "row range out of bounds");
  ARCFLOW_CHECK(!ntk || pl.want_ntk, "the engine was built without the NTK");
  struct pair_id {
    index_t i, j;
  };
  // The pairs in tiles of b x b images, a column of tiles at a time: the images and table rows a tile reads
  // (2 b of them, about 256 KB) stay in cache, each column's once for all the rows; in plain pair order a
  // pair's two table rows (5 values per position and activation) come from memory once n is large.
  const index_t row_bytes = (pl.L.tab_len + pl.h * pl.w * pl.c) * index_t(sizeof(T));
  const index_t b = std::clamp<index_t>(index_t(256 * 1024) / (2 * row_bytes), 1, 64);
  std::vector<pair_id> pairs;
  for (index_t jb = 0; jb < pl.n2; jb += b)
    for (index_t ib = r0; ib < r1; ib += b)
      for (index_t i = ib; i < std::min(ib + b, r1); ++i)
        for (index_t j = std::max(jb, pl.symmetric ? i + 1 : 0); j < std::min(jb + b, pl.n2); ++j)
          pairs.push_back({i, j});
  const index_t n2 = pl.n2;
  if (pl.symmetric)
    for (index_t i = r0; i < r1; ++i) {
      if (nngp) nngp[i * n2 + i] = pl.self_nngp1[size_t(i)];
      if (ntk) ntk[i * n2 + i] = pl.self_ntk1[size_t(i)];
    }
  const index_t np = index_t(pairs.size());
  if (np == 0) return;
  threads = clamp_threads(threads, np);
  auto scratch = make_scratch<T>(pl, threads);
  const pair_fn<T> fn = select_pair_fn<T>(ntk != nullptr);
  const index_t img = pl.h * pl.w * pl.c;
  const T* tab2 = pl.symmetric ? pl.tab1.data() : pl.tab2.data();
  const T* x2 = pl.symmetric ? pl.x1 : pl.x2;
  parallel_items<T>(np, threads, scratch, interrupt, [&](index_t k, conv_scratch<T>& sc) {
    const index_t i = pairs[size_t(k)].i, j = pairs[size_t(k)].j;
    pair_io<T> io{pl.x1 + i * img,
                  x2 + j * img,
                  const_cast<T*>(pl.tab1.data()) + i * pl.L.tab_len,
                  tab2 + j * pl.L.tab_len,
                  false,
                  T(0),
                  T(0),
                  -1};
    fn(pl, io, sc);
    if (nngp) nngp[i * n2 + j] = io.nngp;
    if (ntk) ntk[i * n2 + j] = io.ntk;
    if (pl.symmetric) {
      if (nngp) nngp[j * n2 + i] = io.nngp;
      if (ntk) ntk[j * n2 + i] = io.ntk;
    }
  });
}

template <class T>
void conv_engine<T>::diag(T* nngp, T* ntk) const {
  const plan& pl = *plan_;
  ARCFLOW_CHECK(!ntk || pl.want_ntk, "the engine was built without the NTK");
  for (index_t i = 0; i < pl.n1; ++i) {
    if (nngp) nngp[i] = pl.self_nngp1[size_t(i)];
    if (ntk) ntk[i] = pl.self_ntk1[size_t(i)];
  }
}

template <class T>
index_t conv_engine<T>::scratch_bytes(index_t h, index_t w, index_t c, const std::vector<conv_op>& ops) {
  const conv_layout L = make_conv_layout(h, w, ops);
  return scratch_values(L.buf_len, L.acc_len, L.max_pos, c) * index_t(sizeof(T));
}

template <class T>
index_t conv_engine<T>::table_bytes(index_t n, index_t h, index_t w, const std::vector<conv_op>& ops) {
  return n * (make_conv_layout(h, w, ops).tab_len * index_t(sizeof(T)) + 2 * index_t(sizeof(T)));
}

template <class T>
double conv_engine<T>::pair_work(index_t h, index_t w, index_t c, const std::vector<conv_op>& ops) {
  const conv_layout L = make_conv_layout(h, w, ops);
  const bool diag = L.diag_mode;
  auto sq = [diag](double p) { return diag ? p : p * p; };
  double work = sq(double(h * w)) * double(c);
  for (const conv_stage& g : L.st) {
    const double in = sq(double(g.h * g.w)), out = sq(double(g.ho * g.wo));
    switch (g.op.kind) {
      case conv_op_kind::conv:
        work += out * g.op.fh * g.op.fw + (diag ? double(g.hp * g.wp) : double(g.h * g.w * g.hp * g.wp));
        break;
      case conv_op_kind::pool:
        work += in * 2 * (g.op.fh + g.op.fw);
        break;
      case conv_op_kind::act:
        work += 20 * in;  // an angle and the pair formula: about 20 adds' worth
        break;
      default:
        work += in;
    }
  }
  return work;
}

template class conv_engine<float>;
template class conv_engine<double>;

}  // namespace arcflow
