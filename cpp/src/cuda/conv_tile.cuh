// The convolutional NNGP / NTK on a CUDA device (device code): one block per pair of images, every layer on the
// pair's pixel-pair covariances in the block's slice of a global scratch buffer.
#pragma once
// Contract: included by conv_kernel_cuda.cu and by the host emulation in tests (tests/kernels/conv_cuda_emulation.cpp,
// which maps the CUDA built-ins to plain C++, so the logic is checked without a GPU).
// - The ops and their sizes are the CPU engine's plan (conv_plan.hpp: make_conv_layout); each stage is the CPU
//   engine's (cpp/src/cpu/conv_kernel.cpp) with the same formula per element, the threads of a block striding
//   over the elements (Sigma[p, q] for every position pair, or the same-position pairs only in diag mode), a
//   __syncthreads between stages. A conv reads its input at the two shifted positions directly (no padded copy):
//   taps outside the image (SAME) are skipped, wrapped (CIRCULAR); AvgPool is the CPU's four one-axis passes.
// - Two launches share the kernel: the self pass (every image with itself) writes each image's table row (the
//   variances of every activation's input and their factors, as the CPU engine's own run) and k(x, x), and
//   reports the first op whose value left T's range; the pair pass reads the tables. Both run the same device
//   code, so an image pair's covariance at two positions with identical receptive fields has the bits of the
//   variances in the tables, and the gap sqrt(S11 S22) - S12 is exactly 0 there (no arccos(1 - eps)).
// - The readouts sum in double: per thread in element order, then thread 0 over the threads in order (the same
//   order for every pair of one launch configuration).
// - Indices inside a pair's arrays are int (the host checks that they fit): 32-bit division is several times
//   cheaper than 64-bit on the device, and every element splits its index into positions.
// - Blocks take items (images, or pairs of rows [r0, r0 + rows) x columns [0, n2)) grid-stride; in the symmetric
//   case pairs with j <= i are skipped (the host takes the diagonal from the self pass and mirrors).
#include <algorithm>
#include <cmath>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"
#include "arcflow/conv_plan.hpp"

namespace arcflow::cuda_detail {

constexpr int CONV_THREADS = 256;  // the largest block; the code works for any blockDim.x up to it

template <class T>
struct conv_args {
  const conv_stage* st;  // the layout's stages, in device memory
  int nst;
  const T* x1;
  const T* x2;  // == x1 when symmetric
  index_t n1, n2, h, w, c;
  int diag_mode, want_ntk, symmetric;
  T* tab1;  // table rows of x1 (tab_len values each): written by the self pass, read by the pair pass
  T* tab2;  // of x2 (== tab1 when symmetric)
  index_t tab_len;
  T* scratch;  // per block: 2 (NNGP) or 4 (NTK) arrays of buf_len values
  index_t buf_len;
  int self;  // 1: the self pass over images [0, n1) of x1 then (not symmetric) [0, n2) of x2
  T* self_nngp;
  T* self_ntk;
  int* bad;          // self pass: per image, the first op (1 + index; 0 the input) whose value is not finite, or -1
  index_t r0, rows;  // pair pass: rows [r0, r0 + rows) of x1 against all of x2
  T* out_nngp;       // rows x n2 (row i at i - r0) or nullptr
  T* out_ntk;
};

template <class T>
ARCFLOW_HD bool conv_finite(T v) {
  return v - v == T(0);  // NaN and inf give NaN
}

// True when the diagonal of the P x P array s (or the P values of diag mode) is finite; block-uniform.
template <class T>
__device__ bool block_finite(const T* s, index_t P, bool diag, int* flag) {
  if (threadIdx.x == 0) *flag = 0;
  __syncthreads();
  for (index_t p = threadIdx.x; p < P; p += blockDim.x)
    if (!conv_finite(diag ? s[p] : s[p * P + p])) *flag = 1;
  __syncthreads();
  const bool ok = *flag == 0;
  __syncthreads();
  return ok;
}

// Sum in double of v[0], v[step], ... (n values); the result is valid in thread 0.
template <class T>
__device__ double block_sum(const T* v, index_t n, index_t step, double* red) {
  double acc = 0.0;
  for (index_t e = threadIdx.x; e < n; e += blockDim.x) acc += double(v[e * step]);
  red[threadIdx.x] = acc;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (unsigned k = 0; k < blockDim.x; ++k) total += red[k];
  __syncthreads();
  return total;
}

// Sigma of the input: <x[p], y[q]> / C; Theta starts at 0.
template <class T>
__device__ void input_dev(const T* x, const T* y, index_t P, index_t c, bool diag, bool ntk, T* s, T* t) {
  const T inv_c = T(1) / T(c);
  const int Pi = int(P), n = diag ? Pi : Pi * Pi;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const index_t p = diag ? e : e / Pi, q = diag ? e : e % Pi;
    T acc = T(0);
    for (index_t k = 0; k < c; ++k) acc += x[p * c + k] * y[q * c + k];
    s[e] = acc * inv_c;
    if (ntk) t[e] = T(0);
  }
  __syncthreads();
}

// Conv: out[p, q] = w mean_{a, b} in[p + (a, b), q + (a, b)] + b (taps outside the image skipped), and
// Theta alongside: w mean(Theta) + Sigma_out.
template <class T>
__device__ void conv_dev(const T* sin, const T* tin, const conv_stage& g, bool diag, bool ntk, T* sout, T* tout) {
  const int fh = g.op.fh, fw = g.op.fw, ho = int(g.ho), wo = int(g.wo), h = int(g.h), w = int(g.w);
  const int lh = int(g.lh), lw = int(g.lw), Pi = h * w, Po = ho * wo;
  const conv_padding pad = g.op.padding;
  const T inv_f = T(1) / T(fh * fw), wv = T(g.op.w_var), bv = T(g.op.b_var);
  const int n = diag ? Po : Po * Po;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int po = diag ? e : e / Po, qo = diag ? e : e % Po;
    const int i1 = po / wo, j1 = po % wo, i2 = qo / wo, j2 = qo % wo;
    T as = T(0), at = T(0);
    for (int a = 0; a < fh; ++a) {
      const int si1 = conv_src_index(i1 + a - lh, h, pad), si2 = conv_src_index(i2 + a - lh, h, pad);
      if (si1 < 0 || si2 < 0) continue;
      for (int b = 0; b < fw; ++b) {
        const int sj1 = conv_src_index(j1 + b - lw, w, pad), sj2 = conv_src_index(j2 + b - lw, w, pad);
        if (sj1 < 0 || sj2 < 0) continue;
        const int idx = diag ? si1 * w + sj1 : (si1 * w + sj1) * Pi + si2 * w + sj2;
        as += sin[idx];
        if (ntk) at += tin[idx];
      }
    }
    const T v = wv * (as * inv_f) + bv;
    sout[e] = v;
    if (ntk) tout[e] = wv * (at * inv_f) + v;
  }
  __syncthreads();
}

// AvgPool on both positions of every pair: the CPU engine's four one-axis passes (h1, h2, w1, w2) between the
// array and tmp; returns where the result is.
template <class T>
__device__ T* pool_dev(T* a, T* tmp, const conv_stage& g) {
  const conv_op& op = g.op;
  int d[4] = {int(g.h), int(g.w), int(g.h), int(g.w)};
  const int od[4] = {int(g.ho), int(g.wo), int(g.ho), int(g.wo)};
  const int win[4] = {op.fh, op.fw, op.fh, op.fw}, str[4] = {op.sh, op.sw, op.sh, op.sw};
  const int lo[4] = {int(g.lh), int(g.lw), int(g.lh), int(g.lw)};
  const int order[4] = {0, 2, 1, 3};
  T* src = a;
  T* dst = tmp;
  for (int oi = 0; oi < 4; ++oi) {
    const int ax = order[oi];
    int inner = 1, outer = 1;
    for (int k = 0; k < ax; ++k) outer *= d[k];
    for (int k = ax + 1; k < 4; ++k) inner *= d[k];
    const int len = d[ax], olen = od[ax], n = outer * olen * inner;
    const T inv = T(1) / T(win[ax]);
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      const int kk = e % inner, rest = e / inner, i = rest % olen, o = rest / olen;
      T acc = T(0);
      for (int q = 0; q < win[ax]; ++q) {
        const int si = conv_src_index(i * str[ax] + q - lo[ax], len, op.padding);
        if (si >= 0) acc += src[(o * len + si) * inner + kk];
      }
      dst[e] = acc * inv;
    }
    __syncthreads();
    d[ax] = olen;
    T* sw = src;
    src = dst;
    dst = sw;
  }
  return src;
}

// One activation on the pairs. Table rows hold each position's variance, then r, 1/r, pa, pb (P values each);
// the self pass writes its image's row from the diagonal first.
template <class T, class Act>
__device__ void act_dev(const Act& act, const act_params& p, bool diag, bool self, bool ntk, T* own, const T* other,
                        index_t P, T* s, T* t) {
  if (self) {
    for (index_t q = threadIdx.x; q < P; q += blockDim.x) own[q] = diag ? s[q] : s[q * P + q];
    __syncthreads();
    for (index_t q = threadIdx.x; q < P; q += blockDim.x) {
      const T v = own[q], r = std::sqrt(v);
      T pa, pb;
      Act::row(p, v, r, pa, pb);
      own[P + q] = r;
      own[2 * P + q] = r > T(0) ? T(1) / r : T(0);
      own[3 * P + q] = pa;
      own[4 * P + q] = pb;
    }
    __syncthreads();
  }
  const T* a = own;
  const T* b = self ? own : other;
  const int Pi = int(P), n = diag ? Pi : Pi * Pi;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int i = diag ? e : e / Pi, j = diag ? e : e % Pi;
    const pair_out<T> o = conv_act_pair<T>(act, s[e], a[i], a[P + i], a[2 * P + i], a[3 * P + i], a[4 * P + i], b[j],
                                           b[P + j], b[2 * P + j], b[3 * P + j], b[4 * P + j]);
    s[e] = o.t;
    if (ntk) t[e] = o.tdot * t[e];
  }
  __syncthreads();
}

// The activation's own type, as the CPU engine picks it (act_stage).
template <class T>
__device__ void act_any(const act_params& p, bool diag, bool self, bool ntk, T* own, const T* other, index_t P, T* s,
                        T* t) {
  switch (p.kind) {
    case act_kind::abrelu:
      if (p.a * p.b == 0.0)
        act_dev<T>(abrelu_act<T, true>(p), p, diag, self, ntk, own, other, P, s, t);
      else
        act_dev<T>(abrelu_act<T>(p), p, diag, self, ntk, own, other, P, s, t);
      return;
    case act_kind::monomial:
      switch (p.n) {
        case 0:
          act_dev<T>(monomial_act<T, 0>(p), p, diag, self, ntk, own, other, P, s, t);
          return;
        case 1:
          act_dev<T>(monomial_act<T, 1>(p), p, diag, self, ntk, own, other, P, s, t);
          return;
        case 2:
          act_dev<T>(monomial_act<T, 2>(p), p, diag, self, ntk, own, other, P, s, t);
          return;
        default:
          act_dev<T>(monomial_act<T>(p), p, diag, self, ntk, own, other, P, s, t);
          return;
      }
    case act_kind::sign:
      act_dev<T>(sign_act<T>(p), p, diag, self, ntk, own, other, P, s, t);
      return;
    case act_kind::erf:
      act_dev<T>(erf_act<T>(p), p, diag, self, ntk, own, other, P, s, t);
      return;
  }
}

// One pair's recursion (x with y; for the self pass x == y and tab1 is written), every op in order in the
// block's scratch. Returns (in every thread) k and Theta, and for the self pass the first bad op or -1.
template <class T>
__device__ void conv_pair_dev(const conv_args<T>& g, const T* x, const T* y, T* tab1, const T* tab2, bool self, T* base,
                              double* red, int* flag, T& out_s, T& out_t, int& bad_op) {
  const bool ntk = g.want_ntk != 0;
  T* s = base;
  T* so = base + g.buf_len;
  T* t = ntk ? base + 2 * g.buf_len : nullptr;
  T* to = ntk ? base + 3 * g.buf_len : nullptr;
  const bool dmode = g.diag_mode != 0;
  index_t P = g.h * g.w;
  input_dev(x, y, P, g.c, dmode, ntk, s, t);
  bad_op = -1;
  out_s = out_t = T(0);
  if (self && !block_finite(s, P, dmode, flag)) {
    bad_op = 0;
    return;
  }
  for (int k = 0; k < g.nst; ++k) {
    const conv_stage& st = g.st[k];
    const conv_op& op = st.op;
    const bool diag = dmode || P == 1;
    switch (op.kind) {
      case conv_op_kind::dense:
        if (threadIdx.x == 0) {
          const T v = T(op.w_var) * (s[0] * T(1)) + T(op.b_var);
          s[0] = v;
          if (ntk) t[0] = T(op.w_var) * (t[0] * T(1)) + v;
        }
        __syncthreads();
        break;
      case conv_op_kind::conv: {
        conv_dev(s, t, st, diag, ntk, so, to);
        T* sw = s;
        s = so;
        so = sw;
        sw = t;
        t = to;
        to = sw;
        P = st.ho * st.wo;
        break;
      }
      case conv_op_kind::pool:
        if (pool_dev(s, so, st) != s) {
          T* sw = s;
          s = so;
          so = sw;
        }
        if (ntk && pool_dev(t, to, st) != t) {
          T* sw = t;
          t = to;
          to = sw;
        }
        P = st.ho * st.wo;
        break;
      case conv_op_kind::act:
        act_any<T>(op.act, diag, self, ntk, tab1 + st.tab, self ? nullptr : tab2 + st.tab, P, s, t);
        break;
      case conv_op_kind::flatten:
      case conv_op_kind::gap: {
        const bool all = op.kind == conv_op_kind::gap;
        const index_t cnt_v = all ? P * P : P, step = all || diag ? 1 : P + 1;
        const double a = block_sum(s, cnt_v, step, red);
        const double b = ntk ? block_sum(t, cnt_v, step, red) : 0.0;
        const double cnt = all ? double(P) * double(P) : double(P);
        if (threadIdx.x == 0) {
          s[0] = T(a / cnt);
          if (ntk) t[0] = T(b / cnt);
        }
        __syncthreads();
        P = 1;
        break;
      }
    }
    if (self && !block_finite(s, P, dmode || P == 1, flag)) {
      bad_op = k + 1;
      return;
    }
  }
  out_s = s[0];
  out_t = ntk ? t[0] : T(0);
  __syncthreads();  // every thread has read the result before the scratch is reused
}

template <class T>
__global__ void __launch_bounds__(CONV_THREADS) conv_pair_kernel(const conv_args<T> g) {
  __shared__ double red[CONV_THREADS];
  __shared__ int flag;
  const index_t img = g.h * g.w * g.c;
  const index_t items = g.self ? g.n1 + (g.symmetric ? 0 : g.n2) : g.rows * g.n2;
  T* base = g.scratch + index_t(blockIdx.x) * (g.want_ntk ? 4 : 2) * g.buf_len;
  for (index_t k = blockIdx.x; k < items; k += gridDim.x) {
    const T* x;
    const T* y;
    T* tab1;
    const T* tab2;
    index_t i = 0, j = 0;
    if (g.self) {
      const bool first = k < g.n1;
      x = first ? g.x1 + k * img : g.x2 + (k - g.n1) * img;
      y = x;
      tab1 = first ? g.tab1 + k * g.tab_len : g.tab2 + (k - g.n1) * g.tab_len;
      tab2 = tab1;
    } else {
      i = g.r0 + k / g.n2;
      j = k % g.n2;
      if (g.symmetric && j <= i) continue;
      x = g.x1 + i * img;
      y = g.x2 + j * img;
      tab1 = g.tab1 + i * g.tab_len;
      tab2 = g.tab2 + j * g.tab_len;
    }
    T vs, vt;
    int bad;
    conv_pair_dev<T>(g, x, y, tab1, tab2, g.self != 0, base, red, &flag, vs, vt, bad);
    if (threadIdx.x == 0) {
      if (g.self) {
        g.self_nngp[k] = vs;
        if (g.want_ntk) g.self_ntk[k] = vt;
        g.bad[k] = bad;
      } else {
        if (g.out_nngp) g.out_nngp[(i - g.r0) * g.n2 + j] = vs;
        if (g.out_ntk) g.out_ntk[(i - g.r0) * g.n2 + j] = vt;
      }
    }
    __syncthreads();
  }
}

// Host: rows [r0, r0 + rows) of the pair pass (tmp, rows x n2) into the n1 x n2 output: as they are, or
// (symmetric) the pairs j > i with their mirrors and the diagonal from the self pass, so that the result is
// exactly symmetric whatever the order of the row blocks.
template <class T>
void conv_scatter_rows(const T* tmp, index_t r0, index_t rows, index_t n2, bool symmetric, const T* self, T* out) {
  for (index_t i = r0; i < r0 + rows; ++i) {
    const T* src = tmp + (i - r0) * n2;
    if (!symmetric) {
      std::copy(src, src + n2, out + i * n2);
      continue;
    }
    out[i * n2 + i] = self[i];
    for (index_t j = i + 1; j < n2; ++j) {
      out[i * n2 + j] = src[j];
      out[j * n2 + i] = src[j];
    }
  }
}

}  // namespace arcflow::cuda_detail
