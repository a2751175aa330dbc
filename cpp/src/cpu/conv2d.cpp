// conv2d_cpu: implicit-GEMM 2-D convolution over stride phases, with a run-time chosen micro-kernel.
#include "arcflow/conv2d.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif

namespace arcflow {
namespace {

// What the tile loop needs; the phase buffer and the output image pointer are passed separately.
template <typename T>
struct TileArgs {
  index_t K;            // taps = c * kh * kw
  index_t m;            // output channels
  index_t ho, wo;       // output size
  index_t wph;          // grid row width (phase-buffer row width)
  index_t qtot;         // ho * wph grid pixels
  const T* ap;          // packed weights, panels of MR channels: ap[panel][k][MR]
  const index_t* off;   // tap k -> offset in the phase buffer
  const T* bias;        // (m) or nullptr
  T alpha;
  const T* addend;      // image-relative (n, m, ho, wo) values added to the result, or nullptr; may be out
  index_t addend_img;   // stride between images of addend
};

namespace isa_generic {
#define ARCFLOW_CONV_VB 16
#include "conv2d_kernel.inc"
#undef ARCFLOW_CONV_VB
}  // namespace isa_generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ARCFLOW_CONV_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define ARCFLOW_CONV_VB 32
#include "conv2d_kernel.inc"
#undef ARCFLOW_CONV_VB
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// Register blocking: MR output channels x NV vectors of pixels. Both shapes fit the 16 vector
// registers of x86-64 without AVX-512: 4 x 3 (12 accumulators, 3 B vectors, a broadcast) and 6 x 2
// (12 accumulators, 2 B vectors, a broadcast). The driver picks the one that wastes less work on
// padding (channels rounded up to MR, grid pixels rounded up to the tile width).
template <typename T>
struct Kernel {
  void (*tiles)(const TileArgs<T>&, const T*, T*, index_t, index_t);
  index_t mr;  // output channels per panel
  index_t nr;  // pixels per tile
  const char* name;
};

bool cpu_has_avx2() {
#ifdef ARCFLOW_CONV_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename T>
Kernel<T> pick_kernel(index_t m, index_t qtot) {
  Kernel<T> a, b;
#ifdef ARCFLOW_CONV_HAVE_AVX2
  if (cpu_has_avx2()) {
    a = {&isa_avx2::compute_tiles<T, 4, 3>, 4, index_t(3 * 32 / sizeof(T)), "avx2"};
    b = {&isa_avx2::compute_tiles<T, 6, 2>, 6, index_t(2 * 32 / sizeof(T)), "avx2"};
  } else
#endif
  {
    a = {&isa_generic::compute_tiles<T, 4, 3>, 4, index_t(3 * 16 / sizeof(T)), "generic"};
    b = {&isa_generic::compute_tiles<T, 6, 2>, 6, index_t(2 * 16 / sizeof(T)), "generic"};
  }
  auto work = [&](const Kernel<T>& k) {
    // padded multiply-adds, plus a small penalty for b's extra broadcast per FMA pair
    return static_cast<double>((m + k.mr - 1) / k.mr * k.mr) * ((qtot + k.nr - 1) / k.nr * k.nr);
  };
  return work(b) * 1.05 < work(a) ? b : a;
}

// A buffer aligned to 64 bytes, zero-initialised.
template <typename T>
struct AlignedBuf {
  std::vector<T> store;
  T* ptr = nullptr;
  explicit AlignedBuf(index_t count) : store(static_cast<std::size_t>(count) + 64 / sizeof(T), T(0)) {
    auto addr = reinterpret_cast<std::uintptr_t>(store.data());
    ptr = store.data() + ((64 - addr % 64) % 64) / sizeof(T);
  }
};

// Geometry of the phase buffer: for stride s the zero-padded input (hp x wp) is split into s*s phases
// (py, px) of hph x wph values, phase[r][col] = padded[r*s + py][col*s + px]. Tap (ky, kx) of output
// pixel (oy, ox) then reads phase (ky%s, kx%s) at (oy + ky/s, ox + kx/s): with the output laid on a
// grid of row width wph, every tap is one constant offset.
struct Geometry {
  index_t s, pad, hp, wp, hph, wph, phase_size, chan_size, ho, wo, qtot, K, buf_size;
  std::vector<index_t> off;
  Geometry(const Conv2dShape& sh, index_t nr) {
    s = sh.stride;
    pad = sh.pad;
    hp = sh.h + 2 * pad;
    wp = sh.w + 2 * pad;
    hph = (hp + s - 1) / s;
    wph = (wp + s - 1) / s;
    phase_size = hph * wph;
    chan_size = s * s * phase_size;
    ho = sh.ho();
    wo = sh.wo();
    qtot = ho * wph;
    K = sh.c * sh.kh * sh.kw;
    buf_size = sh.c * chan_size + nr + sh.kw + 64;
    off.resize(static_cast<std::size_t>(K));
    index_t k = 0;
    for (index_t ci = 0; ci < sh.c; ++ci)
      for (index_t ky = 0; ky < sh.kh; ++ky)
        for (index_t kx = 0; kx < sh.kw; ++kx)
          off[static_cast<std::size_t>(k++)] =
              ci * chan_size + ((ky % s) * s + (kx % s)) * phase_size + (ky / s) * wph + kx / s;
  }
};

// Fill the phase buffer of channels [c0, c1) of one image with act(x), zeros outside the image.
template <typename T>
void build_phases(const Conv2dShape& sh, const Geometry& g, const T* x_img, const T* in_scale,
                  const T* in_shift, bool in_relu, index_t c0, index_t c1, T* buf) {
  const bool affine = in_scale != nullptr;
  for (index_t ci = c0; ci < c1; ++ci) {
    const T sc = affine ? in_scale[ci] : T(1);
    const T sf = affine ? in_shift[ci] : T(0);
    const T* xc = x_img + ci * sh.h * sh.w;
    for (index_t py = 0; py < g.s; ++py)
      for (index_t px = 0; px < g.s; ++px) {
        T* ph = buf + ci * g.chan_size + (py * g.s + px) * g.phase_size;
        // columns col with 0 <= col*s + px - pad < w
        const index_t col_lo = std::min(g.wph, std::max<index_t>(0, (g.pad - px + g.s - 1) / g.s));
        const index_t col_hi =
            std::max(col_lo, std::min(g.wph, (sh.w + g.pad - px + g.s - 1) / g.s));
        for (index_t r = 0; r < g.hph; ++r) {
          T* dst = ph + r * g.wph;
          const index_t yy = r * g.s + py - g.pad;
          if (yy < 0 || yy >= sh.h) {
            std::fill(dst, dst + g.wph, T(0));
            continue;
          }
          std::fill(dst, dst + col_lo, T(0));
          const T* src = xc + yy * sh.w + (col_lo * g.s + px - g.pad);
          const index_t len = col_hi - col_lo;
          T* d = dst + col_lo;
          if (g.s == 1) {
            if (in_relu)
              for (index_t u = 0; u < len; ++u) {
                const T v = src[u] * sc + sf;
                d[u] = v > T(0) ? v : T(0);
              }
            else
              for (index_t u = 0; u < len; ++u) d[u] = src[u] * sc + sf;
          } else {
            const index_t st = g.s;
            if (in_relu)
              for (index_t u = 0; u < len; ++u) {
                const T v = src[u * st] * sc + sf;
                d[u] = v > T(0) ? v : T(0);
              }
            else
              for (index_t u = 0; u < len; ++u) d[u] = src[u * st] * sc + sf;
          }
          std::fill(dst + col_hi, dst + g.wph, T(0));
        }
      }
  }
}

int max_threads() {
#ifdef ARCFLOW_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

const char* conv2d_cpu_isa() { return cpu_has_avx2() ? "avx2" : "generic"; }

template <typename T>
void conv2d_cpu(const Conv2dShape& sh, const T* x, const T* weight, const T* bias, const T* in_scale,
                const T* in_shift, bool in_relu, T alpha, const T* addend, T* out, int threads) {
  ARCFLOW_CHECK(sh.n >= 0 && sh.c > 0 && sh.h > 0 && sh.w > 0, "conv2d: bad input shape");
  ARCFLOW_CHECK(sh.m > 0 && sh.kh > 0 && sh.kw > 0, "conv2d: bad weight shape");
  ARCFLOW_CHECK(sh.stride >= 1 && sh.pad >= 0, "conv2d: stride must be >= 1 and padding >= 0");
  ARCFLOW_CHECK(sh.h + 2 * sh.pad >= sh.kh && sh.w + 2 * sh.pad >= sh.kw,
                "conv2d: kernel larger than the padded input");
  ARCFLOW_CHECK((in_scale == nullptr) == (in_shift == nullptr),
                "conv2d: in_scale and in_shift go together");
  if (sh.n == 0) return;

  const index_t qtot_est = sh.ho() * ((sh.w + 2 * sh.pad + sh.stride - 1) / sh.stride);
  const Kernel<T> kern = pick_kernel<T>(sh.m, qtot_est);
  const Geometry g(sh, kern.nr);
  const index_t mr = kern.mr;
  const index_t n_panels = (sh.m + mr - 1) / mr;

  // Pack the weights: panel p holds channels [p*MR, p*MR + MR) tap by tap (zeros past m).
  AlignedBuf<T> ap(n_panels * mr * g.K);
  for (index_t co = 0; co < sh.m; ++co) {
    const index_t p = co / mr, i = co % mr;
    for (index_t k = 0; k < g.K; ++k) ap.ptr[(p * g.K + k) * mr + i] = weight[co * g.K + k];
  }

  TileArgs<T> args{g.K, sh.m, g.ho, g.wo, g.wph, g.qtot, ap.ptr, g.off.data(), bias, alpha,
                   addend, sh.m * g.ho * g.wo};
  const index_t ntiles = (g.qtot + kern.nr - 1) / kern.nr;
  const index_t in_img = sh.c * sh.h * sh.w;
  const index_t out_img = sh.m * g.ho * g.wo;
  // Below a few million multiply-adds a parallel region costs more than it saves (and much more
  // on an oversubscribed machine, where the team's threads wait for a core).
  const bool par = static_cast<double>(sh.n) * sh.m * g.K * g.ho * g.wo > 4e6;
  const int nthreads = par ? (threads > 0 ? threads : max_threads()) : 1;

  if (nthreads == 1 || sh.n % nthreads == 0 || sh.n >= 4 * nthreads) {
    // Enough images: one image per task, each thread with its own phase buffer (stays in L2).
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
      AlignedBuf<T> buf(g.buf_size);
#pragma omp for schedule(dynamic, 1)
      for (index_t img = 0; img < sh.n; ++img) {
        build_phases(sh, g, x + img * in_img, in_scale, in_shift, in_relu, 0, sh.c, buf.ptr);
        TileArgs<T> a = args;
        if (addend) a.addend = addend + img * out_img;
        kern.tiles(a, buf.ptr, out + img * out_img, 0, ntiles);
      }
    }
  } else {
    // Few images: share one phase buffer, split channels and then pixel tiles over the threads.
    AlignedBuf<T> buf(g.buf_size);
    for (index_t img = 0; img < sh.n; ++img) {
#pragma omp parallel num_threads(nthreads)
      {
#pragma omp for schedule(static)
        for (index_t ci = 0; ci < sh.c; ++ci)
          build_phases(sh, g, x + img * in_img, in_scale, in_shift, in_relu, ci, ci + 1, buf.ptr);
        // implicit barrier
        const index_t chunk = 4;
        const index_t nchunks = (ntiles + chunk - 1) / chunk;
        TileArgs<T> a = args;
        if (addend) a.addend = addend + img * out_img;
#pragma omp for schedule(dynamic, 1)
        for (index_t ch = 0; ch < nchunks; ++ch)
          kern.tiles(a, buf.ptr, out + img * out_img, ch * chunk, std::min(ntiles, ch * chunk + chunk));
      }
    }
  }
}

template void conv2d_cpu<float>(const Conv2dShape&, const float*, const float*, const float*, const float*,
                                const float*, bool, float, const float*, float*, int);
template void conv2d_cpu<double>(const Conv2dShape&, const double*, const double*, const double*,
                                 const double*, const double*, bool, double, const double*, double*, int);

}  // namespace arcflow
