// Host emulation of the CUDA tile kernel and diag (cpp/src/cuda/fc_tile.cuh) against the CPU engine.
//
// Each CUDA thread of a block runs as an OS thread, __syncthreads is a std::barrier and __shared__ arrays are
// function statics, so the kernels' indexing, tiling, mirroring and bounds are checked without a GPU.
// Built and run by tests/kernels/test_cuda.py (g++ -std=c++20); prints one line "worst f64 <err> f32 <err>", the
// largest error relative to the largest |entry|, over all cases. With a directory as argument it also writes the
// emulated kernels of a few cases (every activation, both dtypes, with and without bias) there, with their
// inputs, for test_cuda.py to compare with arcflow.reference: the CPU engine shares activations.hpp with the
// CUDA kernels, so agreeing with it alone would not catch an error in the shared formulas.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <string>
#include <random>
#include <thread>
#include <vector>

#include "cuda_emulation.hpp"

#include "../../cpp/src/cuda/fc_tile.cuh"

using namespace arcflow;
using namespace arcflow::cuda_detail;

// Where run_case writes its inputs and emulated outputs (null: nowhere). Collinear rows are left out of the
// written cases: the reference computes such off-diagonal pairs naively (off by ~1e-8, more for Step and Sign).
struct dump_target {
  std::FILE* manifest;
  std::string dir, name;
};

template <class T>
double run_case(const act_params& ap, double wv, double bv, int depth, int fix, int n1, int n2, int d, bool sym,
                unsigned seed, const dump_target* dump = nullptr) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  if (sym) n2 = n1;
  std::vector<T> x1(size_t(n1) * d), x2(size_t(n2) * d);
  for (auto& v : x1) v = T(nd(rng));
  for (auto& v : x2) v = T(nd(rng));
  if (n1 > 3)  // a duplicate, a multiple and a zero row: the first-layer refinement and the zero-row limits
    for (int k = 0; k < d; ++k) {
      if (!dump) {
        x1[size_t(d) + k] = x1[k];
        x1[size_t(2) * d + k] = T(-0.6) * x1[k];
      }
      x1[size_t(3) * d + k] = T(0);
    }
  if (!sym && n2 > 1 && !dump)
    for (int k = 0; k < d; ++k) {
      x2[k] = x1[k];
      x2[size_t(d) + k] = T(0.7) * x1[k];
    }
  if (sym) x2 = x1;
  fc_params p;
  p.act = ap;
  p.depth = depth;
  p.w_var = wv;
  p.b_var = bv;
  p.gram_scale = wv / d;
  p.fix_dep = fix;

  std::vector<T> cn(size_t(n1) * n2), ct(size_t(n1) * n2);
  fc_engine<T> eng(x1.data(), n1, sym ? x1.data() : x2.data(), n2, d, sym, p);
  eng.rows(0, n1, cn.data(), ct.data(), nullptr, 1);

  auto norm2 = [d](const std::vector<T>& x, int n) {
    std::vector<double> q(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      double acc = 0;
      for (int k = 0; k < d; ++k) {
        const double v = double(x[size_t(i) * d + k]);
        acc += v * v;
      }
      q[size_t(i)] = acc;
    }
    return q;
  };
  const std::vector<double> q1 = norm2(x1, n1), q2 = norm2(x2, n2);
  const index_t np1 = (n1 + TABLE_PAD - 1) / TABLE_PAD * TABLE_PAD, np2 = (n2 + TABLE_PAD - 1) / TABLE_PAD * TABLE_PAD;
  std::vector<T> gn(size_t(n1) * n2, T(-9)), gt(size_t(n1) * n2, T(-9));  // sentinels: unwritten entries show
  by_activation<T, false>(p, [&](auto act) {
    using Act = decltype(act);
    const std::vector<T> t1 = build_table<T, Act>(q1, n1, np1, p), t2 = build_table<T, Act>(q2, n2, np2, p);
    tile_args<T> g;
    g.x1 = x1.data();
    g.x2 = sym ? x1.data() : x2.data();
    g.n1 = n1;
    g.n2 = n2;
    g.d = d;
    g.tab1 = t1.data();
    g.tab2 = sym ? t1.data() : t2.data();
    g.np1 = np1;
    g.np2 = sym ? np1 : np2;
    g.nngp = gn.data();
    g.ntk = gt.data();
    g.depth = depth;
    g.fix_dep = fix;
    g.symmetric = sym;
    g.bv = T(bv);
    g.gs = T(p.gram_scale);
    g.sq_gs = T(std::sqrt(p.gram_scale));
    g.w_sd = T(std::sqrt(wv));
    constexpr int BM = TY * tile_cfg<T>::TM, BN = TX * tile_cfg<T>::TN;
    const unsigned gx = unsigned((n2 + BN - 1) / BN), gy = unsigned((n1 + BM - 1) / BM);
    for (unsigned by = 0; by < gy; ++by)
      for (unsigned bx = 0; bx < gx; ++bx)
        emu_run_block({bx, by, 0}, {gx, gy, 1}, NTHREADS, [&] { fc_tile_kernel<T, Act>(g, act); });
    if (sym) {  // the CUDA backend's diag (computed on the host from the row norms)
      const size_t nn1 = static_cast<size_t>(n1);
      std::vector<T> dn(nn1), dt(nn1), en(nn1, T(-5)), et(nn1, T(-5));
      eng.diag(dn.data(), dt.data(), 1);
      diag_values<T, Act>(q1, n1, p, en.data(), et.data());
      cn.insert(cn.end(), dn.begin(), dn.end());
      ct.insert(ct.end(), dt.begin(), dt.end());
      gn.insert(gn.end(), en.begin(), en.end());
      gt.insert(gt.end(), et.begin(), et.end());
    }
  });
  if (dump) {  // x1, x2 (not in the symmetric case), nngp, ntk, then the diag kernel's nngp, ntk; as doubles
    const std::string file = dump->name + (sizeof(T) == 8 ? "_f64" : "_f32") + (sym ? "_sym" : "") + ".bin";
    std::FILE* f = std::fopen((dump->dir + "/" + file).c_str(), "wb");
    if (!f) return 1e300;
    auto put = [f](const T* v, size_t n) {
      for (size_t e = 0; e < n; ++e) {
        const double x = double(v[e]);
        std::fwrite(&x, sizeof x, 1, f);
      }
    };
    put(x1.data(), x1.size());
    if (!sym) put(x2.data(), x2.size());
    put(gn.data(), gn.size());  // in the symmetric case the diag kernel's n1 values follow the matrix
    put(gt.data(), gt.size());
    std::fclose(f);
    std::fprintf(dump->manifest, "%s %s %d %.17g %.17g %d %.17g %.17g %d %d %d %d %d %d\n", file.c_str(),
                 sizeof(T) == 8 ? "float64" : "float32", int(ap.kind), ap.a, ap.b, ap.n, wv, bv, depth, fix, n1, n2, d,
                 int(sym));
  }
  double mx = 0, err = 0;
  for (size_t e = 0; e < cn.size(); ++e) mx = std::max({mx, std::fabs(double(cn[e])), std::fabs(double(ct[e]))});
  for (size_t e = 0; e < cn.size(); ++e) {
    const double e1 = std::fabs(double(cn[e]) - double(gn[e])), e2 = std::fabs(double(ct[e]) - double(gt[e]));
    err = (e1 <= 1e300 && e2 <= 1e300) ? std::max({err, e1, e2}) : 1e300;  // NaN or inf: fail
  }
  return err / std::max(mx, 1e-300);
}

int main(int argc, char** argv) {
  struct act_case {
    act_params p;
    double wv, bv;
    const char* name;
  };
  auto ab = [](double a, double b) {
    act_params p;
    p.kind = act_kind::abrelu;
    p.a = a;
    p.b = b;
    return p;
  };
  auto mono = [](int n) {
    act_params p;
    p.kind = act_kind::monomial;
    p.n = n;
    return p;
  };
  auto kind = [](act_kind k) {
    act_params p;
    p.kind = k;
    return p;
  };
  const act_case acts[] = {{ab(0, 1), 1.69, 0.16, "relu"},
                           {ab(0, 1), 2.0, 0.0, "relu_nobias"},
                           {ab(0.2, 1), 1.69, 0.16, "leaky"},
                           {ab(-1, 1), 1.21, 0.09, "abs"},
                           {ab(1, 1), 1.21, 0.09, "identity"},
                           {mono(0), 1.69, 0.16, "step"},
                           {mono(2), 0.25, 0.16, "monomial_2"},
                           {mono(3), 0.09, 0.16, "monomial_3"},
                           {kind(act_kind::sign), 1.69, 0.16, "sign"},
                           {kind(act_kind::erf), 2.25, 0.04, "erf"}};
  struct shape {
    int n1, n2, d;
    bool sym;
  };
  // Ragged edges, several tiles each way (float tiles are 128 x 128, double 64 x 64), symmetric mirrors.
  const shape shapes[] = {{1, 1, 1, false}, {150, 70, 11, false}, {130, 130, 9, true}, {6, 6, 4, true}};
  double worst32 = 0, worst64 = 0;
  int bad = 0;
  for (const auto& ac : acts)
    for (const auto& sh : shapes)
      for (int depth : {0, 2, 8}) {
        const int fix = depth == 8 ? 3 : (depth > 0 ? 1 : 0);
        const double e64 = run_case<double>(ac.p, ac.wv, ac.bv, depth, fix, sh.n1, sh.n2, sh.d, sh.sym, 1);
        const double e32 = run_case<float>(ac.p, ac.wv, ac.bv, depth, fix, sh.n1, sh.n2, sh.d, sh.sym, 2);
        worst64 = std::max(worst64, e64);
        worst32 = std::max(worst32, e32);
        if (e64 > 1e-12 || e32 > 1e-5) {
          ++bad;
          std::printf("%-12s %4d x %4d d=%3d sym=%d depth=%d: f64 %.2e f32 %.2e\n", ac.name, sh.n1, sh.n2, sh.d,
                      int(sh.sym), depth, e64, e32);
        }
      }
  if (argc > 1) {  // every activation, with its bias and without, both dtypes, a ragged and a symmetric shape
    dump_target dt{std::fopen((std::string(argv[1]) + "/manifest.txt").c_str(), "w"), argv[1], ""};
    if (!dt.manifest) return 2;
    for (const auto& ac : acts) {
      if (ac.bv == 0) continue;  // relu_nobias: relu without bias is written below
      for (const double bv : {ac.bv, 0.0})
        for (const shape& sh : {shape{70, 40, 11, false}, shape{70, 70, 9, true}}) {
          dt.name = std::string(ac.name) + (bv > 0 ? "_bias" : "_nobias");
          const double e64 = run_case<double>(ac.p, ac.wv, bv, 3, 1, sh.n1, sh.n2, sh.d, sh.sym, 3, &dt);
          const double e32 = run_case<float>(ac.p, ac.wv, bv, 3, 1, sh.n1, sh.n2, sh.d, sh.sym, 4, &dt);
          worst64 = std::max(worst64, e64);
          worst32 = std::max(worst32, e32);
          if (e64 > 1e-12 || e32 > 1e-5) {
            ++bad;
            std::printf("%-20s %4d x %4d (written case): f64 %.2e f32 %.2e\n", dt.name.c_str(), sh.n1, sh.n2, e64, e32);
          }
        }
    }
    std::fclose(dt.manifest);
  }
  std::printf("worst f64 %.3e f32 %.3e\n", worst64, worst32);
  return bad ? 1 : 0;
}
