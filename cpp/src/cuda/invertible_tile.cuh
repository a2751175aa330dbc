// Per-element and per-tile logic of the invertible-block CUDA kernels (cpp/src/cuda/invertible.cu), as
// host-device functions, so that tests/invertible/invertible_cuda_emulation.cpp runs the very same code on the CPU.
#pragma once
// Contract: header-only, no CUDA headers (ARCFLOW_HD is __host__ __device__ under nvcc, inline otherwise).
// Every function is pure apart from the pointers it is given; "tid" is threadIdx.x of a block of
// conv_cfg::NTHREADS threads. The convolution kernel is three phases separated by __syncthreads:
//   for each K slice: conv_load_tile (all threads) | sync | conv_mma (all threads) | sync
//   then conv_store (all threads)
// so running each phase for every tid in turn is an exact emulation of one block.
// Semantics are those of the CPU ops: conv2d.hpp (act before the zero padding, out = addend + (alpha *
// conv + bias)), batchnorm.hpp (channel affine, NaN-propagating ReLU), psi.hpp (reference channel order),
// flows.py (ActNorm, the soft-clamped affine coupling).
#include <cmath>

#include "arcflow/common.hpp"
#include "arcflow/conv2d.hpp"

namespace arcflow {
namespace cuda_detail {

template <class T>
ARCFLOW_HD T inv_exp(T v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

template <class T>
ARCFLOW_HD T inv_atan(T v) {
#if defined(__CUDA_ARCH__)
  return atan(v);
#else
  return std::atan(v);
#endif
}

// ReLU that keeps NaN, as relu_cpu / channel_affine_cpu.
template <class T>
ARCFLOW_HD T relu_nan(T v) {
  return v > T(0) ? v : (v != v ? v : T(0));
}

// ---- convolution: implicit GEMM, M = output channels, N = output pixels of all images, K = c*kh*kw ------

struct conv_cfg {
  static constexpr int NTHREADS = 256;
  static constexpr int BK = 16;  // K slice per shared-memory stage
  static constexpr int TM = 4;   // output channels per thread
  static constexpr int TN = 4;   // pixels per thread
};

template <class T>
struct conv_args {
  const T* x;         // (n, c, h, w)
  const T* wt;        // weights (m, c, kh, kw) = (m, K) row-major
  const T* bias;      // (m) or nullptr
  const T* in_scale;  // (c) or nullptr (then in_shift is nullptr too)
  const T* in_shift;
  const T* addend;  // (n, m, ho, wo) or nullptr; may equal out
  T* out;           // (n, m, ho, wo)
  T alpha;
  bool in_relu;
  index_t n, c, h, w, m, ho, wo;
  int kh, kw, stride, pad;
  int K;         // c * kh * kw (< 2^31, checked by the launcher)
  index_t npix;  // n * ho * wo
};

// The kernel arguments of conv2d_cuda (Conv2dShape and the pointers of conv2d.hpp's contract).
template <class T>
conv_args<T> make_conv_args(const Conv2dShape& s, const T* x, const T* weight, const T* bias, const T* in_scale,
                            const T* in_shift, bool in_relu, T alpha, const T* addend, T* out) {
  conv_args<T> g;
  g.x = x;
  g.wt = weight;
  g.bias = bias;
  g.in_scale = in_scale;
  g.in_shift = in_shift;
  g.addend = addend;
  g.out = out;
  g.alpha = alpha;
  g.in_relu = in_relu;
  g.n = s.n;
  g.c = s.c;
  g.h = s.h;
  g.w = s.w;
  g.m = s.m;
  g.ho = s.ho();
  g.wo = s.wo();
  g.kh = int(s.kh);
  g.kw = int(s.kw);
  g.stride = int(s.stride);
  g.pad = int(s.pad);
  g.K = int(s.c * s.kh * s.kw);
  g.npix = s.n * g.ho * g.wo;
  return g;
}

// Tile shape: few output channels (the i-RevNet bottlenecks at CIFAR width have 4 to 64) take the wide pixel
// tile (16 x 256), which wastes less; otherwise 64 x 64. The grid is (pixel tiles, channel tiles).
inline bool conv_use_wide_tile(index_t m) { return m <= 16; }

// The output pixel whose im2col column a thread stages (fixed for the whole K loop, decoded once):
// its image's offset in x and the top-left input row and column of its receptive field.
struct conv_pixel {
  bool valid;     // pixel < npix
  index_t x_img;  // img * c * h * w
  index_t iy0, ix0;
};

template <class T, int BN>
ARCFLOW_HD conv_pixel conv_thread_pixel(const conv_args<T>& g, int tid, index_t p0) {
  static_assert(conv_cfg::NTHREADS % BN == 0, "a thread must stage the same pixel in every K slice");
  conv_pixel q{false, 0, 0, 0};
  const index_t pix = p0 + tid % BN;
  if (pix >= g.npix) return q;
  const index_t howo = g.ho * g.wo;
  const index_t img = pix / howo;
  const index_t r = pix - img * howo;
  const index_t oy = r / g.wo;
  const index_t ox = r - oy * g.wo;
  q.valid = true;
  q.x_img = img * g.c * g.h * g.w;
  q.iy0 = oy * g.stride - g.pad;
  q.ix0 = ox * g.stride - g.pad;
  return q;
}

// The input value that tap k (< K) of the thread's pixel reads: act(x) inside the image, 0 in the padding
// (the padding is applied after act, as conv2d_cpu does).
template <class T>
ARCFLOW_HD T conv_input_value(const conv_args<T>& g, const conv_pixel& q, int k) {
  const int taps = g.kh * g.kw;
  const int ci = k / taps;
  const int r = k - ci * taps;
  const int ky = r / g.kw;
  const int kx = r - ky * g.kw;
  const index_t iy = q.iy0 + ky, ix = q.ix0 + kx;
  if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return T(0);
  T v = g.x[q.x_img + (index_t(ci) * g.h + iy) * g.w + ix];
  if (g.in_scale) v = v * g.in_scale[ci] + g.in_shift[ci];
  if (g.in_relu) v = v > T(0) ? v : T(0);  // conv2d_cpu's fused ReLU (no NaN case: input is finite)
  return v;
}

// Stage the K slice [k0, k0 + BK) of the weight tile (BM channels from m0) into As[BK][BM] and of the
// implicit im2col tile (BN pixels from p0) into Bs[BK][BN]; zeros past m, npix or K. q is
// conv_thread_pixel(g, tid, p0): consecutive threads read consecutive pixels.
template <class T, int BM, int BN>
ARCFLOW_HD void conv_load_tile(const conv_args<T>& g, int tid, index_t m0, const conv_pixel& q, int k0, T* As, T* Bs) {
  constexpr int BK = conv_cfg::BK, NT = conv_cfg::NTHREADS;
  // weights: consecutive threads read consecutive k of one channel row
  for (int e = tid; e < BM * BK; e += NT) {
    const int mi = e / BK, ki = e - mi * BK;
    const index_t co = m0 + mi;
    const int k = k0 + ki;
    As[ki * BM + mi] = (co < g.m && k < g.K) ? g.wt[co * g.K + k] : T(0);
  }
  for (int e = tid; e < BN * BK; e += NT) {
    const int ki = e / BN, pi = e - ki * BN;  // pi == tid % BN for every e
    const int k = k0 + ki;
    Bs[ki * BN + pi] = (q.valid && k < g.K) ? conv_input_value(g, q, k) : T(0);
  }
}

// Thread tid owns channels m0 + ty + i*(BM/TM) and pixels p0 + tx + j*(BN/TN) (strided: conflict-free
// shared reads, coalesced stores).
template <int BN>
ARCFLOW_HD void conv_thread_pos(int tid, int& ty, int& tx) {
  constexpr int NX = BN / conv_cfg::TN;
  ty = tid / NX;
  tx = tid - ty * NX;
}

template <class T, int BM, int BN>
ARCFLOW_HD void conv_mma(int tid, const T* As, const T* Bs, T (&acc)[conv_cfg::TM][conv_cfg::TN]) {
  constexpr int TM = conv_cfg::TM, TN = conv_cfg::TN, SM = BM / TM, SN = BN / TN;
  int ty, tx;
  conv_thread_pos<BN>(tid, ty, tx);
#pragma unroll
  for (int kk = 0; kk < conv_cfg::BK; ++kk) {
    T a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = As[kk * BM + ty + i * SM];
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = Bs[kk * BN + tx + j * SN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
  }
}

// Epilogue: out = addend + (alpha * acc + bias), or alpha * acc + bias (conv2d_cpu's order).
template <class T, int BM, int BN>
ARCFLOW_HD void conv_store(const conv_args<T>& g, int tid, index_t m0, index_t p0,
                           const T (&acc)[conv_cfg::TM][conv_cfg::TN]) {
  constexpr int TM = conv_cfg::TM, TN = conv_cfg::TN, SM = BM / TM, SN = BN / TN;
  int ty, tx;
  conv_thread_pos<BN>(tid, ty, tx);
  const index_t howo = g.ho * g.wo;
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const index_t pix = p0 + tx + j * SN;
    if (pix >= g.npix) continue;
    const index_t img = pix / howo;
    const index_t r = pix - img * howo;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const index_t co = m0 + ty + i * SM;
      if (co >= g.m) continue;
      const index_t o = (img * g.m + co) * howo + r;
      const T v = g.alpha * acc[i][j] + (g.bias ? g.bias[co] : T(0));
      g.out[o] = g.addend ? g.addend[o] + v : v;
    }
  }
}

// ---- elementwise ops, one output element per thread ------------------------------------------------

// psi (docs/mathematics.md §2): offset in x (n, c, h, w) of element `idx` of y = psi(x) (n, b*b*c, h/b, w/b).
// psi reads y[idx] = x[src]; psi_inverse writes x[src] = y[idx] (a permutation: every x written once).
ARCFLOW_HD index_t psi_source(index_t idx, index_t c, index_t h, index_t w, index_t b) {
  const index_t ho = h / b, wo = w / b;
  const index_t j = idx % wo;
  index_t t = idx / wo;
  const index_t i = t % ho;
  t /= ho;
  const index_t oc = t % (b * b * c);
  const index_t img = t / (b * b * c);
  const index_t blk = oc / c, ci = oc - blk * c;
  const index_t dy = blk / b, dx = blk - dy * b;
  return ((img * c + ci) * h + (i * b + dy)) * w + (j * b + dx);
}

// channel_affine_cpu for element idx of (n, c, hw).
template <class T>
ARCFLOW_HD T channel_affine_value(const T* x, const T* scale, const T* shift, bool relu, index_t idx, index_t c,
                                  index_t hw) {
  const index_t ci = (idx / hw) % c;
  const T v = x[idx] * scale[ci] + shift[ci];
  return relu ? relu_nan(v) : v;
}

// ActNorm (flows.py): forward y = (x - loc) / scale, inverse x = y * scale + loc, per channel.
template <class T>
ARCFLOW_HD T actnorm_value(const T* x, const T* loc, const T* scale, bool inverse, index_t idx, index_t c, index_t hw) {
  const index_t ci = (idx / hw) % c;
  return inverse ? x[idx] * scale[ci] + loc[ci] : (x[idx] - loc[ci]) / scale[ci];
}

// Channel block copy: dst (n, cd, hw) channels [d0, d0 + cnt) = src (n, cs, hw) channels [s0, s0 + cnt).
// idx runs over n * cnt * hw; returns the (src, dst) offsets. Split, merge and injective padding.
ARCFLOW_HD void channel_copy_offsets(index_t idx, index_t cnt, index_t hw, index_t cs, index_t s0, index_t cd,
                                     index_t d0, index_t& src, index_t& dst) {
  const index_t p = idx % hw;
  const index_t t = idx / hw;
  const index_t ch = t % cnt, img = t / cnt;
  src = (img * cs + s0 + ch) * hw + p;
  dst = (img * cd + d0 + ch) * hw + p;
}

// Soft clamp of flows.soft_clamp: s = T(clamp * 0.636) * atan(s_raw / T(clamp)); clamp <= 0: s = s_raw.
template <class T>
ARCFLOW_HD T soft_clamp_value(T s_raw, double clamp) {
  if (clamp <= 0) return s_raw;
  return T(clamp * 0.636) * inv_atan(s_raw / T(clamp));
}

// Affine coupling (flows.AffineCoupling) for element idx of x (n, c1 + c2, hw); net is NN(x1) (n, 2*c2, hw):
// s_raw = net[:, :c2], t = net[:, c2:]. Channels < c1 are copied; the others are
//   forward: y2 = x2 * exp(s) + t        inverse: x2 = (y2 - t) * exp(-s)
// When s_out is given, the clamped s of that element is stored there (n, c2, hw), for the log-determinant.
template <class T>
ARCFLOW_HD T affine_coupling_value(const T* x, const T* net, index_t idx, index_t c1, index_t c2, index_t hw,
                                   double clamp, bool inverse, T* s_out) {
  const index_t c = c1 + c2;
  const index_t p = idx % hw;
  const index_t t = idx / hw;
  const index_t ch = t % c, img = t / c;
  if (ch < c1) return x[idx];
  const index_t j = ch - c1;
  const T s = soft_clamp_value(net[(img * 2 * c2 + j) * hw + p], clamp);
  const T sh = net[(img * 2 * c2 + c2 + j) * hw + p];
  if (s_out) s_out[(img * c2 + j) * hw + p] = s;
  return inverse ? (x[idx] - sh) * inv_exp(-s) : x[idx] * inv_exp(s) + sh;
}

}  // namespace cuda_detail
}  // namespace arcflow
