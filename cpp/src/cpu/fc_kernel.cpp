// CPU bodies of the fused NNGP/NTK recursion: tiles of 64 x 64 pairs, OpenMP over tiles.
#include "arcflow/fc_kernel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// Runtime dispatch to wider SIMD without -march: gcc emits one clone per target and picks at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ARCFLOW_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define ARCFLOW_CLONES
#endif

namespace arcflow {
namespace {

constexpr index_t TILE = fc_engine<double>::tile;

int fc_layout = -1;  // set_fc_layout

// Whether the layers run as one fused loop (see run_tile) and the Gram tile uses 64-byte vectors
// (gram_rows<T, R, 64>): by default where this CPU runs the x86-64-v4 (AVX-512) clones. Read once per tile.
bool fused_layout() {
  if (fc_layout >= 0) return fc_layout == 1;
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  // x86-64-v4's AVX-512 subsets, as the target_clones resolver checks them: the fused loop and the 64-byte
  // Gram run well only in that clone (forced into the AVX2 clone on this Xeon they were 6x slower).
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512cd");
  return avx512;
#else
  return false;
#endif
}

index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }

std::string mib(double bytes) { return std::to_string(static_cast<long long>(bytes / (1 << 20) + 0.5)) + " MiB"; }

// Per-row tables, computed in double whatever T is: O(n depth) memory and time, which at a large depth is
// seconds, so the caller's interrupt is polled every 64 rows.
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
  } catch (const std::bad_alloc&) {
    throw allocation_error(std::string("arcflow: out of memory allocating the per-row tables of ") + name + " (" +
                           std::to_string(n) + " rows x " + std::to_string(tab.layers) + " layers x 5 values: " +
                           mib(double(np) * (5.0 * tab.layers + 2) * sizeof(T)) + ")");
  }
  for (index_t i = 0; i < n; ++i) {
    if ((i & 63) == 0 && interrupt && interrupt()) throw interrupted();
    double nx2 = 0.0;
    const T* xi = x + i * d;
    for (index_t k = 0; k < d; ++k) nx2 += double(xi[k]) * double(xi[k]);
    fill_row_table<T, Act>(nx2, p, tab.layers, np, i, tab.data.data(), tab.norm.data(), tab.inv_norm.data());
  }
}

// One thread's tile buffers, each aligned to 64 bytes: the loops load and store whole vectors of the tile,
// and a vector that straddles two cache lines costs two accesses (std::vector's 16-byte alignment did that to
// every AVX-512 access and to half the AVX2 ones).
template <class T>
struct workspace {
  struct free_deleter {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], free_deleter> buf;
  size_t size = 0;
  T *g, *s12, *gm, *gp, *ntk, *td, *h, *angle;
  static size_t count(int n_all) {
    const size_t t2 = size_t(TILE) * TILE;  // a multiple of 64 bytes, as is 6 TILE values
    return t2 * (6 + size_t(n_all)) + 6 * size_t(TILE);
  }
  static double bytes(int n_all) { return double(count(n_all)) * sizeof(T); }
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
    angle = td + t2;
    h = angle + 6 * TILE;
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
};

// The Gram tile's x2 side is packed in panels of panel_width() columns (one cache line of values), each
// panel d x panel_width() contiguous, so the micro-kernel below streams through memory: with a plain k-major
// d x TILE layout its loads strode by 512 bytes, all into a few L1 sets.
template <class T>
constexpr int panel_width() { return 64 / int(sizeof(T)); }

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
// row and the same row of two panels; gram_rows<.., 32> left half of each AVX-512 FMA unused (depth 0,
// float64, 1 thread: 4.0 -> 2.75 ns per pair). Either way each element sums the same products in the same
// order, so the bits are the same.
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
inline __attribute__((always_inline)) void gram_tile(const T* a, index_t ti, index_t d, const T* bt, T* g) {
  index_t i = 0;
  if (fused_layout()) {  // AVX-512
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
// read-for-ownership of every output line and keeps the tile's working set in cache (measured, quiet VM,
// 2 threads: kernel_value_batch(X, 5) at N = 3000 0.29-0.31 -> 0.23-0.27 s, symmetric kernels at N = 6000
// 0.41-0.45 -> 0.33-0.41 s). Small outputs keep plain stores, so the caller finds them in cache.
// The caller fences (store_fence).
template <class T>
inline void stream_row(T* dst, const T* src, index_t n, bool stream) {
  index_t j = 0;
#if defined(__SSE2__)
  if (stream) {
    // Non-temporal stores only on whole cache lines: the line the row starts in and the line it ends in are
    // shared with the neighbouring tiles, so they take plain stores. A partly written line in a
    // write-combining buffer goes out as a partial write, which cost the Intel Xeon VM 3.5-4 ns per pair
    // at depth 0 (9.0 instead of 5.5 ns, 1 thread, 2048 x 2048 float64): np.empty puts large arrays 16
    // bytes past a page boundary, so with 16-byte alignment alone every row segment began mid-line.
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
inline void store_tile(T* out, index_t n2, index_t i0, index_t ti, index_t j0, index_t tj, bool symmetric,
                       const T* src, bool stream) {
  const bool diag_tile = symmetric && i0 == j0;
  for (index_t i = 0; i < ti; ++i) {
    const index_t jb = diag_tile ? i : 0;
    stream_row(out + (i0 + i) * n2 + j0 + jb, src + i * TILE + jb, tj - jb, stream);
  }
  if (symmetric) {
    // The mirror, in strips of one cache line of columns: transpose the strip into a small buffer (each
    // line of the tile read once), then write its rows. Gathering each column straight from the tile read
    // 64 lines 512 bytes apart per column, which thrashed L1 and made the mirror cost twice the direct half.
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

// |u + sgn v|^2 for the unit vectors u = x a_inv, v = y b_inv, in double. |x||y| -/+ <x,y> equals
// |x||y| |u -/+ v|^2 / 2 without the cancellation of the Gram route. Kept out of line and out of the
// target_clones kernels on purpose: no FMA contraction, so a duplicate row gives exactly 0.
template <class T>
__attribute__((noinline)) double unit_dist2(const T* x, const T* y, index_t d, T a_inv, T b_inv, double sgn) {
  const double ia = double(a_inv), ib = double(b_inv);
  double acc = 0.0;
  for (index_t k = 0; k < d; ++k) {
    volatile double pa = double(x[k]) * ia;  // volatile: the two products are rounded alike
    volatile double pb = double(y[k]) * ib;
    const double u = pa + sgn * pb;
    acc += u * u;
  }
  return acc;
}

template <class T, class Act, bool Bias>
ARCFLOW_CLONES void run_tile(const tile_ctx<T>& c, const Act act, index_t i0, index_t ti, index_t j0, index_t tj,
                             workspace<T>& ws) {
  const fc_params& p = *c.p;
  const index_t d = c.d;
  const int depth = p.depth;
  const T bv = T(p.b_var), gs = T(p.gram_scale);  // act carries w_var (activations.hpp)
  const T sq_gs = T(std::sqrt(p.gram_scale));
  const T w_sd = T(std::sqrt(p.w_var));
  const int fix = p.fix_dep;
  T* __restrict g = ws.g;
  T* __restrict s12 = ws.s12;
  T* __restrict gm = ws.gm;
  T* __restrict gp = ws.gp;
  T* __restrict ntk = ws.ntk;
  T* __restrict td = ws.td;
  T* __restrict a_sig2 = ws.angle;
  T* __restrict a_kap2 = a_sig2 + TILE;
  T* __restrict a_x = a_sig2 + 2 * TILE;
  T* __restrict a_sin = a_sig2 + 3 * TILE;
  T* __restrict a_z = a_sig2 + 4 * TILE;
  T* __restrict a_base = a_sig2 + 5 * TILE;

  if (c.stream) {
    prefetch_tile_edges(c.nngp, c.n2, i0, ti, j0, tj, c.symmetric);
    prefetch_tile_edges(c.ntk, c.n2, i0, ti, j0, tj, c.symmetric);
  }

  // 1. Gram tile.
  gram_tile<T>(c.x1 + i0 * d, ti, d, c.panels2 + j0 * d, g);

  // 2. First layer: s12 = gs G + b, gaps |x||y| -/+ G, refined where they cancel. One pass over the tile
  // (the gaps scaled and clamped as they are made); the rare pairs whose raw gap falls below tau |x||y| are
  // redone afterwards from the refined gap, with the same expressions, so the bits are those of two passes.
  const T* nrm1 = c.tab1->norm.data() + i0;
  const T* nrm2 = c.tab2->norm.data() + j0;
  const T* r1_0 = c.tab1->field(0, 0) + i0;
  const T* r2_0 = c.tab2->field(0, 0) + j0;
  const T tau = sizeof(T) == 4 ? T(1e-2) : T(1e-3);
  const T mask0 = 1 > fix ? T(1) : T(0);
  // The bias's share of the first gaps: b (q1 - q2)^2 / (r1 r2 + q1 q2 + b), q = sqrt(gs) |x|.
  auto bias_gap = [=](T q1, T q2, T ra, T rb) __attribute__((always_inline)) {
    const T dq = q1 - q2;
    return bv * dq * dq / (ra * rb + q1 * q2 + bv);
  };
  int near = 0;
  for (index_t i = 0; i < ti; ++i) {
    const T n1 = nrm1[i], q1 = sq_gs * n1, ra = r1_0[i];
#pragma omp simd reduction(| : near)
    for (index_t j = 0; j < TILE; ++j) {
      const index_t e = i * TILE + j;
      const T nn = n1 * nrm2[j];
      const T gme = nn - g[e], gpe = nn + g[e];
      near |= int(gme < tau * nn) | int(gpe < tau * nn);
      const T bterm = Bias ? bias_gap(q1, sq_gs * nrm2[j], ra, r2_0[j]) : T(0);
      const T s = gs * g[e] + bv;
      s12[e] = s;
      // The gaps are >= 0 in exact arithmetic; clamp once here so that make_angle need not.
      const T m = bterm + gs * gme, pl = bterm + T(2) * bv + gs * gpe;
      gm[e] = m > T(0) ? m : T(0);
      gp[e] = pl > T(0) ? pl : T(0);
      ntk[e] = mask0 * s;
    }
  }
  if (near) {
    const T* inv1 = c.tab1->inv_norm.data() + i0;
    const T* inv2 = c.tab2->inv_norm.data() + j0;
    for (index_t i = 0; i < ti; ++i) {
      for (index_t j = 0; j < tj; ++j) {
        const index_t e = i * TILE + j;
        const T nn = nrm1[i] * nrm2[j];
        const T gme = nn - g[e], gpe = nn + g[e];
        const bool near_m = gme < tau * nn, near_p = gpe < tau * nn;
        if (!(nn > T(0)) || !(near_m || near_p)) continue;
        const T v = T(double(nn) * 0.5 *
                      unit_dist2(c.x1 + (i0 + i) * d, c.x2 + (j0 + j) * d, d, inv1[i], inv2[j], near_m ? -1.0 : 1.0));
        const T bterm = Bias ? bias_gap(sq_gs * nrm1[i], sq_gs * nrm2[j], r1_0[i], r2_0[j]) : T(0);
        if (near_m) {
          const T m = bterm + gs * v;
          gm[e] = m > T(0) ? m : T(0);
        } else {
          const T pl = bterm + T(2) * bv + gs * v;
          gp[e] = pl > T(0) ? pl : T(0);
        }
      }
    }
  }
  const int n_all = c.ntk_all ? depth + 1 : 0;
  const index_t plane = c.n1 * c.n2;
  auto store_all = [&](int layer) {
    // ntk_all[layer][k] for k <= layer; H_k lives in ws.h.
    for (int k = 0; k <= layer; ++k)
      store_tile(c.ntk_all + (index_t(layer) * n_all + k) * plane, c.n2, i0, ti, j0, tj, c.symmetric,
                 ws.h + size_t(k) * TILE * TILE, c.stream);
  };
  // H_k = [layer + 2 > k] Sigma + Tdot H_k for k <= layer + 1: kernel_value_batch's NTK with every fix_dep.
  auto update_all = [&](int l, const T* __restrict sig) {
    for (int k = 0; k <= l + 1; ++k) {
      T* hk = ws.h + size_t(k) * TILE * TILE;
      const T mk = (l + 2) > k ? T(1) : T(0);
#pragma omp simd
      for (index_t e = 0; e < TILE * TILE; ++e) hk[e] = mk * sig[e] + td[e] * hk[e];
    }
  };
  if (n_all) {
    T* h0 = ws.h;
    for (index_t e = 0; e < TILE * TILE; ++e) h0[e] = s12[e];
    for (int k = 1; k < n_all; ++k) std::fill_n(ws.h + size_t(k) * TILE * TILE, TILE * TILE, T(0));
    store_all(0);
  }

  // 3. Layers: Sigma^(l+1) -> Sigma^(l+2) and Theta alongside.
  // 3a. Scale-free activations without a bias (ReLU and its relatives, b_var = 0): the layers in units of P
  // (abrelu_act::pair_scaled). gm and gp carry sig2 and kap2, s12 the correlation and ntk Theta / P; after the
  // last layer one multiply by P = r1 r2 of that layer (kernel_value_batch's H_k: once per layer). Tiles with
  // a zero row (P = 0: the pi/2 convention) take the general loop below. Padding columns (j >= tj)
  // have ir2 = 0: half_sines gives them the convention's finite values, never stored.
  bool scaled = false;
  if constexpr (Act::angle_based && Act::scale_free && !Bias) {
    const T* ir1_0 = c.tab1->field(0, 1) + i0;
    const T* ir2_0 = c.tab2->field(0, 1) + j0;
    scaled = depth > 0 && act.k2 > T(0);
    for (index_t i = 0; i < ti; ++i) scaled &= ir1_0[i] > T(0);
    for (index_t j = 0; j < tj; ++j) scaled &= ir2_0[j] > T(0);
    if (scaled) {
      const bool fused = fused_layout();
      for (int l = 0; l < depth; ++l) {
        const bool M = (l + 2) > fix;
        for (index_t i = 0; i < ti; ++i) {
          const T ha = T(0.5) * ir1_0[i];
          // Layer 0 turns the first layer's gaps and Theta into units of P.
          auto to_units = [&](index_t j) __attribute__((always_inline)) {
            const index_t e = i * TILE + j;
            const T hh = ha * ir2_0[j];
            T s2, k2;
            half_sines(gm[e], gp[e], hh, s2, k2);
            gm[e] = s2;
            gp[e] = k2;
            ntk[e] = ntk[e] * (T(2) * hh);  // Theta / P
          };
          auto pair = [&](index_t j, const angle<T>& g, auto masked) __attribute__((always_inline)) {
            const index_t e = i * TILE + j;
            const pair_out<T> o = act.pair_scaled(g);
            gm[e] = o.gm;
            gp[e] = o.gp;
            s12[e] = o.t;
            if (n_all) td[e] = o.tdot;
            ntk[e] = decltype(masked)::value ? o.t + o.tdot * ntk[e] : o.tdot * ntk[e];
          };
          if (fused) {
            // AVX-512: the whole layer in one loop, the angle without a division (angle_direct).
            auto loop = [&](auto masked, auto first) __attribute__((always_inline)) {
#pragma omp simd
              for (index_t j = 0; j < TILE; ++j) {
                if constexpr (decltype(first)::value) to_units(j);
                pair(j, angle_direct(gm[i * TILE + j], gp[i * TILE + j]), masked);
              }
            };
            if (l == 0)
              M ? loop(std::true_type{}, std::true_type{}) : loop(std::false_type{}, std::true_type{});
            else
              M ? loop(std::true_type{}, std::false_type{}) : loop(std::false_type{}, std::false_type{});
            continue;
          }
          // Otherwise three loops, as in the general path below (the square root and division, the arctangent,
          // the pair formulas).
#pragma omp simd
          for (index_t j = 0; j < TILE; ++j) {
            if (l == 0) to_units(j);
            angle_reduce(gm[i * TILE + j], gp[i * TILE + j], a_z[j], a_base[j], a_sin[j]);
          }
#pragma omp simd
          for (index_t j = 0; j < TILE; ++j) a_x[j] = angle_finish(a_z[j], a_base[j]);
          auto loop = [&](auto masked) __attribute__((always_inline)) {
#pragma omp simd
            for (index_t j = 0; j < TILE; ++j)
              pair(j, angle_from(gm[i * TILE + j], gp[i * TILE + j], a_x[j], a_sin[j]), masked);
          };
          M ? loop(std::true_type{}) : loop(std::false_type{});
        }
        if (n_all) {
          // kernel_value_batch's H_k stay in absolute units: Sigma = P rho into the Gram tile's buffer (no
          // longer needed), Tdot = k2 (Tdot / k2). One pass per layer, not one per stored plane.
          const T* ra = c.tab1->field(l + 1, 0) + i0;
          const T* rb = c.tab2->field(l + 1, 0) + j0;
          for (index_t i = 0; i < ti; ++i) {
#pragma omp simd
            for (index_t j = 0; j < TILE; ++j) {
              const index_t e = i * TILE + j;
              g[e] = (ra[i] * rb[j]) * s12[e];
              td[e] = act.k2 * td[e];
            }
          }
          update_all(l, g);
          store_all(l + 1);
        }
      }
      const T* rl1 = c.tab1->field(depth, 0) + i0;
      const T* rl2 = c.tab2->field(depth, 0) + j0;
      for (index_t i = 0; i < ti; ++i) {
        const T ra = rl1[i];
#pragma omp simd
        for (index_t j = 0; j < TILE; ++j) {
          const index_t e = i * TILE + j;
          const T P = ra * rl2[j];
          s12[e] = P * s12[e];
          ntk[e] = P * ntk[e];
        }
      }
    }
  }
  for (int l = 0; l < (scaled ? 0 : depth); ++l) {
    const T* r1 = c.tab1->field(l, 0) + i0;
    const T* ir1 = c.tab1->field(l, 1) + i0;
    const T* pa1 = c.tab1->field(l, 2) + i0;
    const T* pb1 = c.tab1->field(l, 3) + i0;
    const T* t1 = c.tab1->field(l, 4) + i0;
    const T* rn1 = c.tab1->field(l + 1, 0) + i0;
    const T* r2 = c.tab2->field(l, 0) + j0;
    const T* ir2 = c.tab2->field(l, 1) + j0;
    const T* pa2 = c.tab2->field(l, 2) + j0;
    const T* pb2 = c.tab2->field(l, 3) + j0;
    const T* t2 = c.tab2->field(l, 4) + j0;
    const T* rn2 = c.tab2->field(l + 1, 0) + j0;
    const T mask = (l + 2) > fix ? T(1) : T(0);
    bool cols_nonzero = true;  // no zero-variance row among the tile's columns (padding columns count)
    for (index_t j = 0; j < TILE; ++j) cols_nonzero &= ir2[j] > T(0);
    for (index_t i = 0; i < ti; ++i) {
      const T ra = r1[i], ira = ir1[i], paa = pa1[i], pba = pb1[i], ta = t1[i], rna = rn1[i];
      const T qa = w_sd * ta;
      if constexpr (Act::angle_based) {
        // The angle in loops of their own: its dependency chain (square root, division, polynomial) is
        // long, and in one loop with the rest the out-of-order window held too few pairs to hide it.
        // Measured (1 thread, process time, 2048 x 2048, ReLU): one angle loop in front of the pair loop
        // 5.83 -> 5.06 ns per pair-layer; the angle split again in two (angle_reduce, angle_finish)
        // 4.26 -> 3.93 ns in float64, 1.98 -> 1.67 ns in float32. Tried and slower: the three stages
        // software-pipelined across rows in one loop (reduce row i+2, finish row i+1, pair row i; 3.45 ->
        // 4.4 ns), and the float64 division replaced by Newton steps (3.56 -> 4.27 ns): the FP pipes, not
        // the divider, bound these loops. Per stage on one tile (float64, 1 thread): the square root and
        // division loop 1.28-1.44 ns per pair (the divider alone: 13.5 cycles per 4 pairs), the arctangent
        // 0.85-0.95, the pair loop 1.2-1.5. Also tried and slower: reduce(i+1) with finish(i) in one loop
        // (3.10 -> 3.28), finish with the pair loop (-> 3.63), reduce(i+1) with pair(i) (-> 3.51), an Estrin
        // arctangent (finish 0.85 -> 1.05); no gain: q = h sqrt(gm gp), off the sqrt's dependency chain, and
        // (float) the square root and the division in two loops (one tile: 0.54 -> 0.48 ns; here 1.28 -> 1.27
        // ns per pair-layer, 16 alternating runs).
        // Here, unlike the scaled loop above, the fused layout with angle_direct was not faster on AVX-512
        // (1 thread, N = 4000, depth 5, Intel Xeon VM: float64 ReLU with b_std = 0.1 0.285-0.318 s fused vs
        // 0.275-0.287 s in three loops, RectifiedMonomial(2) 0.33-0.34 vs 0.29-0.30): the pair formulas with
        // the bias (a division of their own) make the fused chain too long for the out-of-order window.
        const T ha = T(0.5) * ira;
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
      // The pair loop twice over, for mask = 1 and mask = 0, and without the bias adds when b_var = 0:
      // no multiply by a run-time 1 and no add of a run-time 0 (x + 0 does not fold: -0), the same bits.
      auto pair_loop = [&](auto masked) __attribute__((always_inline)) {
        constexpr bool M = decltype(masked)::value;
#pragma omp simd
        for (index_t j = 0; j < TILE; ++j) {
          const index_t e = i * TILE + j;
          const T P = ra * r2[j];
          const T h = T(0.5) * ira * ir2[j];
          pair_out<T> o;
          if constexpr (Act::angle_based)
            o = act.pair_angle(angle_from(a_sig2[j], a_kap2[j], a_x[j], a_sin[j]), s12[e], P, h, paa, pba, ta,
                               pa2[j], pb2[j], t2[j]);
          else
            o = act.pair(s12[e], gm[e], gp[e], P, h, paa, pba, ta, pa2[j], pb2[j], t2[j]);
          T s;
          if constexpr (Bias) {
            const T qb = w_sd * t2[j];
            const T dq = qa - qb;
            const T bterm = bv * dq * dq / (rna * rn2[j] + qa * qb + bv);
            s = o.t + bv;
            gm[e] = bterm + o.gm;
            gp[e] = bterm + T(2) * bv + o.gp;
          } else {
            s = o.t;
            gm[e] = o.gm;
            gp[e] = o.gp;
          }
          s12[e] = s;
          const T tdot = o.tdot;
          if (n_all) td[e] = tdot;
          ntk[e] = M ? s + tdot * ntk[e] : tdot * ntk[e];
        }
      };
      if (mask != T(0))
        pair_loop(std::true_type{});
      else
        pair_loop(std::false_type{});
    }
    if (n_all) {
      update_all(l, s12);
      store_all(l + 1);
    }
  }

  // 4. One write of each requested output.
  if (c.nngp) store_tile(c.nngp, c.n2, i0, ti, j0, tj, c.symmetric, s12, c.stream);
  if (c.ntk) store_tile(c.ntk, c.n2, i0, ti, j0, tj, c.symmetric, ntk, c.stream);
  store_fence();
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
                           " threads (" + mib(double(threads) * workspace<T>::bytes(n_all)) +
                           "); use fewer threads");
  }
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
      run_tile<T, Act, Bias>(c, act, i0, std::min(TILE, r1 - i0), j0, std::min(TILE, c.n2 - j0), ws);
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

template <class T, class Act>
void diag_act(const Act& act, index_t i0, index_t i1, const fc_params& p, const typename fc_engine<T>::row_table& tab,
              T* nngp, T* ntk) {
  const T bv = T(p.b_var);  // act carries w_var
  for (index_t i = i0; i < i1; ++i) {
    T s = tab.field(0, 0)[i] * tab.field(0, 0)[i];
    T gm = T(0), gp = T(2) * s;
    T th = p.fix_dep < 1 ? s : T(0);
    for (int l = 0; l < p.depth; ++l) {
      const T r = tab.field(l, 0)[i], ir = tab.field(l, 1)[i], pa = tab.field(l, 2)[i], pb = tab.field(l, 3)[i],
              t = tab.field(l, 4)[i];
      const pair_out<T> o = act.pair(s, gm, gp, r * r, T(0.5) * ir * ir, pa, pb, t, pa, pb, t);
      s = o.t + bv;
      gm = o.gm;
      gp = T(2) * bv + o.gp;
      th = ((l + 2) > p.fix_dep ? s : T(0)) + o.tdot * th;
    }
    if (nngp) nngp[i] = s;
    if (ntk) ntk[i] = th;
  }
}

// Calls f with the activation object (outputs scaled by w_var) whose type specialises the kernels
// (monomials of order <= 4 get a compile-time order so their loops vectorise).
template <class T, class F>
void by_activation(const fc_params& fp, F&& f) {
  const act_params& p = fp.act;
  const double w = fp.w_var;
  switch (p.kind) {
    case act_kind::abrelu:
      if (p.a * p.b == 0.0)
        f(abrelu_act<T, true>(p, w));
      else
        f(abrelu_act<T>(p, w));
      break;
    case act_kind::monomial:
      switch (p.n) {
        case 0: f(monomial_act<T, 0>(p, w)); break;
        case 1: f(monomial_act<T, 1>(p, w)); break;
        case 2: f(monomial_act<T, 2>(p, w)); break;
        case 3: f(monomial_act<T, 3>(p, w)); break;
        case 4: f(monomial_act<T, 4>(p, w)); break;
        default: f(monomial_act<T>(p, w)); break;
      }
      break;
    case act_kind::sign: f(sign_act<T>(p, w)); break;
    case act_kind::erf: f(erf_act<T>(p, w)); break;
    default: throw std::invalid_argument("arcflow: unknown activation kind");
  }
}

}  // namespace

template <class T>
fc_engine<T>::fc_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t d, bool symmetric,
                        const fc_params& p, const interrupt_fn& interrupt)
    : x1_(x1), x2_(x2), n1_(n1), n2_(n2), d_(d), symmetric_(symmetric), p_(p) {
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && d >= 0, "negative shape");
  ARCFLOW_CHECK(p.depth >= 0, "depth must be >= 0");
  ARCFLOW_CHECK(p.fix_dep >= 0 && p.fix_dep <= p.depth + 1, "fix_dep out of range");
  ARCFLOW_CHECK(p.w_var >= 0 && p.b_var >= 0 && p.gram_scale >= 0, "variances must be >= 0");
  ARCFLOW_CHECK(!symmetric || (x1 == x2 && n1 == n2), "symmetric needs x2 == x1");
  ARCFLOW_CHECK(p.act.kind != act_kind::monomial || p.act.n >= 0, "monomial order must be >= 0");
  by_activation<T>(p, [&](auto a) {
    using A = decltype(a);
    fill_table<T, A>(x1, n1, d, p, tab1_, "x1", interrupt);
    if (!symmetric) fill_table<T, A>(x2, n2, d, p, tab2_, "x2", interrupt);
  });
}

// The Gram micro-kernel reads x2 in panels; packing it once per engine, not per tile, saved the 2.4% of the
// kernel's time that the per-tile packing took (perf, N = 4000, depth 5, 1 thread).
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
  tile_ctx<T> c{x1_,  x2_,   panels2(), n1_, n2_, d_, symmetric_, &p_, &tab1_, symmetric_ ? &tab1_ : &tab2_,
                nngp, ntk, ntk_all,         stream};
  threads = std::max(1, threads);
  by_activation<T>(p_, [&](const auto& a) { run_rows_dispatch<T>(c, a, r0, r1, threads, interrupt); });
}

template <class T>
void fc_engine<T>::diag(T* nngp, T* ntk, int threads, const interrupt_fn& interrupt) const {
  (void)threads;
  // In blocks of rows, polling the interrupt between them (O(n1 depth) work: seconds for large inputs).
  const index_t block = std::max<index_t>(64, index_t(1 << 20) / (index_t(p_.depth) + 1));
  for (index_t i0 = 0; i0 < n1_; i0 += block) {
    if (interrupt && interrupt()) throw interrupted();
    const index_t i1 = std::min(n1_, i0 + block);
    by_activation<T>(p_, [&](const auto& a) { diag_act<T>(a, i0, i1, p_, tab1_, nngp, ntk); });
  }
}

template class fc_engine<float>;
template class fc_engine<double>;

namespace {
// Two arrays in turn, each the arccos of the other mapped back into [-1, 1] (the values stay spread over the
// whole range, so both branches of acos_poly are taken).
template <class T>
ARCFLOW_CLONES index_t acos_loop(T* __restrict a, T* __restrict b, index_t reps) {
  const T k = T(2) * fm::consts<T>::inv_pi;
  for (index_t r = 0; r < reps; r += 2) {
#pragma omp simd
    for (int j = 0; j < 1024; ++j) b[j] = k * fm::acos_poly(a[j]) - T(1);
#pragma omp simd
    for (int j = 0; j < 1024; ++j) a[j] = T(1) - k * fm::acos_poly(b[j]);
  }
  return reps * 1024;
}
}  // namespace

int set_fc_layout(int layout) {
  const int prev = fc_layout;
  fc_layout = layout < 0 ? -1 : (layout > 0 ? 1 : 0);
  return prev;
}

double acos_throughput(bool single_precision, double seconds) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> v(1024), w(1024);
    for (int j = 0; j < 1024; ++j) v[j] = T(-0.999 + 1.998 * j / 1023.0);
    index_t total = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double el = 0;
    while (el < seconds) {
      total += acos_loop<T>(v.data(), w.data(), 2000);
      el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return double(total) / el;
  };
  return single_precision ? run(float(0)) : run(double(0));
}

}  // namespace arcflow
