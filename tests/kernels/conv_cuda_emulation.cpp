// Host emulation of the CUDA convolutional kernel (cpp/src/cuda/conv_tile.cuh) against the CPU engine
// (cpp/src/cpu/conv_kernel.cpp).
//
// The self pass and the pair pass run as the CUDA engine (conv_kernel.cu) launches them, block by block with one
// OS thread per CUDA thread (cuda_emulation.hpp), in row blocks whose results go through the engine's own
// conv_scatter_rows. Checked: every activation on a SAME / GlobalAvgPool network, the diag mode (Flatten without
// pooling) with CIRCULAR padding, AvgPool with strides and VALID convs, a fully-connected network (1 x 1 images),
// symmetric and not, float and double, grids smaller than the work (grid-stride) and block sizes that do not
// divide it, images with identical patches (duplicates, shifted copies: the gap must be exactly 0 there), and the
// first op that overflows in the self pass (the CPU engine's fp_overflow message).
// Built and run by tests/kernels/test_conv_cuda.py (g++ -std=c++20); prints "worst f64 <err> f32 <err>" (the
// largest error relative to the largest |entry| over all cases) and exits 1 when a case is off.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda_emulation.hpp"

#include "../../cpp/src/cuda/conv_tile.cuh"

using namespace arcflow;
using namespace arcflow::cuda_detail;

namespace {

// The CUDA engine's passes, emulated: the self pass, then the pair pass in row blocks of `row_block`.
template <class T>
struct emulated_engine {
  conv_layout L;
  index_t n1, n2, h, w, c;
  bool symmetric, ntk;
  unsigned grid, threads;
  std::vector<T> tab1, tab2, scratch, self_nngp, self_ntk;
  std::vector<int> bad;
  const T *x1, *x2;

  emulated_engine(const T* a, index_t n1_, const T* b, index_t n2_, index_t h_, index_t w_, index_t c_, bool sym,
                  const std::vector<conv_op>& ops, bool want_ntk, unsigned grid_, unsigned threads_)
      : L(make_conv_layout(h_, w_, ops)),
        n1(n1_),
        n2(n2_),
        h(h_),
        w(w_),
        c(c_),
        symmetric(sym),
        ntk(want_ntk),
        grid(grid_),
        threads(threads_),
        x1(a),
        x2(sym ? a : b) {
    tab1.assign(std::size_t(n1 * L.tab_len), T(-7));  // sentinels: a table value the self pass misses shows
    tab2.assign(std::size_t(sym ? 0 : n2 * L.tab_len), T(-7));
    scratch.assign(std::size_t(grid) * (ntk ? 4 : 2) * std::size_t(L.buf_len), T(0));
    const index_t n_self = n1 + (sym ? 0 : n2);
    self_nngp.assign(std::size_t(n_self), T(-5));
    self_ntk.assign(std::size_t(n_self), T(-5));
    bad.assign(std::size_t(n_self), -2);
    conv_args<T> g = args();
    g.self = 1;
    g.self_nngp = self_nngp.data();
    g.self_ntk = self_ntk.data();
    g.bad = bad.data();
    launch(g, std::min<index_t>(grid, n_self));
  }

  conv_args<T> args() {
    conv_args<T> g{};
    g.st = L.st.data();
    g.nst = int(L.st.size());
    g.x1 = x1;
    g.x2 = x2;
    g.n1 = n1;
    g.n2 = n2;
    g.h = h;
    g.w = w;
    g.c = c;
    g.diag_mode = L.diag_mode;
    g.want_ntk = ntk;
    g.symmetric = symmetric;
    g.tab1 = tab1.data();
    g.tab2 = symmetric ? tab1.data() : tab2.data();
    g.tab_len = L.tab_len;
    g.scratch = scratch.data();
    g.buf_len = L.buf_len;
    return g;
  }

  void launch(const conv_args<T>& g, index_t blocks) {
    for (unsigned b = 0; b < unsigned(blocks); ++b)
      emu_run_block({b, 0, 0}, {unsigned(blocks), 1, 1}, threads, [&g] { conv_pair_kernel<T>(g); });
  }

  void rows(index_t r0, index_t r1, T* nngp, T* ntkout) {
    const index_t rows = r1 - r0;
    std::vector<T> dn(std::size_t(rows * n2), T(-3)), dt(std::size_t(rows * n2), T(-3));
    conv_args<T> g = args();
    g.self = 0;
    g.r0 = r0;
    g.rows = rows;
    g.out_nngp = dn.data();
    g.out_ntk = ntkout ? dt.data() : nullptr;
    launch(g, std::min<index_t>(grid, rows * n2));
    conv_scatter_rows(dn.data(), r0, rows, n2, symmetric, self_nngp.data(), nngp);
    if (ntkout) conv_scatter_rows(dt.data(), r0, rows, n2, symmetric, self_ntk.data(), ntkout);
  }
};

conv_op make(conv_op_kind k, int f = 1, conv_padding pad = conv_padding::valid, double wv = 1.0, double bv = 0.0) {
  conv_op o;
  o.kind = k;
  o.fh = o.fw = f;
  o.padding = pad;
  o.w_var = wv;
  o.b_var = bv;
  return o;
}
conv_op act_op(const act_params& p) {
  conv_op o;
  o.kind = conv_op_kind::act;
  o.act = p;
  return o;
}
act_params ap(act_kind k, double a = 0.0, double b = 1.0, int n = 1) {
  act_params p;
  p.kind = k;
  p.a = a;
  p.b = b;
  p.n = n;
  return p;
}

// Images with identical patches: x1[1] = x1[0], x1[2] = x1[0] shifted by one pixel, a zero image, and x2 sharing
// x1[0] and a shifted copy of it.
template <class T>
void make_images(std::vector<T>& x1, index_t n1, std::vector<T>& x2, index_t n2, index_t h, index_t w, index_t c,
                 unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const index_t img = h * w * c;
  x1.assign(std::size_t(n1 * img), T(0));
  x2.assign(std::size_t(n2 * img), T(0));
  for (auto& v : x1) v = T(nd(rng));
  for (auto& v : x2) v = T(nd(rng));
  auto shifted = [&](const T* src, T* dst) {
    for (index_t i = 0; i < h; ++i)
      for (index_t j = 0; j < w; ++j)
        for (index_t k = 0; k < c; ++k) dst[(i * w + j) * c + k] = src[(i * w + (j + 1) % w) * c + k];
  };
  if (n1 >= 4) {
    std::copy(x1.begin(), x1.begin() + img, x1.begin() + img);
    shifted(x1.data(), x1.data() + 2 * img);
    std::fill(x1.begin() + 3 * img, x1.begin() + 4 * img, T(0));
  }
  if (n2 >= 2 && n1 >= 1) {
    std::copy(x1.begin(), x1.begin() + img, x2.begin());
    shifted(x1.data(), x2.data() + img);
  }
}

struct net_case {
  std::string name;
  std::vector<conv_op> ops;
  index_t h, w, c;
  bool ntk;
};

template <class T>
double run_case(const net_case& nc, index_t n1, index_t n2, bool sym, unsigned grid, unsigned threads,
                index_t row_block, unsigned seed) {
  std::vector<T> x1, x2;
  make_images(x1, n1, x2, sym ? 0 : n2, nc.h, nc.w, nc.c, seed);
  if (sym) n2 = n1;
  const T* p2 = sym ? x1.data() : x2.data();
  conv_engine<T> cpu(x1.data(), n1, p2, n2, nc.h, nc.w, nc.c, sym, nc.ops, nc.ntk, 1);
  const std::size_t nn = static_cast<std::size_t>(n1 * n2), n1s = static_cast<std::size_t>(n1);
  std::vector<T> cn(nn), ct(nn), dn1(n1s), dt1(n1s);
  cpu.rows(0, n1, cn.data(), nc.ntk ? ct.data() : nullptr, 1);
  cpu.diag(dn1.data(), nc.ntk ? dt1.data() : nullptr);

  emulated_engine<T> gpu(x1.data(), n1, p2, n2, nc.h, nc.w, nc.c, sym, nc.ops, nc.ntk, grid, threads);
  std::vector<T> gn(std::size_t(n1 * n2), T(-9)), gt(std::size_t(n1 * n2), T(-9));  // sentinels
  // row blocks in reverse order: the mirrors of a later block must not be overwritten by an earlier one
  std::vector<index_t> starts;
  for (index_t r0 = 0; r0 < n1; r0 += row_block) starts.push_back(r0);
  std::reverse(starts.begin(), starts.end());
  for (index_t r0 : starts) gpu.rows(r0, std::min(n1, r0 + row_block), gn.data(), nc.ntk ? gt.data() : nullptr);
  for (int b : gpu.bad)
    if (b != -1) return 1e300;

  double mx = 0, err = 0;
  auto cmp = [&](const std::vector<T>& a, const std::vector<T>& b, std::size_t n) {
    for (std::size_t e = 0; e < n; ++e) mx = std::max(mx, std::fabs(double(a[e])));
    for (std::size_t e = 0; e < n; ++e) {
      const double d = std::fabs(double(a[e]) - double(b[e]));
      err = d <= 1e300 ? std::max(err, d) : 1e300;
    }
  };
  cmp(cn, gn, cn.size());
  cmp(dn1, gpu.self_nngp, dn1.size());
  if (nc.ntk) {
    cmp(ct, gt, ct.size());
    cmp(dt1, gpu.self_ntk, dt1.size());
  }
  if (sym)
    for (index_t i = 0; i < n1; ++i)
      for (index_t j = 0; j < n1; ++j)
        if (gn[std::size_t(i * n1 + j)] != gn[std::size_t(j * n1 + i)]) return 1e300;  // exactly symmetric
  return err / std::max(mx, 1e-300);
}

// The first op that overflows: the emulated self pass against the CPU engine's fp_overflow message.
template <class T>
bool overflow_case(const net_case& nc) {
  std::vector<T> x1, x2;
  make_images(x1, 3, x2, 0, nc.h, nc.w, nc.c, 9);
  for (auto& v : x1) v *= T(sizeof(T) == 4 ? 1e17 : 1e150);  // Sigma ~ 1e34 / 1e300: the monomial leaves the range
  std::string cpu_msg;
  try {
    conv_engine<T> cpu(x1.data(), 3, x1.data(), 3, nc.h, nc.w, nc.c, true, nc.ops, nc.ntk, 1);
  } catch (const fp_overflow& e) {
    cpu_msg = e.what();
  }
  emulated_engine<T> gpu(x1.data(), 3, x1.data(), 3, nc.h, nc.w, nc.c, true, nc.ops, nc.ntk, 2, 32);
  int first = -1;
  for (int b : gpu.bad)
    if (b >= 0 && (first < 0 || b < first)) first = b;
  const std::string gpu_msg = first >= 0 ? conv_overflow_message(nc.ops, first, sizeof(T) == 4) : "";
  if (cpu_msg.empty() || cpu_msg != gpu_msg) {
    std::printf("overflow %s: cpu '%s' emulated '%s'\n", nc.name.c_str(), cpu_msg.c_str(), gpu_msg.c_str());
    return false;
  }
  return true;
}

}  // namespace

int main() {
  using K = conv_op_kind;
  using Pd = conv_padding;
  struct named_act {
    act_params p;
    const char* name;
    bool ntk;
  };
  const named_act acts[] = {{ap(act_kind::abrelu, 0, 1), "relu", true},
                            {ap(act_kind::abrelu, 0.2, 1), "leaky", true},
                            {ap(act_kind::abrelu, -1, 1), "abs", true},
                            {ap(act_kind::monomial, 0, 1, 0), "step", false},
                            {ap(act_kind::monomial, 0, 1, 2), "monomial_2", true},
                            {ap(act_kind::monomial, 0, 1, 3), "monomial_3", true},
                            {ap(act_kind::sign), "sign", false},
                            {ap(act_kind::erf), "erf", true}};
  std::vector<net_case> nets;
  for (const named_act& a : acts)  // SAME convs, GlobalAvgPool, Dense after the readout
    nets.push_back({std::string("gap_") + a.name,
                    {make(K::conv, 3, Pd::same, 1.7, 0.1), act_op(a.p), make(K::conv, 3, Pd::same, 1.3, 0.05),
                     act_op(a.p), make(K::gap), make(K::dense, 1, Pd::valid, 1.5, 0.2)},
                    5,
                    4,
                    2,
                    a.ntk});
  nets.push_back({"flatten_circular_relu",  // diag mode: only same-position pairs
                  {make(K::conv, 3, Pd::circular, 2.0, 0.1), act_op(acts[0].p), make(K::conv, 3, Pd::circular, 2.0),
                   act_op(acts[0].p), make(K::flatten), make(K::dense, 1, Pd::valid, 1.0, 0.3), act_op(acts[0].p),
                   make(K::dense, 1, Pd::valid, 2.0)},
                  6,
                  5,
                  3,
                  true});
  nets.push_back({"flatten_valid_erf",
                  {make(K::conv, 3, Pd::valid, 1.2, 0.1), act_op(acts[7].p), make(K::conv, 2, Pd::same, 1.1),
                   act_op(acts[7].p), make(K::flatten)},
                  6,
                  6,
                  1,
                  true});
  conv_op pool = make(K::pool, 2, Pd::same);
  pool.sh = pool.sw = 2;
  conv_op pool_c = make(K::pool, 3, Pd::circular);
  pool_c.fw = 2;
  nets.push_back({"pool_flatten_leaky",
                  {make(K::conv, 3, Pd::same, 1.7, 0.2), act_op(acts[1].p), pool, make(K::conv, 2, Pd::valid, 1.4),
                   act_op(acts[1].p), pool_c, make(K::flatten)},
                  7,
                  6,
                  2,
                  true});
  nets.push_back({"fully_connected",  // rows as 1 x 1 images with 5 channels
                  {make(K::dense, 1, Pd::valid, 1.69, 0.16), act_op(acts[0].p), make(K::dense, 1, Pd::valid, 2.0, 0.1),
                   act_op(acts[7].p), make(K::dense, 1, Pd::valid, 1.0)},
                  1,
                  1,
                  5,
                  true});

  struct shape {
    index_t n1, n2;
    bool sym;
    unsigned grid, threads;
    index_t row_block;
  };
  // grid smaller than the pairs, blocks of 1 / 37 / 64 threads, one-row blocks and uneven ones
  const shape shapes[] = {{6, 5, false, 4, 37, 4}, {7, 7, true, 3, 64, 3}, {5, 5, true, 64, 1, 1}};
  double worst32 = 0, worst64 = 0;
  int bad = 0;
  unsigned seed = 1;
  for (const net_case& nc : nets)
    for (const shape& sh : shapes) {
      if (sh.threads == 1 && nc.name != "gap_relu" && nc.name != "pool_flatten_leaky") continue;
      const double e64 = run_case<double>(nc, sh.n1, sh.n2, sh.sym, sh.grid, sh.threads, sh.row_block, seed);
      const double e32 = run_case<float>(nc, sh.n1, sh.n2, sh.sym, sh.grid, sh.threads, sh.row_block, seed + 100);
      ++seed;
      worst64 = std::max(worst64, e64);
      worst32 = std::max(worst32, e32);
      if (e64 > 1e-12 || e32 > 1e-5) {
        ++bad;
        std::printf("%-24s %lld x %lld sym=%d grid=%u threads=%u: f64 %.2e f32 %.2e\n", nc.name.c_str(),
                    (long long)sh.n1, (long long)sh.n2, int(sh.sym), sh.grid, sh.threads, e64, e32);
      }
    }
  const net_case overflow{"monomial_3_overflow",
                          {make(K::conv, 3, Pd::same, 1.0), act_op(acts[5].p), make(K::conv, 3, Pd::same, 1.0),
                           act_op(acts[5].p), make(K::gap)},
                          4,
                          4,
                          1,
                          true};
  if (!overflow_case<double>(overflow) || !overflow_case<float>(overflow)) ++bad;
  std::printf("worst f64 %.3e f32 %.3e\n", worst64, worst32);
  return bad ? 1 : 0;
}
