// The fused NNGP/NTK tile kernel (device code): Gram tile in shared memory, every layer in registers,
// one write of each output.
#pragma once
// Contract: included by fc_kernel.cu (and by a host emulation in tests that maps the CUDA built-ins to
// plain C++, so the indexing can be checked without a GPU). One block of 256 threads computes a BM x BN
// tile of pairs (128 x 128 in float, 64 x 64 in double): rows i0 .. i0+BM of x1 against rows j0 .. j0+BN
// of x2. In the symmetric case (x2 == x1) blocks below the diagonal return at once, the others also write
// the mirrored tile (through shared memory, so that the writes stay coalesced) and a diagonal tile writes
// its upper triangle directly and its strict lower triangle from the mirror: both halves hold identical
// bits, as in the CPU engine.
//
// Per pair the recursion is the CPU engine's, from the same header (fc_recursion.hpp): the activation's
// pair() of activations.hpp carries s12 and the gaps gm = P - s12, gp = P + s12 through the layers, and
// first-layer pairs whose gap cancels (|x||y| -/+ <x,y> < tau |x||y|) are recomputed in double from the
// unit vectors (unit_dist2), with the products rounded as on the CPU (no FMA contraction).
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"
#include "arcflow/fc_kernel.hpp"
#include "arcflow/fc_recursion.hpp"

namespace arcflow::cuda_detail {

template <class T>
struct tile_cfg;
// Per-thread micro-tile TM x TN of the 16 x 16 thread grid.
template <>
struct tile_cfg<float> {
  static constexpr int TM = 8, TN = 8;
};
template <>
struct tile_cfg<double> {
  static constexpr int TM = 4, TN = 4;
};

constexpr int TX = 16, TY = 16, NTHREADS = TX * TY;
constexpr int BK = 8;        // depth of one shared-memory slice of the Gram product
constexpr int PAD = 4;       // keeps the transposed stores of a slice free of bank conflicts, 16-byte aligned rows
constexpr int RG = 2;        // a thread's rows come in pairs: rows (m / RG) * TY * RG + ty * RG + m % RG
constexpr int GR = TY * RG;  // rows of one group: the mirror is staged a group (32 rows) at a time
constexpr index_t TABLE_PAD = 128;  // tables are padded to a multiple of the largest tile

// Tuning knob (compile with -DARCFLOW_CUDA_MIN_BLOCKS=2 to try): blocks per multiprocessor that ptxas must
// fit. 1 lets the float kernel keep all its registers; 2 caps them at 128 at the cost of a few spills.
#ifndef ARCFLOW_CUDA_MIN_BLOCKS
#define ARCFLOW_CUDA_MIN_BLOCKS 1
#endif

template <class T>
struct tile_args {
  const T* x1;
  const T* x2;  // == x1 when symmetric
  index_t n1, n2, d;
  // Per-row tables, [layers * 5 + 2][np]: per layer l the fields r, ir, pa, pb, t (activations.hpp), then
  // |x| and 1/|x|. np is a multiple of TABLE_PAD, rows past n hold the values of a zero row.
  const T* tab1;
  const T* tab2;
  index_t np1, np2;
  T* nngp;  // n1 x n2 or nullptr
  T* ntk;   // n1 x n2 or nullptr
  int depth, fix_dep;
  int symmetric;
  T bv, gs, sq_gs, w_sd;  // w_var itself is folded into the activation (activations.hpp)
};

// unit_dist2 out of line: it runs only for the rare near-collinear pairs, and inlined it would cost the
// tile kernel registers.
template <class T>
__device__ __noinline__ double unit_dist2_dev(const T* x, const T* y, index_t d, double sgn) {
  return unit_dist2(x, y, d, sgn);
}

template <class T, class Act>
__global__ void __launch_bounds__(NTHREADS, ARCFLOW_CUDA_MIN_BLOCKS)
    fc_tile_kernel(const tile_args<T> g, const Act act) {
  constexpr int TM = tile_cfg<T>::TM, TN = tile_cfg<T>::TN;
  constexpr int BM = TY * TM, BN = TX * TN;
  constexpr int A_PER = BM * BK / NTHREADS, B_PER = BN * BK / NTHREADS;
  static_assert(TM % RG == 0 && A_PER * NTHREADS == BM * BK && B_PER * NTHREADS == BN * BK, "tile shape");

  const index_t bi = blockIdx.y, bj = blockIdx.x;
  if (g.symmetric && bj < bi) return;  // the whole block: before any barrier
  const index_t i0 = bi * BM, j0 = bj * BN;
  const int tid = int(threadIdx.x), tx = tid % TX, ty = tid / TX;
  const index_t n1 = g.n1, n2 = g.n2, d = g.d;

  __shared__ __align__(16) T As[BK][BM + PAD];
  __shared__ __align__(16) T Bs[BK][BN + PAD];

  // 1. Gram tile: acc[m][n] = <x1[row(m)], x2[col(n)]>, slices of BK columns staged through shared memory,
  //    the next slice's global loads in flight while the current one is multiplied.
  T acc[TM][TN];
#pragma unroll
  for (int m = 0; m < TM; ++m)
#pragma unroll
    for (int n = 0; n < TN; ++n) acc[m][n] = T(0);
  T ra[A_PER], rb[B_PER];
  auto load = [&](index_t k0) {
#pragma unroll
    for (int u = 0; u < A_PER; ++u) {
      const int e = tid + u * NTHREADS, r = e / BK, kk = e % BK;
      const index_t gi = i0 + r, gk = k0 + kk;
      ra[u] = (gi < n1 && gk < d) ? g.x1[gi * d + gk] : T(0);
    }
#pragma unroll
    for (int u = 0; u < B_PER; ++u) {
      const int e = tid + u * NTHREADS, r = e / BK, kk = e % BK;
      const index_t gj = j0 + r, gk = k0 + kk;
      rb[u] = (gj < n2 && gk < d) ? g.x2[gj * d + gk] : T(0);
    }
  };
  load(0);
  for (index_t k0 = 0; k0 < d; k0 += BK) {
#pragma unroll
    for (int u = 0; u < A_PER; ++u) {
      const int e = tid + u * NTHREADS;
      As[e % BK][e / BK] = ra[u];
    }
#pragma unroll
    for (int u = 0; u < B_PER; ++u) {
      const int e = tid + u * NTHREADS;
      Bs[e % BK][e / BK] = rb[u];
    }
    __syncthreads();
    if (k0 + BK < d) load(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      T a[TM], b[TN];
#pragma unroll
      for (int m = 0; m < TM; ++m) a[m] = As[kk][(m / RG) * GR + ty * RG + m % RG];
#pragma unroll
      for (int n = 0; n < TN; ++n) b[n] = Bs[kk][tx * TN + n];
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] += a[m] * b[n];
    }
    __syncthreads();
  }

  // 2. The recursion, one row of the micro-tile at a time (TN independent pairs in flight for ILP).
  const int layers = g.depth + 1;
  const index_t np1 = g.np1, np2 = g.np2;
  const T* nrm1 = g.tab1 + index_t(layers) * 5 * np1;
  const T* nrm2 = g.tab2 + index_t(layers) * 5 * np2;
  const T tau = sizeof(T) == 4 ? T(1e-2) : T(1e-3);
  const bool bias = g.bv > T(0);
  const T bv = g.bv, gs = g.gs;
  const T mask0 = 1 > g.fix_dep ? T(1) : T(0);

  __shared__ T mir_nngp[BN][GR + 1];
  __shared__ T mir_ntk[BN][GR + 1];

#pragma unroll 1
  for (int grp = 0; grp < TM / RG; ++grp) {
#pragma unroll 1
    for (int mm = 0; mm < RG; ++mm) {
      const int m = grp * RG + mm;
      const int il = grp * GR + ty * RG + mm;
      const index_t i = i0 + il;
      T s[TN], gm[TN], gp[TN], nt[TN];
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        T v = T(0);
#pragma unroll
        for (int q = 0; q < TM; ++q) v = (q == m) ? acc[q][n] : v;  // constant register indices
        s[n] = v;
      }

      // First layer: Sigma^1 = gs G + b, gaps |x||y| -/+ G (refined where they cancel), Theta^1.
      {
        const T n1v = nrm1[i], r0a = g.tab1[i];
        const T q1 = g.sq_gs * n1v;
#pragma unroll
        for (int n = 0; n < TN; ++n) {
          const index_t j = j0 + tx * TN + n;
          const T G = s[n];
          const T n2v = nrm2[j];
          const T nn = n1v * n2v;
          T mv = nn - G, pv = nn + G;
          const bool near_m = mv < tau * nn, near_p = pv < tau * nn;
          if ((near_m || near_p) && nn > T(0) && i < n1 && j < n2) {
            const T v = T(double(nn) * 0.5 * unit_dist2_dev(g.x1 + i * d, g.x2 + j * d, d, near_m ? -1.0 : 1.0));
            if (near_m)
              mv = v;
            else
              pv = v;
          }
          const T bterm = bias ? bias_gap(bv, q1, g.sq_gs * n2v, r0a, g.tab2[j]) : T(0);
          const T sv = gs * G + bv;
          s[n] = sv;
          // Later layers' gaps are clamped by the activations' pair().
          gm[n] = first_gap_minus(bterm, gs, mv);
          gp[n] = first_gap_plus(bterm, bv, gs, pv);
          nt[n] = mask0 * sv;
        }
      }

      // Layers: Sigma^(l+1) -> Sigma^(l+2), Theta alongside.
#pragma unroll 1
      for (int l = 0; l < g.depth; ++l) {
        const T* L1 = g.tab1 + index_t(l) * 5 * np1 + i;
        const T* L2 = g.tab2 + index_t(l) * 5 * np2 + j0 + tx * TN;
        const T ra = L1[0], ira = L1[np1], paa = L1[2 * np1], pba = L1[3 * np1], ta = L1[4 * np1];
        const T rna = L1[5 * np1];  // r of layer l + 1
        const T qa = g.w_sd * ta;
        const bool add = (l + 2) > g.fix_dep;
#pragma unroll
        for (int n = 0; n < TN; ++n) {
          const T rb = L2[n], irb = L2[np2 + n], pab = L2[2 * np2 + n], pbb = L2[3 * np2 + n], tb = L2[4 * np2 + n];
          const T P = ra * rb;
          const T h = T(0.5) * ira * irb;
          const pair_out<T> o = act.pair(s[n], gm[n], gp[n], P, h, paa, pba, ta, pab, pbb, tb);
          const T sv = bias ? next_sigma<true>(o.t, o.gm, o.gp, bv, bias_gap(bv, qa, g.w_sd * tb, rna, L2[5 * np2 + n]),
                                               gm[n], gp[n])
                            : next_sigma<false>(o.t, o.gm, o.gp, bv, T(0), gm[n], gp[n]);
          s[n] = sv;
          nt[n] = add ? next_theta<true>(sv, o.tdot, nt[n]) : next_theta<false>(sv, o.tdot, nt[n]);
        }
      }

      // One write per output; in the symmetric case only on or above the diagonal, the rest via the mirror.
#pragma unroll
      for (int n = 0; n < TN; ++n) {
        const index_t j = j0 + tx * TN + n;
        if (i < n1 && j < n2 && (!g.symmetric || j >= i)) {
          if (g.nngp) g.nngp[i * n2 + j] = s[n];
          if (g.ntk) g.ntk[i * n2 + j] = nt[n];
        }
        if (g.symmetric) {
          mir_nngp[tx * TN + n][ty * RG + mm] = s[n];
          mir_ntk[tx * TN + n][ty * RG + mm] = nt[n];
        }
      }
    }
    if (g.symmetric) {  // uniform over the block: the barriers are safe
      __syncthreads();
      for (int e = tid; e < BN * GR; e += NTHREADS) {
        const int jl = e / GR, c = e % GR;
        const index_t j = j0 + jl, i = i0 + grp * GR + c;
        if (j > i && j < n2 && i < n1) {
          if (g.nngp) g.nngp[j * n2 + i] = mir_nngp[jl][c];
          if (g.ntk) g.ntk[j * n2 + i] = mir_ntk[jl][c];
        }
      }
      __syncthreads();
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------------

// The per-row tables of the CPU engine (fill_row_table in fc_kernel.hpp), from |x|^2, in double.
template <class T, class Act>
std::vector<T> build_table(const std::vector<double>& norm2, index_t n, index_t np, const fc_params& p) {
  const int layers = p.depth + 1;
  std::vector<T> tab(std::size_t(layers * 5 + 2) * std::size_t(np), T(0));
  T* nrm = tab.data() + std::size_t(layers) * 5 * std::size_t(np);
  T* inv = nrm + np;
  for (index_t i = 0; i < np; ++i) {
    const double nx2 = i < n ? norm2[std::size_t(i)] : 0.0;  // padding rows: a zero row, finite everywhere
    fill_row_table<T, Act>(nx2, p, layers, np, i, tab.data(), nrm, inv);
  }
  return tab;
}

// k(x, x) for n rows from |x|^2: the CPU engine's diagonal recursion (diag_row in fc_kernel.hpp, in double),
// on the host, where the device's |x|^2 already are: O(n depth) scalar steps, no table and no kernel.
template <class T, class Act>
void diag_values(const std::vector<double>& norm2, index_t n, const fc_params& p, T* nngp, T* ntk) {
  for (index_t i = 0; i < n; ++i) {
    const diag_state<double> st = diag_row<Act>(norm2[std::size_t(i)], p);
    if (nngp) nngp[i] = T(st.s);
    if (ntk) ntk[i] = T(st.thf);
  }
}

}  // namespace arcflow::cuda_detail
