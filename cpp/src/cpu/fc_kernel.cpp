// CPU bodies of the fused NNGP/NTK recursion: tiles of 64 x 64 pairs, OpenMP over tiles.
#include "arcflow/fc_kernel.hpp"
#include "arcflow/fc_recursion.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_stream_pd / _ps, _mm_sfence: baseline x86-64
#endif

// Runtime dispatch to wider SIMD without -march: the tile kernel and the arccos loop are compiled three times,
// for baseline x86-64, x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512), and a function pointer picks one per
// call (select_isa), so that tests can force every variant (set_fc_isa, ARCFLOW_ISA).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ARCFLOW_FC_DISPATCH 1
#define ARCFLOW_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define ARCFLOW_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define ARCFLOW_FC_DISPATCH 0
#define ARCFLOW_TARGET_V3
#define ARCFLOW_TARGET_V4
#endif

namespace arcflow {
namespace {

constexpr index_t TILE = fc_engine<double>::tile;

enum isa_level : int { isa_generic = 0, isa_avx2 = 1, isa_avx512 = 2 };
constexpr const char* isa_names[] = {"generic", "avx2", "avx512"};

// The best level this CPU runs: the checks gcc makes for the x86-64-v3 and -v4 micro-architecture levels.
int cpu_isa() {
#if ARCFLOW_FC_DISPATCH
  static const int level = __builtin_cpu_supports("x86-64-v4")   ? isa_avx512
                           : __builtin_cpu_supports("x86-64-v3") ? isa_avx2
                                                                 : isa_generic;
  return level;
#else
  return isa_generic;
#endif
}

int isa_by_name(const std::string& name) {
  for (int l = 0; l < 3; ++l)
    if (name == isa_names[l]) return l;
  return -1;
}

// ARCFLOW_ISA caps the level ("auto" or unset: the CPU's best). Read once, at the first kernel call.
int env_isa() {
  static const int level = [] {
    const char* e = std::getenv("ARCFLOW_ISA");
    const std::string v = e ? e : "";
    if (v.empty() || v == "auto") return cpu_isa();
    const int l = isa_by_name(v);
    if (l < 0)
      throw std::invalid_argument("arcflow: the environment variable ARCFLOW_ISA='" + v +
                                  "' is not one of auto, generic, avx2, avx512");
    return std::min(l, cpu_isa());
  }();
  return level;
}

std::atomic<int> fc_isa_forced{-1};  // set_fc_isa; -1: env_isa()

int active_isa() {
  const int f = fc_isa_forced.load(std::memory_order_relaxed);
  return f >= 0 ? f : env_isa();
}

int fc_layout = -1;  // set_fc_layout

// Whether the layers run as one fused loop (see run_tile) and the Gram tile uses 64-byte vectors
// (gram_rows<T, R, 64>): by default only where the AVX-512 variant runs (on AVX2 both are slower).
bool fused_layout() {
  if (fc_layout >= 0) return fc_layout == 1;
  return active_isa() == isa_avx512;
}

std::string mib(double bytes) { return std::to_string(static_cast<long long>(bytes / (1 << 20) + 0.5)) + " MiB"; }

// The range of the tile kernel: every per-row value (r, 1/r, pa, pb, t, the norms, sqrt(Theta(x,x))) within
// [2^-E, 2^E], so that the products of two rows' values (P, 1/2P, the gaps, T, Theta) are normal numbers of T.
// erf multiplies four (gm gp), monomials carry a constant up to J_n(0) n^2.
// Below, more room: a near-collinear pair's gap P - Sigma(x,y) is P times sig2, which reaches the square of
// T's epsilon, and must stay a normal number (float32 rows of norm 1e-16 with a gap of 1e-10 lost it).
template <class T, class Act>
int fast_range_bits(const act_params& a) {
  const int emax = std::numeric_limits<T>::max_exponent;
  const int e = (a.kind == act_kind::erf ? emax / 4 : emax / 2) - 8;
  return e - int(std::ceil(Act::log2_j0(a) / 2));
}
template <class T, class Act>
int fast_range_bits_low(const act_params& a) {
  const int room = (-std::numeric_limits<T>::min_exponent - 2 * std::numeric_limits<T>::digits) / 2 - 4;
  return std::min(room, fast_range_bits<T, Act>(a));
}

// The parameters as T: a weight variance or Gram scale out of the range sends every pair to the long double
// path (b_var only needs to be finite: it is only ever added).
template <class T>
bool params_fit(const fc_params& p, int e) {
  auto fits = [&](double v) {
    return v == 0 || (std::fabs(v) >= std::ldexp(1.0, -e) && std::fabs(v) <= std::ldexp(1.0, e));
  };
  return fits(p.w_var) && fits(p.gram_scale) && std::isfinite(T(p.b_var));
}

template <class R>
struct row_scan {
  bool ok;
  R diag_s, diag_t;
  int over_s, over_t;
};

// The diagonal recursion of one row in R (diag_first, diag_next): whether the row's table values lie in the tile
// kernel's range, the last layer's Sigma(x,x) and Theta(x,x) (the bounds |K(x,y)| <= sqrt(K(x,x) K(y,y)), both kernels
// being positive semi-definite), and the first layer where each exceeds tmax.
template <class Act, class R>
row_scan<R> scan_row(R nx2, bool zero_row, const fc_params& p, int e_lo, int e, R tmax) {
  const R lo = std::ldexp(R(1), -e_lo), hi = std::ldexp(R(1), e);
  const bool pb_zero = p.act.kind == act_kind::sign || (p.act.kind == act_kind::monomial && p.act.n == 0);
  auto in = [&](R v) { return v == 0 ? zero_row : (std::fabs(v) >= lo && std::fabs(v) <= hi); };  // NaN: false
  row_scan<R> o{true, 0, 0, 0, 0};
  const R nx = std::sqrt(nx2);
  o.ok = in(nx);
  diag_state<R> st = diag_first(nx2, p);
  if (st.s > tmax) o.over_s = 1;
  if (st.thf > tmax) o.over_t = 1;
  for (int l = 0; l <= p.depth; ++l) {
    const R r = std::sqrt(st.s);
    R pa = 0, pb = 0;
    Act::row(p.act, st.s, r, pa, pb);
    const R t11 = Act::diag_t(p.act, st.s);
    o.ok = o.ok && in(r) && in(pa) && (in(pb) || (pb_zero && pb == 0)) && in(std::sqrt(t11)) && in(std::sqrt(st.th));
    if (l == p.depth) break;
    diag_next<Act>(st, t11, l, p);
    if (o.over_s == 0 && st.s > tmax) o.over_s = l + 2;
    if (o.over_t == 0 && st.thf > tmax) o.over_t = l + 2;
  }
  o.diag_s = st.s;
  o.diag_t = st.thf;
  return o;
}

// Per-row tables, computed in double whatever T is; rows out of the tile kernel's range are scanned again in
// long double for their bounds. O(n depth) memory and time, which at a large depth is seconds, so the caller's
// interrupt is polled every 64 rows.
template <class T, class Act>
void fill_table(const T* x, index_t n, index_t d, const fc_params& p, typename fc_engine<T>::row_table& tab,
                const char* name, const interrupt_fn& interrupt) {
  const index_t np = round_up(std::max<index_t>(n, 1), TILE);
  tab.n = np;
  tab.layers = p.depth + 1;
  try {
    tab.data.assign(size_t(np) * 5 * size_t(tab.layers), T(0));
    tab.norm.assign(size_t(np), T(0));
    tab.inv_norm.assign(size_t(np), T(0));
    tab.ok.assign(size_t(np), 1);
    tab.diag_s.assign(size_t(np), 0.0);
    tab.diag_t.assign(size_t(np), 0.0);
    tab.over_s.assign(size_t(np), 0);
    tab.over_t.assign(size_t(np), 0);
  } catch (const std::bad_alloc&) {
    throw allocation_error(std::string("arcflow: out of memory allocating the per-row tables of ") + name + " (" +
                           std::to_string(n) + " rows x " + std::to_string(tab.layers) + " layers x 5 values: " +
                           mib(double(np) * ((5.0 * tab.layers + 2) * sizeof(T) + 2 * sizeof(double) + 10)) + ")");
  }
  const int e = fast_range_bits<T, Act>(p.act), e_lo = fast_range_bits_low<T, Act>(p.act);
  const bool pfit = params_fit<T>(p, e);
  const double tmax = double(std::numeric_limits<T>::max());
  tab.all_ok = true;
  for (index_t i = 0; i < n; ++i) {
    if ((i & 63) == 0 && interrupt && interrupt()) throw interrupted();
    double nx2 = 0.0;
    bool zero_row = true;
    const T* xi = x + i * d;
    for (index_t k = 0; k < d; ++k) {
      nx2 += double(xi[k]) * double(xi[k]);
      zero_row = zero_row && xi[k] == T(0);
    }
    fill_row_table<T, Act>(nx2, p, tab.layers, np, i, tab.data.data(), tab.norm.data(), tab.inv_norm.data());
    row_scan<double> sc = scan_row<Act, double>(nx2, zero_row, p, e_lo, e, tmax);
    if (!sc.ok || !pfit) {
      long double nl = 0.0L;
      for (index_t k = 0; k < d; ++k) nl += (long double)xi[k] * (long double)xi[k];
      const row_scan<long double> sl = scan_row<Act, long double>(nl, zero_row, p, e_lo, e, (long double)tmax);
      sc = {false, double(sl.diag_s), double(sl.diag_t), sl.over_s, sl.over_t};
    }
    tab.ok[i] = sc.ok && pfit;
    tab.all_ok = tab.all_ok && tab.ok[i];
    tab.diag_s[i] = sc.diag_s;
    tab.diag_t[i] = sc.diag_t;
    tab.over_s[i] = sc.over_s;
    tab.over_t[i] = sc.over_t;
  }
}

// The long double twin of an activation, for the pairs out of the tile kernel's range.
template <class A>
struct wide;
template <class T, bool Z>
struct wide<abrelu_act<T, Z>> {
  using type = abrelu_act<long double, Z>;
};
template <class T, int N>
struct wide<monomial_act<T, N>> {
  using type = monomial_act<long double, N>;
};
template <class T>
struct wide<sign_act<T>> {
  using type = sign_act<long double>;
};
template <class T>
struct wide<erf_act<T>> {
  using type = erf_act<long double>;
};

// The pairs of one tile that involve a row out of the tile kernel's range, carried through the layers in long
// double (range 1e+-4932) beside the tile kernel, and written over its results.
struct slow_pairs {
  using LD = long double;
  index_t n = 0;                            // pairs
  int layer = 0;                            // layers done
  std::vector<index_t> e, ia, jb;           // tile offset i * TILE + j, row i and column j
  std::vector<LD> s12, gm, gp, ntk, td, h;  // h: n x (depth + 1), kernel_value_batch's H_k
  std::vector<LD> tab;                      // [row: the tile's rows, then its columns][layer][field r ir pa pb t]
  std::vector<int> over_s, over_t;          // per pair, the first layer beyond T's range (0: none)
};

// One thread's tile buffers, each aligned to 64 bytes: the loops load and store whole vectors of the tile,
// and a vector that straddles two cache lines costs two accesses.
template <class T>
struct workspace {
  struct free_deleter {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], free_deleter> buf;
  size_t size = 0;
  T *g, *s12, *gm, *gp, *ntk, *td, *h;
  T *a_sig2, *a_kap2, *a_x, *a_sin, *a_z, *a_base;  // one row's angle stages, TILE values each
  static size_t count(int n_all) {
    const size_t t2 = size_t(TILE) * TILE;  // a multiple of 64 bytes, as is 6 TILE values
    return t2 * (6 + size_t(n_all)) + 6 * size_t(TILE);
  }
  static double bytes(int n_all) { return double(count(n_all)) * sizeof(T); }
  slow_pairs slow;
  workspace(index_t d, int n_all) {
    (void)d;
    const size_t t2 = size_t(TILE) * TILE;
    const size_t n = count(n_all);
    T* p = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));
    if (p == nullptr) throw std::bad_alloc();
    buf.reset(p);
    size = n;
    g = p;
    s12 = g + t2;
    gm = s12 + t2;
    gp = gm + t2;
    ntk = gp + t2;
    td = ntk + t2;
    a_sig2 = td + t2;
    a_kap2 = a_sig2 + TILE;
    a_x = a_sig2 + 2 * TILE;
    a_sin = a_sig2 + 3 * TILE;
    a_z = a_sig2 + 4 * TILE;
    a_base = a_sig2 + 5 * TILE;
    h = a_sig2 + 6 * TILE;
  }
  // Zeroed by the thread that uses it (allocated by the calling thread): its pages go to that thread's node.
  void clear() { std::fill_n(buf.get(), size, T(0)); }
};

template <class T>
struct tile_ctx {
  const T *x1, *x2;
  const T* panels2;  // x2 packed by pack_panels, tile after tile: the tile at column j0 starts at j0 * d
  index_t n1, n2, d;
  bool symmetric;
  const fc_params* p;
  const typename fc_engine<T>::row_table *tab1, *tab2;
  T *nngp, *ntk, *ntk_all;
  bool stream;  // non-temporal stores: the outputs are too large to stay in cache anyway
  bool fused;   // fused_layout(), read once per call
  // The first layer at which an output entry overflowed T (0: none), lowest over the tiles.
  std::atomic<int>* over_nngp;
  std::atomic<int>* over_ntk;
};

void note_overflow(std::atomic<int>* a, int layer) {
  int cur = a->load();
  while ((cur == 0 || layer < cur) && !a->compare_exchange_weak(cur, layer)) {
  }
}

// The slow path (slow_pairs): out of line, it runs only for tiles with a row out of range.
template <class T, class Act>
__attribute__((noinline)) bool slow_begin(const tile_ctx<T>& c, const Act&, index_t i0, index_t ti, index_t j0,
                                          index_t tj, int n_all, slow_pairs& sp) {
  using LD = long double;
  sp.n = 0;
  sp.layer = 0;
  bool any = false;
  for (index_t i = 0; i < ti; ++i) any = any || !c.tab1->ok[i0 + i];
  for (index_t j = 0; j < tj; ++j) any = any || !c.tab2->ok[j0 + j];
  if (!any) return false;
  const fc_params& p = *c.p;
  const int layers = p.depth + 1;
  const index_t d = c.d;
  // Long double tables of the tile's rows and columns (np = 1: [layer][field]); a variance that underflows
  // even there is a zero-variance row (its kernels are 0 to long double precision, or the pi/2 convention).
  sp.tab.assign(size_t(ti + tj) * layers * 5, 0.0L);
  std::vector<LD> nrm(size_t(ti + tj));
  auto row_ptr = [&](index_t k) { return k < ti ? c.x1 + (i0 + k) * d : c.x2 + (j0 + k - ti) * d; };
  for (index_t k = 0; k < ti + tj; ++k) {
    const T* x = row_ptr(k);
    LD nx2 = 0, nm, inm;
    for (index_t q = 0; q < d; ++q) nx2 += LD(x[q]) * LD(x[q]);
    LD* t = sp.tab.data() + size_t(k) * layers * 5;
    fill_row_table<LD, Act, LD>(nx2, p, layers, 1, 0, t, &nm, &inm);
    nrm[k] = nm;
    for (int l = 0; l < layers; ++l) {
      LD* f = t + l * 5;
      if (!(f[0] > 0) || !std::isfinite(f[1])) f[0] = f[1] = 0;
    }
  }
  auto tab = [&](index_t k, int l, int f) { return sp.tab[(size_t(k) * layers + l) * 5 + f]; };
  for (index_t i = 0; i < ti; ++i)
    for (index_t j = 0; j < tj; ++j)
      if (!c.tab1->ok[i0 + i] || !c.tab2->ok[j0 + j]) {
        sp.e.resize(size_t(sp.n) + 1);
        sp.ia.resize(size_t(sp.n) + 1);
        sp.jb.resize(size_t(sp.n) + 1);
        sp.e[sp.n] = i * TILE + j;
        sp.ia[sp.n] = i;
        sp.jb[sp.n] = ti + j;
        ++sp.n;
      }
  const index_t n = sp.n;
  for (auto* v : {&sp.s12, &sp.gm, &sp.gp, &sp.ntk, &sp.td}) v->assign(size_t(n), 0.0L);
  sp.h.assign(size_t(n) * size_t(n_all), 0.0L);
  sp.over_s.assign(size_t(n), 0);
  sp.over_t.assign(size_t(n), 0);
  const LD gs = p.gram_scale, bv = p.b_var, sq_gs = std::sqrt(LD(p.gram_scale)), tmax = std::numeric_limits<T>::max();
  for (index_t q = 0; q < n; ++q) {
    const index_t a = sp.ia[q], b = sp.jb[q];
    const T *x = row_ptr(a), *y = row_ptr(b);
    const LD na = nrm[a], nb = nrm[b];
    LD dot = 0, dm = 0, dp = 0;
    for (index_t k = 0; k < d; ++k) {
      // As unit_dist2: the quotients with their rounding errors.
      const LD u = na > 0 ? LD(x[k]) / na : 0, v = nb > 0 ? LD(y[k]) / nb : 0;
      const LD eu = na > 0 ? std::fma(-u, na, LD(x[k])) / na : 0, ev = nb > 0 ? std::fma(-v, nb, LD(y[k])) / nb : 0;
      const LD um = (u - v) + (eu - ev), up = (u + v) + (eu + ev);
      dot += LD(x[k]) * LD(y[k]);
      dm += um * um;
      dp += up * up;
    }
    const LD nn = na * nb;
    const LD s = gs * dot + bv;
    LD bterm = 0;
    if (bv > 0) {
      bterm = bias_gap(bv, sq_gs * na, sq_gs * nb, tab(a, 0, 0), tab(b, 0, 0));
    }
    sp.s12[q] = s;
    sp.gm[q] = first_gap_minus(bterm, gs, nn * LD(0.5) * dm);
    sp.gp[q] = first_gap_plus(bterm, bv, gs, nn * LD(0.5) * dp);
    sp.ntk[q] = p.fix_dep < 1 ? s : LD(0);
    if (n_all) sp.h[size_t(q) * n_all] = s;
    if (std::fabs(s) > tmax) sp.over_s[q] = 1;
    if (std::fabs(sp.ntk[q]) > tmax) sp.over_t[q] = 1;
  }
  return true;
}

// One layer of the slow pairs: the general loop of run_tile, in long double.
template <class T, class Act>
__attribute__((noinline)) void slow_step(const tile_ctx<T>& c, int n_all, slow_pairs& sp) {
  using LD = long double;
  const fc_params& p = *c.p;
  const typename wide<Act>::type act(p.act, p.w_var);
  const int layers = p.depth + 1, l = sp.layer;
  const LD bv = p.b_var, w_sd = std::sqrt(LD(p.w_var)), tmax = std::numeric_limits<T>::max();
  const bool M = (l + 2) > p.fix_dep;
  auto tab = [&](index_t k, int layer, int f) { return sp.tab[(size_t(k) * layers + layer) * 5 + f]; };
  for (index_t q = 0; q < sp.n; ++q) {
    const index_t a = sp.ia[q], b = sp.jb[q];
    const LD r1 = tab(a, l, 0), ir1 = tab(a, l, 1), r2 = tab(b, l, 0), ir2 = tab(b, l, 1);
    const LD t1 = tab(a, l, 4), t2 = tab(b, l, 4);
    LD h = LD(0.5) * ir1 * ir2;
    if (!std::isfinite(h)) h = 0;  // P underflows even in long double: the zero-variance limit
    const pair_out<LD> o = act.pair(sp.s12[q], sp.gm[q], sp.gp[q], r1 * r2, h, tab(a, l, 2), tab(a, l, 3), t1,
                                    tab(b, l, 2), tab(b, l, 3), t2);
    const LD bterm = bv > 0 ? bias_gap(bv, w_sd * t1, w_sd * t2, tab(a, l + 1, 0), tab(b, l + 1, 0)) : LD(0);
    const LD s = bv > 0 ? next_sigma<true>(o.t, o.gm, o.gp, bv, bterm, sp.gm[q], sp.gp[q])
                        : next_sigma<false>(o.t, o.gm, o.gp, bv, bterm, sp.gm[q], sp.gp[q]);
    sp.s12[q] = s;
    sp.ntk[q] = M ? next_theta<true>(s, o.tdot, sp.ntk[q]) : next_theta<false>(s, o.tdot, sp.ntk[q]);
    if (n_all) {
      LD* hq = sp.h.data() + size_t(q) * n_all;
      for (int k = 0; k <= l + 1; ++k) hq[k] = ((l + 2) > k ? s : LD(0)) + o.tdot * hq[k];
    }
    if (sp.over_s[q] == 0 && std::fabs(s) > tmax) sp.over_s[q] = l + 2;
    if (sp.over_t[q] == 0 && std::fabs(sp.ntk[q]) > tmax) sp.over_t[q] = l + 2;
  }
  ++sp.layer;
}

// Writes the slow pairs' kernel_value_batch planes H_k (k <= the layers done) into the tile's buffers.
template <class T>
__attribute__((noinline)) void slow_patch_h(const tile_ctx<T>& c, int n_all, const slow_pairs& sp, T* h) {
  const long double tmax = std::numeric_limits<T>::max();
  for (index_t q = 0; q < sp.n; ++q)
    for (int k = 0; k <= sp.layer; ++k) {
      const long double v = sp.h[size_t(q) * n_all + k];
      if (!(std::fabs(v) <= tmax)) note_overflow(c.over_ntk, std::max(1, sp.over_t[q]));
      h[size_t(k) * TILE * TILE + sp.e[q]] = T(v);
    }
}

template <class T>
__attribute__((noinline)) void slow_finish(const tile_ctx<T>& c, const slow_pairs& sp, T* s12, T* ntk) {
  const long double tmax = std::numeric_limits<T>::max();
  for (index_t q = 0; q < sp.n; ++q) {
    const index_t e = sp.e[q];
    if (c.nngp && !(std::fabs(sp.s12[q]) <= tmax)) note_overflow(c.over_nngp, std::max(1, sp.over_s[q]));
    if (c.ntk && !(std::fabs(sp.ntk[q]) <= tmax)) note_overflow(c.over_ntk, std::max(1, sp.over_t[q]));
    s12[e] = T(sp.s12[q]);
    ntk[e] = T(sp.ntk[q]);
  }
}

// The Gram tile's x2 side is packed in panels of panel_width() columns (one cache line of values), each
// panel d x panel_width() contiguous, so the micro-kernel below streams through memory: with a plain k-major
// d x TILE layout its loads strode by 512 bytes, all into a few L1 sets.
template <class T>
constexpr int panel_width() {
  return 64 / int(sizeof(T));
}

// bt[panel p][k][jj] = x2[p * panel_width() + jj][k] (x2 at the tile's first column), zero beyond tj.
template <class T>
inline void pack_panels(const T* x2, index_t d, index_t tj, T* bt) {
  constexpr index_t PW = panel_width<T>();
  for (index_t j = 0; j < TILE; ++j) {
    T* dst = bt + (j / PW) * PW * d + j % PW;
    if (j < tj) {
      const T* xr = x2 + j * d;
      for (index_t k = 0; k < d; ++k) dst[k * PW] = xr[k];
    } else {
      for (index_t k = 0; k < d; ++k) dst[k * PW] = T(0);
    }
  }
}

// G rows [i, i+R) = a (R x d) times the packed bt, R rows x 2 vectors of VB bytes at a time (GCC vector
// extensions), 2R accumulators. VB = 32, sized for AVX2's 16 registers: the two vectors are the halves of one
// panel row; on SSE2 each vector splits in two. VB = 64 (AVX-512, 32 registers, R = 8): one vector per panel
// row and the same row of two panels (gram_rows<.., 32> would leave half of each AVX-512 FMA unused). Either
// way each element sums the same products in the same order, so the bits are the same.
template <class T, int R, int VB>
inline __attribute__((always_inline)) void gram_rows(const T* a, index_t d, const T* bt, T* g) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int W = VB / int(sizeof(T));
  constexpr int PW = panel_width<T>();
  static_assert(W == PW || 2 * W == PW, "a vector is a panel row or half of one");
  const index_t off1 = W == PW ? index_t(PW) * d : W;  // the second vector: the next panel, or the row's half
  for (int j0 = 0; j0 < TILE; j0 += 2 * W) {
    V c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = V{};
    const T* b = bt + j0 * d;
    for (index_t k = 0; k < d; ++k, b += PW) {
      V b0, b1;
      __builtin_memcpy(&b0, b, sizeof(V));
      __builtin_memcpy(&b1, b + off1, sizeof(V));
      for (int r = 0; r < R; ++r) {
        const T v = a[r * d + k];
        c0[r] += v * b0;
        c1[r] += v * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      __builtin_memcpy(g + r * TILE + j0, &c0[r], sizeof(V));
      __builtin_memcpy(g + r * TILE + j0 + W, &c1[r], sizeof(V));
    }
  }
}

template <class T>
inline __attribute__((always_inline)) void gram_tile(const T* a, index_t ti, index_t d, const T* bt, T* g, bool fused) {
  index_t i = 0;
  if (fused) {  // AVX-512
    for (; i + 8 <= ti; i += 8) gram_rows<T, 8, 64>(a + i * d, d, bt, g + i * TILE);
    for (; i + 4 <= ti; i += 4) gram_rows<T, 4, 64>(a + i * d, d, bt, g + i * TILE);
  }
  for (; i + 6 <= ti; i += 6) gram_rows<T, 6, 32>(a + i * d, d, bt, g + i * TILE);
  // 64 = 10 * 6 + 4: the last four rows in one block of 4 (8 accumulators, two FMAs in flight per cycle)
  // rather than two blocks of 2 (4 accumulators: the FMA latency bounds them to half rate).
  for (; i + 4 <= ti; i += 4) gram_rows<T, 4, 32>(a + i * d, d, bt, g + i * TILE);
  for (; i + 2 <= ti; i += 2) gram_rows<T, 2, 32>(a + i * d, d, bt, g + i * TILE);
  for (; i < ti; ++i) gram_rows<T, 1, 32>(a + i * d, d, bt, g + i * TILE);
}

// Copies n contiguous values to dst. With stream, non-temporal stores on the whole cache lines of dst: a large
// output is written once and not read back by the kernel, so streaming it past the caches saves the
// read-for-ownership of every output line and keeps the tile's working set in cache. Small outputs keep
// plain stores, so the caller finds them in cache.
// The caller fences (store_fence).
template <class T>
inline void stream_row(T* dst, const T* src, index_t n, bool stream) {
  index_t j = 0;
#if defined(__SSE2__)
  if (stream) {
    // Non-temporal stores only on whole cache lines: the line the row starts in and the line it ends in are
    // shared with the neighbouring tiles, so they take plain stores: a partly written line in a
    // write-combining buffer goes out as a slow partial write (and np.empty's large arrays start mid-line).
    constexpr index_t W = 16 / index_t(sizeof(T));
    constexpr index_t L = 64 / index_t(sizeof(T));
    for (; j < n && (reinterpret_cast<std::uintptr_t>(dst + j) & 63) != 0; ++j) dst[j] = src[j];
    for (; j + L <= n; j += L) {
      for (index_t k = j; k < j + L; k += W) {
        if constexpr (sizeof(T) == 8)
          _mm_stream_pd(reinterpret_cast<double*>(dst + k), _mm_loadu_pd(reinterpret_cast<const double*>(src + k)));
        else
          _mm_stream_ps(reinterpret_cast<float*>(dst + k), _mm_loadu_ps(reinterpret_cast<const float*>(src + k)));
      }
    }
  }
#else
  (void)stream;
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

// Touches, ahead of store_tile, the output lines that a tile's row segments share with the neighbouring tiles
// (the first and the last line of each segment, when they are partial): stream_row gives those lines plain
// stores, and a plain store to a line that is not in cache waits for the line to be read. Prefetched while
// the tile is computed, those reads overlap the arithmetic (the rows' whole lines are streamed, not read).
template <class T>
inline void prefetch_partial_lines(const T* out, index_t n2, index_t r0, index_t nr, index_t c0, index_t nc) {
  for (index_t i = 0; i < nr; ++i) {
    const T* a = out + (r0 + i) * n2 + c0;
    const T* e = a + nc;  // one past the segment
    if ((reinterpret_cast<std::uintptr_t>(a) & 63) != 0) __builtin_prefetch(a, 1, 3);
    if ((reinterpret_cast<std::uintptr_t>(e) & 63) != 0 && e - 1 > a) __builtin_prefetch(e - 1, 1, 3);
  }
}

template <class T>
inline void prefetch_tile_edges(const T* out, index_t n2, index_t i0, index_t ti, index_t j0, index_t tj,
                                bool symmetric) {
  if (out == nullptr) return;
  prefetch_partial_lines(out, n2, i0, ti, j0, tj);
  if (symmetric) prefetch_partial_lines(out, n2, j0, tj, i0, ti);  // the mirror's segments
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Writes a tile (ti x tj, leading dimension TILE) into a row-major n1 x n2 output; in the symmetric case
// also its mirror, and on a diagonal tile only the upper triangle (so both halves hold identical bits).
template <class T>
inline void store_tile(T* out, index_t n2, index_t i0, index_t ti, index_t j0, index_t tj, bool symmetric, const T* src,
                       bool stream) {
  const bool diag_tile = symmetric && i0 == j0;
  for (index_t i = 0; i < ti; ++i) {
    const index_t jb = diag_tile ? i : 0;
    stream_row(out + (i0 + i) * n2 + j0 + jb, src + i * TILE + jb, tj - jb, stream);
  }
  if (symmetric) {
    // The mirror, in strips of one cache line of columns: transpose the strip into a small buffer (each
    // line of the tile read once), then write its rows: gathering each column straight from the tile reads
    // 64 lines 512 bytes apart per column, which thrashes L1.
    constexpr index_t SB = 64 / index_t(sizeof(T));
    T strip[SB * TILE];
    for (index_t jb = 0; jb < tj; jb += SB) {
      const index_t jn = std::min(SB, tj - jb);
      for (index_t i = 0; i < ti; ++i)
        for (index_t jj = 0; jj < jn; ++jj) strip[jj * TILE + i] = src[i * TILE + jb + jj];
      for (index_t jj = 0; jj < jn; ++jj) {
        const index_t j = jb + jj;
        stream_row(out + (j0 + j) * n2 + i0, strip + jj * TILE, diag_tile ? j : ti, stream);
      }
    }
  }
}

// unit_dist2 (fc_recursion.hpp) out of line and out of the vector kernels: compiled once, for baseline x86-64,
// it has no FMA contraction and the same bits on every instruction-set variant.
template <class T>
__attribute__((noinline)) double unit_dist2_out_of_line(const T* x, const T* y, index_t d, double sgn) {
  return unit_dist2(x, y, d, sgn);
}

// The stages of the tile kernel below are always_inline: each is inlined into run_tile and so into the one
// function per instruction-set level (run_tile_isa), where GCC vectorises their loops for that level.
#define ARCFLOW_STAGE inline __attribute__((always_inline))

// Where a tile lies: rows [i0, i0 + ti) of x1 against columns [j0, j0 + tj) of x2.
struct tile_at {
  index_t i0, ti, j0, tj;
};

// The recursion's parameters as T (act carries w_var, activations.hpp).
template <class T>
struct tile_scalars {
  T bv, gs, sq_gs, w_sd;
  explicit tile_scalars(const fc_params& p)
      : bv(T(p.b_var)), gs(T(p.gram_scale)), sq_gs(T(std::sqrt(p.gram_scale))), w_sd(T(std::sqrt(p.w_var))) {}
};

// One layer's per-row table fields (r, 1/r, pa, pb, t, and r of the next layer) from the tile's first row on.
template <class T>
struct layer_rows {
  const T *r, *ir, *pa, *pb, *t, *rn;
  layer_rows(const typename fc_engine<T>::row_table& tab, int l, index_t o)
      : r(tab.field(l, 0) + o),
        ir(tab.field(l, 1) + o),
        pa(tab.field(l, 2) + o),
        pb(tab.field(l, 3) + o),
        t(tab.field(l, 4) + o),
        rn(tab.field(l + 1, 0) + o) {}
};

template <class T>
int ntk_planes(const tile_ctx<T>& c) {
  return c.ntk_all ? c.p->depth + 1 : 0;
}

// The first layer: s12 = gs G + b, the gaps |x||y| -/+ G and Theta^1. One pass over the tile (the gaps
// scaled and clamped as they are made); returns whether a pair's raw gap fell below tau |x||y| (refine_gaps).
template <class T, bool Bias>
ARCFLOW_STAGE bool first_layer(const tile_ctx<T>& c, const tile_scalars<T>& k, const tile_at& t, workspace<T>& ws,
                               T tau) {
  const T* __restrict g = ws.g;
  T* __restrict s12 = ws.s12;
  T* __restrict gm = ws.gm;
  T* __restrict gp = ws.gp;
  T* __restrict ntk = ws.ntk;
  const T* nrm1 = c.tab1->norm.data() + t.i0;
  const T* nrm2 = c.tab2->norm.data() + t.j0;
  const T* r1_0 = c.tab1->field(0, 0) + t.i0;
  const T* r2_0 = c.tab2->field(0, 0) + t.j0;
  const T bv = k.bv, gs = k.gs, sq_gs = k.sq_gs;
  const T mask0 = 1 > c.p->fix_dep ? T(1) : T(0);
  int near = 0;
  for (index_t i = 0; i < t.ti; ++i) {
    const T n1 = nrm1[i], q1 = sq_gs * n1, ra = r1_0[i];
#pragma omp simd reduction(| : near)
    for (index_t j = 0; j < TILE; ++j) {
      const index_t e = i * TILE + j;
      const T nn = n1 * nrm2[j];
      const T gme = nn - g[e], gpe = nn + g[e];
      near |= int(gme < tau * nn) | int(gpe < tau * nn);
      const T bterm = Bias ? bias_gap(bv, q1, sq_gs * nrm2[j], ra, r2_0[j]) : T(0);
      const T s = gs * g[e] + bv;
      s12[e] = s;
      gm[e] = first_gap_minus(bterm, gs, gme);
      gp[e] = first_gap_plus(bterm, bv, gs, gpe);
      ntk[e] = mask0 * s;
    }
  }
  return near != 0;
}

// The rare pairs of first_layer whose raw gap cancels, redone from the refined gap (unit_dist2) with the same
// expressions, so the bits are those of two passes.
template <class T, bool Bias>
ARCFLOW_STAGE void refine_gaps(const tile_ctx<T>& c, const tile_scalars<T>& k, const tile_at& t, workspace<T>& ws,
                               T tau) {
  const T* nrm1 = c.tab1->norm.data() + t.i0;
  const T* nrm2 = c.tab2->norm.data() + t.j0;
  const T* r1_0 = c.tab1->field(0, 0) + t.i0;
  const T* r2_0 = c.tab2->field(0, 0) + t.j0;
  const index_t d = c.d;
  for (index_t i = 0; i < t.ti; ++i) {
    for (index_t j = 0; j < t.tj; ++j) {
      const index_t e = i * TILE + j;
      const T nn = nrm1[i] * nrm2[j];
      const T gme = nn - ws.g[e], gpe = nn + ws.g[e];
      const bool near_m = gme < tau * nn, near_p = gpe < tau * nn;
      if (!(nn > T(0)) || !(near_m || near_p)) continue;
      const T v = T(double(nn) * 0.5 *
                    unit_dist2_out_of_line(c.x1 + (t.i0 + i) * d, c.x2 + (t.j0 + j) * d, d, near_m ? -1.0 : 1.0));
      const T bterm = Bias ? bias_gap(k.bv, k.sq_gs * nrm1[i], k.sq_gs * nrm2[j], r1_0[i], r2_0[j]) : T(0);
      if (near_m)
        ws.gm[e] = first_gap_minus(bterm, k.gs, v);
      else
        ws.gp[e] = first_gap_plus(bterm, k.bv, k.gs, v);
    }
  }
}

// kernel_value_batch's planes (ntk_all): H_k in ws.h, ntk_all[layer][k] for k <= layer.
template <class T>
ARCFLOW_STAGE void store_planes(const tile_ctx<T>& c, const tile_at& t, const workspace<T>& ws, int layer) {
  const int n_all = ntk_planes(c);
  const index_t plane = c.n1 * c.n2;
  for (int k = 0; k <= layer; ++k)
    store_tile(c.ntk_all + (index_t(layer) * n_all + k) * plane, c.n2, t.i0, t.ti, t.j0, t.tj, c.symmetric,
               ws.h + size_t(k) * TILE * TILE, c.stream);
}

// After the first layer: H_0 = Sigma^1, the others 0.
template <class T>
ARCFLOW_STAGE void first_planes(const tile_ctx<T>& c, const tile_at& t, workspace<T>& ws, bool slow) {
  const int n_all = ntk_planes(c);
  T* h0 = ws.h;
  for (index_t e = 0; e < TILE * TILE; ++e) h0[e] = ws.s12[e];
  for (int k = 1; k < n_all; ++k) std::fill_n(ws.h + size_t(k) * TILE * TILE, TILE * TILE, T(0));
  if (slow) slow_patch_h(c, n_all, ws.slow, ws.h);
  store_planes(c, t, ws, 0);
}

// After layer l: H_k = [l + 2 > k] Sigma + Tdot H_k for k <= l + 1 (kernel_value_batch's NTK with every
// fix_dep; Tdot in ws.td), the slow pairs' layer, then the planes stored.
template <class T, class Act>
ARCFLOW_STAGE void next_planes(const tile_ctx<T>& c, const tile_at& t, workspace<T>& ws, int l, const T* __restrict sig,
                               bool slow) {
  const T* __restrict td = ws.td;
  for (int k = 0; k <= l + 1; ++k) {
    T* hk = ws.h + size_t(k) * TILE * TILE;
    const T mk = (l + 2) > k ? T(1) : T(0);
#pragma omp simd
    for (index_t e = 0; e < TILE * TILE; ++e) hk[e] = mk * sig[e] + td[e] * hk[e];
  }
  if (slow) {
    const int n_all = ntk_planes(c);
    slow_step<T, Act>(c, n_all, ws.slow);
    slow_patch_h(c, n_all, ws.slow, ws.h);
  }
  store_planes(c, t, ws, l + 1);
}

// Scale-free activations without a bias (ReLU and its relatives, b_var = 0): the layers in units of P
// (abrelu_act::pair_scaled). gm and gp carry sig2 and kap2, s12 the correlation and ntk Theta / P; after the
// last layer one multiply by P = r1 r2 of that layer (kernel_value_batch's H_k: once per layer). Tiles with
// a zero row (P = 0: the pi/2 convention) take the general loop. Padding columns (j >= tj) have ir2 = 0:
// half_sines gives them the convention's finite values, never stored.

// Layer 0 turns the first layer's gaps and Theta into units of P (hh = 1 / 2P). The pair helpers take the
// buffers as restrict pointers, not through ws: through ws GCC kept the fused loop's loads and stores in order.
template <class T>
ARCFLOW_STAGE void to_units(T* __restrict gm, T* __restrict gp, T* __restrict ntk, index_t e, T hh) {
  T s2, k2;
  half_sines(gm[e], gp[e], hh, s2, k2);
  gm[e] = s2;
  gp[e] = k2;
  ntk[e] = ntk[e] * (T(2) * hh);  // Theta / P
}

template <bool M, class T, class Act>
ARCFLOW_STAGE void scaled_pair(const Act& act, T* __restrict gm, T* __restrict gp, T* __restrict s12, T* __restrict td,
                               T* __restrict ntk, index_t e, const angle<T>& g, bool want_td) {
  const pair_out<T> o = act.pair_scaled(g);
  gm[e] = o.gm;
  gp[e] = o.gp;
  s12[e] = o.t;
  if (want_td) td[e] = o.tdot;
  ntk[e] = next_theta<M>(o.t, o.tdot, ntk[e]);
}

// Row i of a layer in one loop, the angle without a division (angle_direct): the AVX-512 layout.
template <bool M, bool First, class T, class Act>
ARCFLOW_STAGE void scaled_row_fused(const Act& act, workspace<T>& ws, index_t i, T ha, const T* __restrict ir2,
                                    bool want_td) {
  T* __restrict gm = ws.gm;
  T* __restrict gp = ws.gp;
  T* __restrict s12 = ws.s12;
  T* __restrict td = ws.td;
  T* __restrict ntk = ws.ntk;
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j) {
    const index_t e = i * TILE + j;
    if constexpr (First) to_units(gm, gp, ntk, e, ha * ir2[j]);
    scaled_pair<M>(act, gm, gp, s12, td, ntk, e, angle_direct(gm[e], gp[e]), want_td);
  }
}

// Row i of a layer in three loops, as in the general path (the square root and division, the arctangent, the
// pair formulas).
template <bool M, class T, class Act>
ARCFLOW_STAGE void scaled_row_split(const Act& act, workspace<T>& ws, index_t i, T ha, const T* __restrict ir2,
                                    bool first, bool want_td) {
  T* __restrict gm = ws.gm;
  T* __restrict gp = ws.gp;
  T* __restrict s12 = ws.s12;
  T* __restrict td = ws.td;
  T* __restrict ntk = ws.ntk;
  T* __restrict a_x = ws.a_x;
  T* __restrict a_sin = ws.a_sin;
  T* __restrict a_z = ws.a_z;
  T* __restrict a_base = ws.a_base;
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j) {
    if (first) to_units(gm, gp, ntk, i * TILE + j, ha * ir2[j]);
    angle_reduce(gm[i * TILE + j], gp[i * TILE + j], a_z[j], a_base[j], a_sin[j]);
  }
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j) a_x[j] = angle_finish(a_z[j], a_base[j]);
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j)
    scaled_pair<M>(act, gm, gp, s12, td, ntk, i * TILE + j,
                   angle_from(gm[i * TILE + j], gp[i * TILE + j], a_x[j], a_sin[j]), want_td);
}

// The scale-free layers; false (nothing done) for a tile with a zero-variance row or at depth 0.
template <class T, class Act>
ARCFLOW_STAGE bool scaled_layers(const tile_ctx<T>& c, const Act& act, const tile_at& t, workspace<T>& ws, bool slow) {
  const int depth = c.p->depth;
  const T* ir1_0 = c.tab1->field(0, 1) + t.i0;
  const T* ir2_0 = c.tab2->field(0, 1) + t.j0;
  bool scaled = depth > 0 && act.k2 > T(0);
  for (index_t i = 0; i < t.ti; ++i) scaled &= ir1_0[i] > T(0);
  for (index_t j = 0; j < t.tj; ++j) scaled &= ir2_0[j] > T(0);
  if (!scaled) return false;
  const bool want_td = c.ntk_all != nullptr;
  for (int l = 0; l < depth; ++l) {
    const bool M = (l + 2) > c.p->fix_dep;
    for (index_t i = 0; i < t.ti; ++i) {
      const T ha = T(0.5) * ir1_0[i];
      if (!c.fused)
        M ? scaled_row_split<true>(act, ws, i, ha, ir2_0, l == 0, want_td)
          : scaled_row_split<false>(act, ws, i, ha, ir2_0, l == 0, want_td);
      else if (l == 0)
        M ? scaled_row_fused<true, true>(act, ws, i, ha, ir2_0, want_td)
          : scaled_row_fused<false, true>(act, ws, i, ha, ir2_0, want_td);
      else
        M ? scaled_row_fused<true, false>(act, ws, i, ha, ir2_0, want_td)
          : scaled_row_fused<false, false>(act, ws, i, ha, ir2_0, want_td);
    }
    if (want_td) {
      // kernel_value_batch's H_k stay in absolute units: Sigma = P rho into the Gram tile's buffer (no longer
      // needed), Tdot = k2 (Tdot / k2). One pass per layer, not one per stored plane.
      const T* ra = c.tab1->field(l + 1, 0) + t.i0;
      const T* rb = c.tab2->field(l + 1, 0) + t.j0;
      T* __restrict g = ws.g;
      T* __restrict td = ws.td;
      const T* __restrict s12 = ws.s12;
      for (index_t i = 0; i < t.ti; ++i) {
#pragma omp simd
        for (index_t j = 0; j < TILE; ++j) {
          const index_t e = i * TILE + j;
          g[e] = (ra[i] * rb[j]) * s12[e];
          td[e] = act.k2 * td[e];
        }
      }
      next_planes<T, Act>(c, t, ws, l, ws.g, slow);
    }
  }
  const T* rl1 = c.tab1->field(depth, 0) + t.i0;
  const T* rl2 = c.tab2->field(depth, 0) + t.j0;
  T* __restrict s12 = ws.s12;
  T* __restrict ntk = ws.ntk;
  for (index_t i = 0; i < t.ti; ++i) {
    const T ra = rl1[i];
#pragma omp simd
    for (index_t j = 0; j < TILE; ++j) {
      const index_t e = i * TILE + j;
      const T P = ra * rl2[j];
      s12[e] = P * s12[e];
      ntk[e] = P * ntk[e];
    }
  }
  return true;
}

// The general layer loop (every activation and bias). The angle of row i in loops of its own: its dependency chain
// (square root, division, polynomial) is long, and in one loop with the rest the out-of-order window holds too few
// pairs to hide it. Not fused even on AVX-512: the bias's own division makes the fused chain too long.
template <class T>
ARCFLOW_STAGE void row_angles(workspace<T>& ws, index_t i, T ha, const T* __restrict ir2, bool cols_nonzero) {
  const T* __restrict gm = ws.gm;
  const T* __restrict gp = ws.gp;
  T* __restrict a_sig2 = ws.a_sig2;
  T* __restrict a_kap2 = ws.a_kap2;
  T* __restrict a_x = ws.a_x;
  T* __restrict a_sin = ws.a_sin;
  T* __restrict a_z = ws.a_z;
  T* __restrict a_base = ws.a_base;
  if (ha > T(0) && cols_nonzero) {  // no zero-variance row: no selects for the pi/2 convention
#pragma omp simd
    for (index_t j = 0; j < TILE; ++j) {
      const index_t e = i * TILE + j;
      const T hh = ha * ir2[j], s2 = gm[e] * hh, k2 = gp[e] * hh;
      a_sig2[j] = s2;
      a_kap2[j] = k2;
      angle_reduce(s2, k2, a_z[j], a_base[j], a_sin[j]);
    }
  } else {
#pragma omp simd
    for (index_t j = 0; j < TILE; ++j) {
      const index_t e = i * TILE + j;
      T s2, k2;
      half_sines(gm[e], gp[e], ha * ir2[j], s2, k2);
      a_sig2[j] = s2;
      a_kap2[j] = k2;
      angle_reduce(s2, k2, a_z[j], a_base[j], a_sin[j]);
    }
  }
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j) a_x[j] = angle_finish(a_z[j], a_base[j]);
}

// Row i's pairs of layer l. Instantiated for M (the layer adds to Theta) true and false and without the bias
// adds when b_var = 0: no multiply by a run-time 1 and no add of a run-time 0 (x + 0 does not fold: -0).
template <bool M, bool Bias, class T, class Act>
ARCFLOW_STAGE void pair_row(const Act& act, const tile_scalars<T>& k, workspace<T>& ws, index_t i,
                            const layer_rows<T>& L1, const layer_rows<T>& L2, bool want_td) {
  T* __restrict s12 = ws.s12;
  T* __restrict gm = ws.gm;
  T* __restrict gp = ws.gp;
  T* __restrict ntk = ws.ntk;
  T* __restrict td = ws.td;
  const T* __restrict a_sig2 = ws.a_sig2;
  const T* __restrict a_kap2 = ws.a_kap2;
  const T* __restrict a_x = ws.a_x;
  const T* __restrict a_sin = ws.a_sin;
  const T bv = k.bv, w_sd = k.w_sd;
  const T ra = L1.r[i], ira = L1.ir[i], paa = L1.pa[i], pba = L1.pb[i], ta = L1.t[i], rna = L1.rn[i];
  const T qa = w_sd * ta;
  const T *r2 = L2.r, *ir2 = L2.ir, *pa2 = L2.pa, *pb2 = L2.pb, *t2 = L2.t, *rn2 = L2.rn;
#pragma omp simd
  for (index_t j = 0; j < TILE; ++j) {
    const index_t e = i * TILE + j;
    const T P = ra * r2[j];
    const T h = T(0.5) * ira * ir2[j];
    pair_out<T> o;
    if constexpr (Act::angle_based)
      o = act.pair_angle(angle_from(a_sig2[j], a_kap2[j], a_x[j], a_sin[j]), s12[e], P, h, paa, pba, ta, pa2[j], pb2[j],
                         t2[j]);
    else
      o = act.pair(s12[e], gm[e], gp[e], P, h, paa, pba, ta, pa2[j], pb2[j], t2[j]);
    const T bterm = Bias ? bias_gap(bv, qa, w_sd * t2[j], rna, rn2[j]) : T(0);
    const T s = next_sigma<Bias>(o.t, o.gm, o.gp, bv, bterm, gm[e], gp[e]);
    s12[e] = s;
    if (want_td) td[e] = o.tdot;
    ntk[e] = next_theta<M>(s, o.tdot, ntk[e]);
  }
}

template <class T, class Act, bool Bias>
ARCFLOW_STAGE void general_layers(const tile_ctx<T>& c, const Act& act, const tile_scalars<T>& k, const tile_at& t,
                                  workspace<T>& ws, bool slow) {
  const bool want_td = c.ntk_all != nullptr;
  for (int l = 0; l < c.p->depth; ++l) {
    const layer_rows<T> L1(*c.tab1, l, t.i0), L2(*c.tab2, l, t.j0);
    const bool M = (l + 2) > c.p->fix_dep;
    bool cols_nonzero = true;  // no zero-variance row among the tile's columns (padding columns count)
    for (index_t j = 0; j < TILE; ++j) cols_nonzero &= L2.ir[j] > T(0);
    for (index_t i = 0; i < t.ti; ++i) {
      if constexpr (Act::angle_based) row_angles(ws, i, T(0.5) * L1.ir[i], L2.ir, cols_nonzero);
      if (M)
        pair_row<true, Bias>(act, k, ws, i, L1, L2, want_td);
      else
        pair_row<false, Bias>(act, k, ws, i, L1, L2, want_td);
    }
    if (want_td) next_planes<T, Act>(c, t, ws, l, ws.s12, slow);
  }
}

// The tile kernel, inlined into one function per instruction-set level (run_tile_isa below): the Gram tile,
// the first layer, the layers while the tile is in cache, then one write of each requested output.
template <class T, class Act, bool Bias>
inline __attribute__((always_inline)) void run_tile(const tile_ctx<T>& c, const Act act, index_t i0, index_t ti,
                                                    index_t j0, index_t tj, workspace<T>& ws) {
  const tile_at t{i0, ti, j0, tj};
  const tile_scalars<T> k(*c.p);
  if (c.stream) {
    prefetch_tile_edges(c.nngp, c.n2, i0, ti, j0, tj, c.symmetric);
    prefetch_tile_edges(c.ntk, c.n2, i0, ti, j0, tj, c.symmetric);
  }
  gram_tile<T>(c.x1 + i0 * c.d, ti, c.d, c.panels2 + j0 * c.d, ws.g, c.fused);
  const T tau = sizeof(T) == 4 ? T(1e-2) : T(1e-3);
  if (first_layer<T, Bias>(c, k, t, ws, tau)) refine_gaps<T, Bias>(c, k, t, ws, tau);
  // Pairs with a row out of the tile kernel's range: carried in long double alongside (slow_pairs).
  const int n_all = ntk_planes(c);
  const bool slow = !(c.tab1->all_ok && c.tab2->all_ok) && slow_begin<T, Act>(c, act, i0, ti, j0, tj, n_all, ws.slow);
  if (n_all) first_planes(c, t, ws, slow);
  bool scaled = false;
  if constexpr (Act::angle_based && Act::scale_free && !Bias) scaled = scaled_layers(c, act, t, ws, slow);
  if (!scaled) general_layers<T, Act, Bias>(c, act, k, t, ws, slow);
  if (slow) {
    while (ws.slow.layer < c.p->depth) slow_step<T, Act>(c, n_all, ws.slow);
    slow_finish(c, ws.slow, ws.s12, ws.ntk);
  }
  if (c.nngp) store_tile(c.nngp, c.n2, i0, ti, j0, tj, c.symmetric, ws.s12, c.stream);
  if (c.ntk) store_tile(c.ntk, c.n2, i0, ti, j0, tj, c.symmetric, ws.ntk, c.stream);
  store_fence();
}
#undef ARCFLOW_STAGE

template <class T, class Act, bool Bias>
using tile_fn = void (*)(const tile_ctx<T>&, const Act, index_t, index_t, index_t, index_t, workspace<T>&);

template <class T, class Act, bool Bias>
void run_tile_generic(const tile_ctx<T>& c, const Act act, index_t i0, index_t ti, index_t j0, index_t tj,
                      workspace<T>& ws) {
  run_tile<T, Act, Bias>(c, act, i0, ti, j0, tj, ws);
}
#if ARCFLOW_FC_DISPATCH
template <class T, class Act, bool Bias>
ARCFLOW_TARGET_V3 void run_tile_avx2(const tile_ctx<T>& c, const Act act, index_t i0, index_t ti, index_t j0,
                                     index_t tj, workspace<T>& ws) {
  run_tile<T, Act, Bias>(c, act, i0, ti, j0, tj, ws);
}
template <class T, class Act, bool Bias>
ARCFLOW_TARGET_V4 void run_tile_avx512(const tile_ctx<T>& c, const Act act, index_t i0, index_t ti, index_t j0,
                                       index_t tj, workspace<T>& ws) {
  run_tile<T, Act, Bias>(c, act, i0, ti, j0, tj, ws);
}
#endif

template <class T, class Act, bool Bias>
tile_fn<T, Act, Bias> select_tile_fn(int isa) {
#if ARCFLOW_FC_DISPATCH
  if (isa == isa_avx512) return &run_tile_avx512<T, Act, Bias>;
  if (isa == isa_avx2) return &run_tile_avx2<T, Act, Bias>;
#endif
  (void)isa;
  return &run_tile_generic<T, Act, Bias>;
}

template <class T, class Act, bool Bias>
void run_rows(const tile_ctx<T>& c, const Act& act, index_t r0, index_t r1, int threads,
              const interrupt_fn& interrupt) {
  struct tile_id {
    index_t i0, j0;
  };
  std::vector<tile_id> tiles;
  for (index_t i0 = r0; i0 < r1; i0 += TILE)
    for (index_t j0 = c.symmetric ? i0 : 0; j0 < c.n2; j0 += TILE) tiles.push_back({i0, j0});
  const index_t nt = index_t(tiles.size());
  const int n_all = c.ntk_all ? c.p->depth + 1 : 0;
  // Never more threads than tiles (a huge request made libgomp abort or the threads' buffers exhaust memory),
  // and every thread's buffers allocated here, before the parallel region, where an exception can propagate.
  threads = int(std::max<index_t>(1, std::min<index_t>(threads, nt)));
#ifdef ARCFLOW_HAVE_OPENMP
  // and never more than 4 per core (at least 256), the limit the Python layer enforces
  threads = std::min(threads, std::max(256, 4 * omp_get_num_procs()));
#endif
  std::vector<std::unique_ptr<workspace<T>>> wss;
  try {
    wss.reserve(size_t(threads));
    for (int k = 0; k < threads; ++k) wss.push_back(std::make_unique<workspace<T>>(c.d, n_all));
  } catch (const std::bad_alloc&) {
    throw allocation_error("arcflow: out of memory allocating the tile buffers of " + std::to_string(threads) +
                           " threads (" + mib(double(threads) * workspace<T>::bytes(n_all)) + "); use fewer threads");
  }
  std::atomic<bool> stop{false};
  const tile_fn<T, Act, Bias> tile_kernel = select_tile_fn<T, Act, Bias>(active_isa());
#ifdef ARCFLOW_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef ARCFLOW_HAVE_OPENMP
    const int me = omp_get_thread_num();
#else
    const int me = 0;
#endif
    workspace<T>& ws = *wss[size_t(me)];
    ws.clear();
#ifdef ARCFLOW_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (index_t t = 0; t < nt; ++t) {
      // The calling thread (0) polls the interrupt between its tiles; a stop skips the remaining tiles.
      if (me == 0 && interrupt && !stop.load(std::memory_order_relaxed) && interrupt())
        stop.store(true, std::memory_order_relaxed);
      if (stop.load(std::memory_order_relaxed)) continue;
      const index_t i0 = tiles[t].i0, j0 = tiles[t].j0;
      tile_kernel(c, act, i0, std::min(TILE, r1 - i0), j0, std::min(TILE, c.n2 - j0), ws);
    }
  }
  if (stop.load()) throw interrupted();
}

template <class T, class Act>
void run_rows_dispatch(const tile_ctx<T>& c, const Act& act, index_t r0, index_t r1, int threads,
                       const interrupt_fn& interrupt) {
  if (c.p->b_var > 0)
    run_rows<T, Act, true>(c, act, r0, r1, threads, interrupt);
  else
    run_rows<T, Act, false>(c, act, r0, r1, threads, interrupt);
}

template <class T>
std::string overflow_message(const char* what, int layer, const fc_params& p) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "the %s overflows %s at layer %d of %d (depth=%d, w_std=%.6g, b_std=%.6g): the exact kernel is "
                "beyond the largest %s; scale the inputs or the weights down",
                what, sizeof(T) == 4 ? "float32" : "float64", std::max(1, layer), p.depth + 1, p.depth,
                std::sqrt(p.w_var), std::sqrt(p.b_var), sizeof(T) == 4 ? "float32" : "float64");
  return buf;
}

}  // namespace

template <class T>
fc_engine<T>::fc_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t d, bool symmetric, const fc_params& p,
                        const interrupt_fn& interrupt)
    : x1_(x1), x2_(x2), n1_(n1), n2_(n2), d_(d), symmetric_(symmetric), p_(p) {
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && d >= 0, "negative shape");
  ARCFLOW_CHECK(p.depth >= 0, "depth must be >= 0");
  ARCFLOW_CHECK(p.fix_dep >= 0 && p.fix_dep <= p.depth + 1, "fix_dep out of range");
  ARCFLOW_CHECK(p.w_var >= 0 && p.b_var >= 0 && p.gram_scale >= 0, "variances must be >= 0");
  ARCFLOW_CHECK(!symmetric || (x1 == x2 && n1 == n2), "symmetric needs x2 == x1");
  ARCFLOW_CHECK(p.act.kind != act_kind::monomial || p.act.n >= 0, "monomial order must be >= 0");
  if (!std::isfinite(p.w_var) || !std::isfinite(p.b_var) || !std::isfinite(p.gram_scale)) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "w_std**2 or b_std**2 overflows float64 (w_std**2 = %g, b_std**2 = %g)", p.w_var,
                  p.b_var);
    throw fp_overflow(buf);
  }
  by_activation<T, true>(p, [&](auto a) {
    using A = decltype(a);
    fill_table<T, A>(x1, n1, d, p, tab1_, "x1", interrupt);
    if (!symmetric) fill_table<T, A>(x2, n2, d, p, tab2_, "x2", interrupt);
  });
}

// The Gram micro-kernel reads x2 in panels, packed once per engine rather than once per tile.
template <class T>
const T* fc_engine<T>::panels2() const {
  std::call_once(packed_, [this] {
    const size_t n = size_t(round_up(std::max<index_t>(n2_, 1), TILE)) * size_t(std::max<index_t>(d_, 1));
    try {
      panels2_.assign(n, T(0));
    } catch (const std::bad_alloc&) {
      throw allocation_error("arcflow: out of memory allocating the packed copy of x2 (" + mib(double(n) * sizeof(T)) +
                             ")");
    }
    for (index_t j0 = 0; j0 < n2_; j0 += TILE)
      pack_panels(x2_ + j0 * d_, d_, std::min(TILE, n2_ - j0), panels2_.data() + j0 * d_);
  });
  return panels2_.data();
}

template <class T>
void fc_engine<T>::rows(index_t r0, index_t r1, T* nngp, T* ntk, T* ntk_all, int threads,
                        const interrupt_fn& interrupt) const {
  ARCFLOW_CHECK(0 <= r0 && r0 <= r1 && r1 <= n1_, "row range out of bounds");
  ARCFLOW_CHECK(!symmetric_ || r0 % tile == 0, "symmetric row blocks must start at a multiple of the tile");
  if (r0 == r1 || n2_ == 0) return;
  // Stream the outputs past the caches when one output matrix exceeds 8 MB (more than a core's L2 and a
  // good part of L3): below that the caller reads a warm result.
  const bool stream = double(n1_) * double(n2_) * double(sizeof(T)) > 8.0 * (1 << 20);
  // Symmetric: the diagonal is part of the output, so an overflow there is known before any work.
  if (symmetric_)
    for (index_t i = r0; i < r1; ++i) {
      if (nngp && !(tab1_.diag_s[i] <= double(std::numeric_limits<T>::max())))
        throw fp_overflow(overflow_message<T>("NNGP", tab1_.over_s[i], p_));
      if ((ntk || ntk_all) && !(tab1_.diag_t[i] <= double(std::numeric_limits<T>::max())))
        throw fp_overflow(overflow_message<T>("NTK", tab1_.over_t[i], p_));
    }
  std::atomic<int> over_nngp{0}, over_ntk{0};
  tile_ctx<T> c{x1_,        x2_,        panels2(), n1_,    n2_,
                d_,         symmetric_, &p_,       &tab1_, symmetric_ ? &tab1_ : &tab2_,
                nngp,       ntk,        ntk_all,   stream, fused_layout(),
                &over_nngp, &over_ntk};
  threads = std::max(1, threads);
  by_activation<T, true>(p_, [&](const auto& a) { run_rows_dispatch<T>(c, a, r0, r1, threads, interrupt); });
  if (over_nngp.load()) throw fp_overflow(overflow_message<T>("NNGP", over_nngp.load(), p_));
  if (over_ntk.load()) throw fp_overflow(overflow_message<T>("NTK", over_ntk.load(), p_));
}

template <class T>
void fc_engine<T>::diag(T* nngp, T* ntk, int threads, const interrupt_fn& interrupt) const {
  (void)threads;
  // O(n1) copies of the tables' diagonal (the tables, built with the interrupt polled, did the work).
  if (interrupt && interrupt()) throw interrupted();
  const double tmax = double(std::numeric_limits<T>::max());
  for (index_t i = 0; i < n1_; ++i) {
    if (nngp && !(tab1_.diag_s[i] <= tmax)) throw fp_overflow(overflow_message<T>("NNGP", tab1_.over_s[i], p_));
    if (ntk && !(tab1_.diag_t[i] <= tmax)) throw fp_overflow(overflow_message<T>("NTK", tab1_.over_t[i], p_));
  }
  // k(x, x) is the tables' diagonal recursion (scan_row, in double, or long double out of range): not the pair
  // recursion with y = x, whose gaps, 0 in exact arithmetic, pick up T's rounding (erf amplifies it).
  for (index_t i = 0; i < n1_; ++i) {
    if (nngp) nngp[i] = T(tab1_.diag_s[i]);
    if (ntk) ntk[i] = T(tab1_.diag_t[i]);
  }
}

template class fc_engine<float>;
template class fc_engine<double>;

namespace {
// Two arrays in turn, each the arccos of the other mapped back into [-1, 1] (the values stay spread over the
// whole range, so both branches of acos_poly are taken).
template <class T>
inline __attribute__((always_inline)) index_t acos_loop(T* __restrict a, T* __restrict b, index_t reps) {
  const T k = T(2) * fm::consts<T>::inv_pi;
  for (index_t r = 0; r < reps; r += 2) {
#pragma omp simd
    for (int j = 0; j < 1024; ++j) b[j] = k * fm::acos_poly(a[j]) - T(1);
#pragma omp simd
    for (int j = 0; j < 1024; ++j) a[j] = T(1) - k * fm::acos_poly(b[j]);
  }
  return reps * 1024;
}
template <class T>
index_t acos_loop_generic(T* __restrict a, T* __restrict b, index_t reps) {
  return acos_loop(a, b, reps);
}
#if ARCFLOW_FC_DISPATCH
template <class T>
ARCFLOW_TARGET_V3 index_t acos_loop_avx2(T* __restrict a, T* __restrict b, index_t reps) {
  return acos_loop(a, b, reps);
}
template <class T>
ARCFLOW_TARGET_V4 index_t acos_loop_avx512(T* __restrict a, T* __restrict b, index_t reps) {
  return acos_loop(a, b, reps);
}
#endif
template <class T>
auto select_acos_loop(int isa) {
#if ARCFLOW_FC_DISPATCH
  if (isa == isa_avx512) return &acos_loop_avx512<T>;
  if (isa == isa_avx2) return &acos_loop_avx2<T>;
#endif
  (void)isa;
  return &acos_loop_generic<T>;
}
}  // namespace

int set_fc_layout(int layout) {
  const int prev = fc_layout;
  fc_layout = layout < 0 ? -1 : (layout > 0 ? 1 : 0);
  return prev;
}

std::vector<std::string> fc_isa_levels() {
  std::vector<std::string> v;
  for (int l = 0; l <= cpu_isa(); ++l) v.emplace_back(isa_names[l]);
  return v;
}

std::string fc_isa() { return isa_names[active_isa()]; }
int fc_isa_level() { return active_isa(); }

void set_fc_isa(const std::string& name) {
  if (name == "auto") {
    fc_isa_forced.store(-1);
    return;
  }
  const int l = isa_by_name(name);
  if (l < 0)
    throw std::invalid_argument("arcflow: unknown instruction-set level '" + name +
                                "'; expected one of auto, generic, avx2, avx512");
  if (l > cpu_isa())
    throw std::invalid_argument("arcflow: this CPU cannot run the '" + name +
                                "' variant (best: " + isa_names[cpu_isa()] + ")");
  fc_isa_forced.store(l);
}

double acos_throughput(bool single_precision, double seconds) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> v(1024), w(1024);
    for (int j = 0; j < 1024; ++j) v[j] = T(-0.999 + 1.998 * j / 1023.0);
    const auto loop = select_acos_loop<T>(active_isa());
    index_t total = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double el = 0;
    while (el < seconds) {
      total += loop(v.data(), w.data(), 2000);
      el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return double(total) / el;
  };
  return single_precision ? run(float(0)) : run(double(0));
}

}  // namespace arcflow
