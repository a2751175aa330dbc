// Host emulation of the invertible-block CUDA kernels (cpp/src/cuda/invertible_tile.cuh) against the CPU ops.
//
// The kernels' per-tile and per-element logic is host-device code; here it runs on the CPU exactly as the
// kernels in cpp/src/cuda/invertible.cu sequence it: the convolution block's phases (load tile, __syncthreads,
// multiply-accumulate, __syncthreads, ..., store) run for every thread of a block in turn, which is what the
// barriers guarantee on the device; elementwise kernels run once per output index. Compared with:
//   conv2d_cpu (every fused option: BN+ReLU or ReLU on the input, bias, alpha, addend, in-place accumulate),
//   channel_affine_cpu, psi_forward_cpu / psi_inverse_cpu (bit for bit), and plain 4-D loops for ActNorm, the
//   soft-clamped affine coupling and the channel copy (the formulas of python/arcflow/invertible/flows.py).
// Built and run by tests/invertible/test_invertible_cuda.py::test_invertible_kernels_in_host_emulation (g++
// -std=c++17); prints one line "worst conv f64 <err> f32 <err>" and exits 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../../cpp/src/cuda/invertible_tile.cuh"
#include "arcflow/batchnorm.hpp"
#include "arcflow/conv2d.hpp"
#include "arcflow/psi.hpp"

using namespace arcflow;
using namespace arcflow::cuda_detail;

[[maybe_unused]] static int failures = 0;

#define EXPECT(cond, ...)                \
  do {                                   \
    if (!(cond)) {                       \
      ++failures;                        \
      std::printf("FAIL: " __VA_ARGS__); \
      std::printf("\n");                 \
    }                                    \
  } while (0)

template <class T>
std::vector<T> randn(std::size_t n, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> nd;
  std::vector<T> v(n);
  for (auto& e : v) e = T(scale * nd(rng));
  return v;
}

// One launch of conv2d_kernel<T, BM, BN> over the grid, block by block, thread by thread within each phase.
template <class T, int BM, int BN>
void emulate_conv(const conv_args<T>& g) {
  constexpr int NT = conv_cfg::NTHREADS, TM = conv_cfg::TM, TN = conv_cfg::TN;
  const index_t gx = (g.npix + BN - 1) / BN, gy = (g.m + BM - 1) / BM;
  std::vector<T> As(conv_cfg::BK * BM), Bs(conv_cfg::BK * BN);
  for (index_t by = 0; by < gy; ++by)
    for (index_t bx = 0; bx < gx; ++bx) {
      const index_t p0 = bx * BN, m0 = by * BM;
      T acc[NT][TM][TN];
      for (int t = 0; t < NT; ++t)
        for (int i = 0; i < TM; ++i)
          for (int j = 0; j < TN; ++j) acc[t][i][j] = T(0);
      std::vector<conv_pixel> q(NT);
      for (int t = 0; t < NT; ++t) q[std::size_t(t)] = conv_thread_pixel<T, BN>(g, t, p0);
      for (int k0 = 0; k0 < g.K; k0 += conv_cfg::BK) {
        // poison the shared tiles: a thread that fails to write its part shows up as NaN
        std::fill(As.begin(), As.end(), T(NAN));
        std::fill(Bs.begin(), Bs.end(), T(NAN));
        for (int t = 0; t < NT; ++t) conv_load_tile<T, BM, BN>(g, t, m0, q[std::size_t(t)], k0, As.data(), Bs.data());
        for (int t = 0; t < NT; ++t) conv_mma<T, BM, BN>(t, As.data(), Bs.data(), acc[t]);
      }
      for (int t = 0; t < NT; ++t) conv_store<T, BM, BN>(g, t, m0, p0, acc[t]);
    }
}

#ifdef ARCFLOW_EMU_SHARED
// The launchers of invertible_cuda.hpp on HOST pointers, each kernel emulated as above: built as a shared
// library by tests/invertible/test_invertible_cuda.py and called through ctypes in place of the _core CUDA bindings, so
// that the Python device path (_cuda_ops and the tests' host-copy twin) runs end to end on the kernels' logic.
namespace {
template <class T>
void emu_conv(const conv_args<T>& g) {
  if (conv_use_wide_tile(g.m))
    emulate_conv<T, 16, 256>(g);
  else
    emulate_conv<T, 64, 64>(g);
}
}  // namespace

extern "C" {
int emu_conv2d(int dbl, const void* x, const void* w, const void* bias, long long n, long long c, long long h,
               long long wd, long long m, long long kh, long long kw, long long stride, long long pad,
               const void* in_scale, const void* in_shift, int in_relu, double alpha, const void* addend, void* out) {
  const Conv2dShape s{n, c, h, wd, m, kh, kw, stride, pad};
  if (n == 0) return 0;
  if (dbl)
    emu_conv(make_conv_args<double>(s, (const double*)x, (const double*)w, (const double*)bias, (const double*)in_scale,
                                    (const double*)in_shift, in_relu != 0, alpha, (const double*)addend, (double*)out));
  else
    emu_conv(make_conv_args<float>(s, (const float*)x, (const float*)w, (const float*)bias, (const float*)in_scale,
                                   (const float*)in_shift, in_relu != 0, float(alpha), (const float*)addend,
                                   (float*)out));
  return 0;
}

#define EMU_EACH(total, ...)                                    \
  do {                                                          \
    if (dbl) {                                                  \
      using T = double;                                         \
      for (index_t i = 0; i < index_t(total); ++i) __VA_ARGS__; \
    } else {                                                    \
      using T = float;                                          \
      for (index_t i = 0; i < index_t(total); ++i) __VA_ARGS__; \
    }                                                           \
  } while (0)

int emu_channel_affine(int dbl, const void* x, long long n, long long c, long long hw, const void* scale,
                       const void* shift, int relu, void* y) {
  EMU_EACH(n * c * hw,
           ((T*)y)[i] = channel_affine_value((const T*)x, (const T*)scale, (const T*)shift, relu != 0, i, c, hw));
  return 0;
}

int emu_psi(int dbl, int inverse, const void* in, long long n, long long c, long long h, long long w, long long b,
            void* out) {
  EMU_EACH(n * c * h * w, {
    const index_t src = psi_source(i, c, h, w, b);
    if (inverse)
      ((T*)out)[src] = ((const T*)in)[i];
    else
      ((T*)out)[i] = ((const T*)in)[src];
  });
  return 0;
}

int emu_actnorm(int dbl, const void* x, long long n, long long c, long long hw, const void* loc, const void* scale,
                int inverse, void* y) {
  EMU_EACH(n * c * hw, ((T*)y)[i] = actnorm_value((const T*)x, (const T*)loc, (const T*)scale, inverse != 0, i, c, hw));
  return 0;
}

int emu_affine_coupling(int dbl, const void* x, const void* net, long long n, long long c1, long long c2, long long hw,
                        double clamp, int inverse, void* y, void* s_out) {
  EMU_EACH(n * (c1 + c2) * hw, ((T*)y)[i] = affine_coupling_value((const T*)x, (const T*)net, i, c1, c2, hw, clamp,
                                                                  inverse != 0, (T*)s_out));
  return 0;
}

int emu_channel_copy(int dbl, const void* src, long long n, long long cs, long long s0, void* dst, long long cd,
                     long long d0, long long count, long long hw) {
  EMU_EACH(n * count * hw, {
    index_t a, b;
    channel_copy_offsets(i, count, hw, cs, s0, cd, d0, a, b);
    ((T*)dst)[b] = ((const T*)src)[a];
  });
  return 0;
}
}  // extern "C"

#else  // the stand-alone test program

template <class T>
double conv_case(index_t n, index_t c, index_t h, index_t w, index_t m, index_t k, index_t stride, index_t pad,
                 int fuse, bool bias, bool addend_mode, bool in_place, double alpha, unsigned seed, bool wide) {
  std::mt19937 rng(seed);
  Conv2dShape s{n, c, h, w, m, k, k, stride, pad};
  const index_t ho = s.ho(), wo = s.wo();
  auto x = randn<T>(std::size_t(n * c * h * w), rng);
  auto wt = randn<T>(std::size_t(m * c * k * k), rng, 1.0 / std::sqrt(double(c * k * k)));
  auto b = randn<T>(std::size_t(m), rng);
  auto sc = randn<T>(std::size_t(c), rng);
  auto sf = randn<T>(std::size_t(c), rng);
  auto add = randn<T>(std::size_t(n * m * ho * wo), rng);
  const T* scp = fuse == 2 ? sc.data() : nullptr;
  const T* sfp = fuse == 2 ? sf.data() : nullptr;
  const bool relu = fuse >= 1;
  std::vector<T> ref = in_place ? add : std::vector<T>(add.size(), T(-7));
  std::vector<T> got = ref;
  const T* addp_ref = addend_mode ? (in_place ? ref.data() : add.data()) : nullptr;
  conv2d_cpu<T>(s, x.data(), wt.data(), bias ? b.data() : nullptr, scp, sfp, relu, T(alpha), addp_ref, ref.data(), 1);
  const conv_args<T> g0 = make_conv_args<T>(s, x.data(), wt.data(), bias ? b.data() : nullptr, scp, sfp, relu, T(alpha),
                                            addend_mode ? (in_place ? got.data() : add.data()) : nullptr, got.data());
  conv_args<T> g = g0;
  if (wide)
    emulate_conv<T, 16, 256>(g);
  else
    emulate_conv<T, 64, 64>(g);
  double mx = 0, err = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) mx = std::max(mx, std::fabs(double(ref[i])));
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(double(ref[i]) - double(got[i]));
    err = e <= 1e300 ? std::max(err, e) : 1e300;  // NaN: a tile element never written
  }
  return err / std::max(mx, 1e-300);
}

template <class T>
void elementwise_cases(unsigned seed) {
  std::mt19937 rng(seed);
  const index_t shapes[][4] = {{1, 1, 2, 2}, {2, 3, 4, 6}, {3, 5, 8, 4}, {2, 4, 6, 6}};
  for (const auto& sh : shapes) {
    const index_t n = sh[0], c = sh[1], h = sh[2], w = sh[3], hw = h * w;
    const std::size_t total = std::size_t(n * c * hw);
    auto x = randn<T>(total, rng);
    // psi, b = 1, 2 and 4 where the sizes allow: bit for bit, both directions
    for (index_t b : {index_t(1), index_t(2), index_t(4)}) {
      if (h % b || w % b) continue;
      std::vector<T> ref(total), got(total, T(NAN)), back_ref(total), back(total, T(NAN));
      psi_forward_cpu<T>(x.data(), n, c, h, w, b, ref.data(), 1);
      for (std::size_t i = 0; i < total; ++i) got[i] = x[std::size_t(psi_source(index_t(i), c, h, w, b))];
      EXPECT(std::memcmp(ref.data(), got.data(), total * sizeof(T)) == 0, "psi b=%ld shape %ld %ld %ld %ld", long(b),
             long(n), long(c), long(h), long(w));
      psi_inverse_cpu<T>(ref.data(), n, c, h, w, b, back_ref.data(), 1);
      for (std::size_t i = 0; i < total; ++i) back[std::size_t(psi_source(index_t(i), c, h, w, b))] = ref[i];
      EXPECT(std::memcmp(back_ref.data(), back.data(), total * sizeof(T)) == 0 &&
                 std::memcmp(back.data(), x.data(), total * sizeof(T)) == 0,
             "psi_inverse b=%ld", long(b));
    }
    // channel affine with and without ReLU (bit for bit: the same two roundings)
    auto sc = randn<T>(std::size_t(c), rng), sf = randn<T>(std::size_t(c), rng);
    for (bool relu : {false, true}) {
      std::vector<T> ref(total), got(total);
      channel_affine_cpu<T>(x.data(), n, c, hw, sc.data(), sf.data(), relu, ref.data(), 1);
      for (std::size_t i = 0; i < total; ++i)
        got[i] = channel_affine_value(x.data(), sc.data(), sf.data(), relu, index_t(i), c, hw);
      EXPECT(std::memcmp(ref.data(), got.data(), total * sizeof(T)) == 0, "channel_affine relu=%d", int(relu));
    }
    // ActNorm: y = (x - loc) / scale and back
    auto loc = randn<T>(std::size_t(c), rng);
    std::vector<T> scale(static_cast<std::size_t>(c));
    for (index_t ci = 0; ci < c; ++ci) scale[std::size_t(ci)] = T(0.5 + 0.25 * double(ci));
    std::vector<T> y(total), xb(total);
    bool ok = true;
    for (index_t a = 0; a < n; ++a)
      for (index_t ci = 0; ci < c; ++ci)
        for (index_t p = 0; p < hw; ++p) {
          const index_t i = (a * c + ci) * hw + p;
          y[std::size_t(i)] = actnorm_value(x.data(), loc.data(), scale.data(), false, i, c, hw);
          ok = ok && y[std::size_t(i)] == (x[std::size_t(i)] - loc[std::size_t(ci)]) / scale[std::size_t(ci)];
        }
    for (index_t i = 0; i < index_t(total); ++i)
      xb[std::size_t(i)] = actnorm_value(y.data(), loc.data(), scale.data(), true, i, c, hw);
    double worst = 0;
    for (std::size_t i = 0; i < total; ++i) worst = std::max(worst, std::fabs(double(xb[i]) - double(x[i])));
    EXPECT(ok && worst < (sizeof(T) == 4 ? 1e-5 : 1e-13), "actnorm (round trip %.2e)", worst);
    // channel copy: pad (n, c, hw) into (n, c + 3, hw) at offset 1, then take it back out
    {
      const index_t cd = c + 3;
      std::vector<T> dst(std::size_t(n * cd * hw), T(0)), back(total, T(NAN));
      for (index_t i = 0; i < n * c * hw; ++i) {
        index_t a, b;
        channel_copy_offsets(i, c, hw, c, 0, cd, 1, a, b);
        dst[std::size_t(b)] = x[std::size_t(a)];
      }
      bool good = true;
      for (index_t a = 0; a < n; ++a)
        for (index_t ch = 0; ch < cd; ++ch)
          for (index_t p = 0; p < hw; ++p) {
            const T want = (ch >= 1 && ch < c + 1) ? x[std::size_t((a * c + ch - 1) * hw + p)] : T(0);
            good = good && dst[std::size_t((a * cd + ch) * hw + p)] == want;
          }
      for (index_t i = 0; i < n * c * hw; ++i) {
        index_t a, b;
        channel_copy_offsets(i, c, hw, cd, 1, c, 0, a, b);
        back[std::size_t(b)] = dst[std::size_t(a)];
      }
      good = good && std::memcmp(back.data(), x.data(), total * sizeof(T)) == 0;
      EXPECT(good, "channel_copy");
    }
    // affine coupling, c1 = c / 2 (c odd: x2 has one channel more), clamp 2 and 0
    if (c >= 2) {
      const index_t c1 = c / 2, c2 = c - c1;
      auto net = randn<T>(std::size_t(n * 2 * c2 * hw), rng, 2.0);
      for (double clamp : {2.0, 0.0}) {
        std::vector<T> yy(total), s(std::size_t(n * c2 * hw), T(NAN)), xx(total);
        for (index_t i = 0; i < index_t(total); ++i)
          yy[std::size_t(i)] = affine_coupling_value(x.data(), net.data(), i, c1, c2, hw, clamp, false, s.data());
        double worst_f = 0, worst_rt = 0;
        for (index_t a = 0; a < n; ++a)
          for (index_t ch = 0; ch < c; ++ch)
            for (index_t p = 0; p < hw; ++p) {
              const std::size_t i = std::size_t((a * c + ch) * hw + p);
              double want = double(x[i]);
              if (ch >= c1) {
                const index_t j = ch - c1;
                const double sr = double(net[std::size_t((a * 2 * c2 + j) * hw + p)]);
                const double sv = clamp > 0 ? clamp * 0.636 * std::atan(sr / clamp) : sr;
                const double tv = double(net[std::size_t((a * 2 * c2 + c2 + j) * hw + p)]);
                want = double(x[i]) * std::exp(sv) + tv;
                worst_f = std::max(worst_f, std::fabs(double(s[std::size_t((a * c2 + j) * hw + p)]) - sv) /
                                                std::max(1.0, std::fabs(sv)));
              }
              worst_f = std::max(worst_f, std::fabs(double(yy[i]) - want) / std::max(1.0, std::fabs(want)));
            }
        for (index_t i = 0; i < index_t(total); ++i)
          xx[std::size_t(i)] = affine_coupling_value(yy.data(), net.data(), i, c1, c2, hw, clamp, true, (T*)nullptr);
        for (std::size_t i = 0; i < total; ++i)
          worst_rt = std::max(worst_rt, std::fabs(double(xx[i]) - double(x[i])) /
                                            std::max({1.0, std::fabs(double(x[i])), std::fabs(double(yy[i]))}));
        const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
        EXPECT(worst_f < tol && worst_rt < tol, "affine_coupling clamp=%g: forward %.2e round trip %.2e", clamp,
               worst_f, worst_rt);
      }
    }
  }
}

int main() {
  struct conv_shape {
    index_t n, c, h, w, m, k, stride, pad;
  };
  // 3x3 and 1x1, stride 1 and 2, pad 0 and 1, odd sizes, channel and pixel counts that are not multiples of
  // the tiles (64 x 64, 16 x 256) or of the K slice (16), several tiles each way.
  const conv_shape shapes[] = {{1, 1, 1, 1, 1, 1, 1, 0},  {2, 3, 7, 5, 5, 3, 1, 1},  {2, 4, 8, 8, 70, 3, 2, 1},
                               {3, 6, 9, 7, 17, 3, 2, 1}, {2, 16, 6, 6, 4, 3, 1, 1}, {1, 5, 5, 9, 9, 1, 1, 0},
                               {2, 7, 6, 6, 3, 1, 2, 0},  {1, 2, 3, 3, 2, 3, 1, 0},  {1, 3, 4, 4, 130, 3, 1, 1},
                               {2, 33, 5, 4, 8, 3, 2, 1}};
  double w32 = 0, w64 = 0;
  unsigned seed = 1;
  for (const auto& s : shapes)
    for (int variant = 0; variant < 6; ++variant) {
      // variant: fuse (0 none, 1 ReLU, 2 BN+ReLU) x epilogue (plain+bias, addend, in-place accumulate, alpha -1)
      const int fuse = variant % 3;
      const bool bias = variant % 2 == 0;
      const bool addend = variant >= 2;
      const bool in_place = variant >= 4;
      const double alpha = variant == 3 || variant == 5 ? -1.0 : (variant == 1 ? 0.75 : 1.0);
      for (bool wide : {false, true}) {
        const double e64 = conv_case<double>(s.n, s.c, s.h, s.w, s.m, s.k, s.stride, s.pad, fuse, bias, addend,
                                             in_place, alpha, seed, wide);
        const double e32 = conv_case<float>(s.n, s.c, s.h, s.w, s.m, s.k, s.stride, s.pad, fuse, bias, addend, in_place,
                                            alpha, seed + 1, wide);
        ++seed;
        w64 = std::max(w64, e64);
        w32 = std::max(w32, e32);
        EXPECT(e64 <= 1e-12 && e32 <= 1e-5,
               "conv n=%ld c=%ld %ldx%ld m=%ld k=%ld stride=%ld pad=%ld variant=%d wide=%d: f64 %.2e f32 %.2e",
               long(s.n), long(s.c), long(s.h), long(s.w), long(s.m), long(s.k), long(s.stride), long(s.pad), variant,
               int(wide), e64, e32);
      }
    }
  elementwise_cases<float>(11);
  elementwise_cases<double>(12);
  std::printf("worst conv f64 %.3e f32 %.3e, %d failure(s)\n", w64, w32, failures);
  return failures ? 1 : 0;
}

#endif  // ARCFLOW_EMU_SHARED
