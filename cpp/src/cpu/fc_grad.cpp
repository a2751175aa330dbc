// Forward-mode gradients of the fully-connected NNGP and NTK with respect to w_std and b_std (fc_grad.hpp).
#include "arcflow/fc_grad.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "arcflow/activations.hpp"
#include "arcflow/fc_grad_activations.hpp"
#include "arcflow/fc_recursion.hpp"
#include "arcflow/omp_threads.hpp"

namespace arcflow {
namespace {

// Columns per chunk of a row: the chunk's values and tangents (13 arrays of doubles) stay in L1/L2.
constexpr index_t chunk = 256;

// The tangent of bias_gap (fc_recursion.hpp) B = b (q1 - q2)^2 / den, den = r1 r2 + q1 q2 + b, differentiated in
// this product form: it is exactly 0 for equal rows and keeps its relative accuracy near them (the angle's
// tangent of the next layer is this gap's tangent divided by sqrt(gm gp)). bp = B and iden = 1 / den (0 when
// b = 0: then B = 0 and db = 2 b_std db_std = 0) are shared with the value and the other direction.
inline double bias_gap_tangent(double b, double db, double bp, double iden, double q1, double q2, double dq1,
                               double dq2, double r1, double r2, double dr1, double dr2) {
  const double dq = q1 - q2, e = dq * iden;  // each product below stays within range for any input scale
  const double dden = dr1 * r2 + r1 * dr2 + dq1 * q2 + q1 * dq2 + db;
  return db * (dq * e) + 2.0 * b * ((dq1 - dq2) * e) - bp * (dden * iden);
}

// The order n - 1 monomial, whose Tdot enters the tangent of the order n monomial's Tdot (n >= 2).
template <class Act>
struct lower_order {
  explicit lower_order(const act_params&) {}
  static constexpr bool needed = false;
  double tdot(const angle<double>&, double, double, double, double, double, double, double, double, double) const {
    return 0.0;
  }
};
template <class T, int N>
struct lower_order<monomial_act<T, N>> {
  monomial_act<double, (N >= 1 ? N - 1 : -1)> act;  // a fixed order where the order n is fixed
  bool needed;
  static act_params lower(act_params p) {
    p.n = p.n >= 1 ? p.n - 1 : 0;
    return p;
  }
  explicit lower_order(const act_params& p) : act(lower(p), 1.0), needed(p.n >= 2) {}
  // Row factors of order n - 1: pa = r^(n-1) (the order n's pb), pb = r^(n-2) (the table's pc).
  double tdot(const angle<double>& g, double s12, double P, double h, double pb1, double pc1, double t1, double pb2,
              double pc2, double t2) const {
    if constexpr (N >= 2)
      return act.pair_angle(g, s12, P, h, pb1, pc1, t1, pb2, pc2, t2).tdot;
    else if constexpr (N >= 0)
      return 0.0;
    else
      return needed ? act.pair_angle(g, s12, P, h, pb1, pc1, t1, pb2, pc2, t2).tdot : 0.0;
  }
};

// Per-thread chunk buffers: values and, per direction, tangents.
struct chunk_buf {
  std::vector<double> v;
  chunk_buf() : v(size_t(13) * chunk) {}
  double* dot() { return v.data(); }
  double* s12() { return v.data() + 1 * chunk; }
  double* gm() { return v.data() + 2 * chunk; }
  double* gp() { return v.data() + 3 * chunk; }
  double* th() { return v.data() + 4 * chunk; }
  double* ds12(int k) { return v.data() + (5 + k) * chunk; }
  double* dgm(int k) { return v.data() + (7 + k) * chunk; }
  double* dgp(int k) { return v.data() + (9 + k) * chunk; }
  double* dth(int k) { return v.data() + (11 + k) * chunk; }
};

}  // namespace

template <class T>
fc_grad_engine<T>::fc_grad_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t d, bool symmetric,
                                  const fc_params& p)
    : x1_(x1), x2_(x2), n1_(n1), n2_(n2), d_(d), symmetric_(symmetric), p_(p) {
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && d >= 1, "fc_grad_engine: bad shapes");
  ARCFLOW_CHECK(p.depth >= 0 && p.fix_dep >= 0 && p.fix_dep <= p.depth, "fc_grad_engine: bad depth or fix_dep");
  ARCFLOW_CHECK(!symmetric || (x1 == x2 && n1 == n2), "fc_grad_engine: symmetric needs x2 == x1");
  const int layers = p.depth + 1;
  const double wv = p.w_var, bv = p.b_var, w = std::sqrt(wv), b = std::sqrt(bv);
  const double dgs_w = 2.0 * w / double(d);  // d gram_scale / d w_std, gram_scale = w_var / d
  fc_params unit = p;
  unit.w_var = 1.0;
  auto fill = [&](const T* x, index_t n, row_table& tab) {
    tab.n = n;
    tab.data.assign(size_t(layers) * n_fields * size_t(n), 0.0);
    tab.norm.assign(size_t(n), 0.0);
    by_activation<double, false>(unit, [&](const auto& act) {
      using Act = std::decay_t<decltype(act)>;
      using rule = grad_rule<Act>;
      for (index_t i = 0; i < n; ++i) {
        const T* xi = x + i * d;
        double nx2 = 0.0;
        for (index_t k = 0; k < d; ++k) nx2 += double(xi[k]) * double(xi[k]);
        tab.norm[i] = std::sqrt(nx2);
        double s = p.gram_scale * nx2 + bv;
        double ds[2] = {dgs_w * nx2, 2.0 * b};
        for (int l = 0; l < layers; ++l) {
          double* f = tab.data.data() + size_t(l) * n_fields * n;
          const double r = std::sqrt(s);
          double pa = 0, pb = 0;
          Act::row(p.act, s, r, pa, pb);
          const double pc = p.act.kind == act_kind::monomial && p.act.n >= 2 ? std::pow(r, p.act.n - 2) : 0.0;
          const double t11 = Act::diag_t(p.act, s), t = std::sqrt(t11);
          f[f_s * n + i] = s;
          f[f_r * n + i] = r;
          f[f_ir * n + i] = r > 0 ? 1.0 / r : 0.0;
          f[f_pa * n + i] = pa;
          f[f_pb * n + i] = pb;
          f[f_pc * n + i] = pc;
          f[f_t * n + i] = t;
          double next_ds[2];
          for (int k = 0; k < 2; ++k) {
            const double dt11 = rule::diag_dt(p.act, s, t11, ds[k]);
            f[(f_ds0 + k) * n + i] = ds[k];
            f[(f_hs0 + k) * n + i] = s > 0 ? ds[k] / (2.0 * s) : 0.0;
            f[(f_dr0 + k) * n + i] = r > 0 ? ds[k] / (2.0 * r) : 0.0;
            f[(f_dt0 + k) * n + i] = t > 0 ? dt11 / (2.0 * t) : 0.0;
            next_ds[k] = (k == 0 ? 2.0 * w * t11 : 2.0 * b) + wv * dt11;
          }
          s = wv * t11 + bv;
          ds[0] = next_ds[0];
          ds[1] = next_ds[1];
        }
      }
    });
  };
  fill(x1, n1, tab1_);
  if (!symmetric) fill(x2, n2, tab2_);
  x2t_.assign(size_t(d) * size_t(n2), 0.0);
  for (index_t j = 0; j < n2; ++j)
    for (index_t k = 0; k < d; ++k) x2t_[size_t(k) * n2 + j] = double(x2[j * d + k]);
}

template <class T>
template <class Act>
void fc_grad_engine<T>::run(const Act& act, index_t r0, index_t r1, bool diag, T* const* out, int threads) const {
  using rule = grad_rule<Act>;
  const fc_params& p = p_;
  const act_params& ap = p.act;
  const lower_order<Act> lower(ap);
  const row_table& t1 = tab1_;
  const row_table& t2 = tab2();
  const index_t n2 = n2_, d = d_;
  const int depth = p.depth, fix = p.fix_dep;
  const double wv = p.w_var, bv = p.b_var, w = std::sqrt(wv), b = std::sqrt(bv);
  const double gs = p.gram_scale, sq_gs = std::sqrt(gs);
  const double dwv[2] = {2.0 * w, 0.0}, dbv[2] = {0.0, 2.0 * b};
  const double dgs[2] = {2.0 * w / double(d), 0.0};
  const double dsq_gs[2] = {1.0 / std::sqrt(double(d)), 0.0};  // sqrt(gram_scale) = w_std / sqrt(d)
  const int nt = std::max(1, omp_threads(threads));
  std::vector<chunk_buf> bufs(static_cast<size_t>(nt));
  auto F1 = [&](int l, int f) { return t1.field(l, f); };
  auto F2 = [&](int l, int f) { return t2.field(l, f); };

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (index_t i = r0; i < r1; ++i) {
#ifdef ARCFLOW_HAVE_OPENMP
    chunk_buf& cb = bufs[size_t(omp_get_thread_num())];
#else
    chunk_buf& cb = bufs[0];
#endif
    const index_t c_begin = diag ? i : (symmetric_ ? i : 0), c_end = diag ? i + 1 : n2;
    const T* xi = x1_ + i * d;
    for (index_t j0 = c_begin; j0 < c_end; j0 += chunk) {
      const index_t nj = std::min(chunk, c_end - j0);
      double* dot = cb.dot();
      double* s12 = cb.s12();
      double* gm = cb.gm();
      double* gp = cb.gp();
      double* th = cb.th();
      double* ds12[2] = {cb.ds12(0), cb.ds12(1)};
      double* dgm[2] = {cb.dgm(0), cb.dgm(1)};
      double* dgp[2] = {cb.dgp(0), cb.dgp(1)};
      double* dth[2] = {cb.dth(0), cb.dth(1)};
      // 1. Gram.
      if (diag) {
        double a = 0.0;
        for (index_t k = 0; k < d; ++k) a += double(xi[k]) * double(xi[k]);
        dot[0] = a;
      } else {
        std::fill_n(dot, nj, 0.0);
        for (index_t k = 0; k < d; ++k) {
          const double xk = double(xi[k]);
          const double* col = x2t_.data() + size_t(k) * n2 + j0;
#pragma omp simd
          for (index_t j = 0; j < nj; ++j) dot[j] += xk * col[j];
        }
      }
      // 2. First layer, its gaps as the engine makes them (refined where |x||y| -/+ <x,y> cancels).
      {
        const double n1v = t1.norm[i], r1v = F1(0, f_r)[i];
        const double* nrm2 = t2.norm.data() + j0;
        const double* r2 = F2(0, f_r) + j0;
        for (index_t j = 0; j < nj; ++j) {
          const index_t col = j0 + j;
          const double nn = n1v * nrm2[j];
          double gme = nn - dot[j], gpe = nn + dot[j];
          const bool near_m = gme < 1e-3 * nn, near_p = gpe < 1e-3 * nn;
          if (nn > 0 && (near_m || near_p)) {
            const T* y = (diag || symmetric_ ? x1_ : x2_) + col * d;
            const double v = nn * 0.5 * unit_dist2(xi, y, d, near_m ? -1.0 : 1.0);
            if (near_m)
              gme = v;
            else
              gpe = v;
          }
          gme = gme > 0 ? gme : 0.0;
          gpe = gpe > 0 ? gpe : 0.0;
          const double q1 = sq_gs * n1v, q2 = sq_gs * nrm2[j];
          const double iden = bv > 0 ? 1.0 / (r1v * r2[j] + q1 * q2 + bv) : 0.0;
          const double bterm = (bv * iden) * (q1 - q2) * (q1 - q2);  // bias_gap, in range at any input scale
          s12[j] = gs * dot[j] + bv;
          gm[j] = first_gap_minus(bterm, gs, gme);
          gp[j] = first_gap_plus(bterm, bv, gs, gpe);
          th[j] = fix < 1 ? s12[j] : 0.0;
          for (int k = 0; k < 2; ++k) {
            const double dbp = bias_gap_tangent(bv, dbv[k], bterm, iden, q1, q2, dsq_gs[k] * n1v, dsq_gs[k] * nrm2[j],
                                                r1v, r2[j], F1(0, f_dr0 + k)[i], F2(0, f_dr0 + k)[j0 + j]);
            ds12[k][j] = dgs[k] * dot[j] + dbv[k];
            dgm[k][j] = dbp + dgs[k] * gme;
            dgp[k][j] = dbp + 2.0 * dbv[k] + dgs[k] * gpe;
            dth[k][j] = fix < 1 ? ds12[k][j] : 0.0;
          }
        }
      }
      // 3. Layers: Sigma^(l+1) -> Sigma^(l+2), Theta alongside, each with its two tangents.
      for (int l = 0; l < depth; ++l) {
        const bool add = (l + 2) > fix;
        const double ra = F1(l, f_r)[i], ira = F1(l, f_ir)[i], paa = F1(l, f_pa)[i], pba = F1(l, f_pb)[i];
        const double pca = F1(l, f_pc)[i], ta = F1(l, f_t)[i], rna = F1(l + 1, f_r)[i];
        const double hsa[2] = {F1(l, f_hs0)[i], F1(l, f_hs1)[i]}, dsa[2] = {F1(l, f_ds0)[i], F1(l, f_ds1)[i]};
        const double dta[2] = {F1(l, f_dt0)[i], F1(l, f_dt1)[i]};
        const double drna[2] = {F1(l + 1, f_dr0)[i], F1(l + 1, f_dr1)[i]};
        const double *rb = F2(l, f_r) + j0, *irb = F2(l, f_ir) + j0, *pab = F2(l, f_pa) + j0;
        const double *pbb = F2(l, f_pb) + j0, *pcb = F2(l, f_pc) + j0, *tb = F2(l, f_t) + j0;
        const double* rnb = F2(l + 1, f_r) + j0;
        const double* hsb[2] = {F2(l, f_hs0) + j0, F2(l, f_hs1) + j0};
        const double* dsb[2] = {F2(l, f_ds0) + j0, F2(l, f_ds1) + j0};
        const double* dtb[2] = {F2(l, f_dt0) + j0, F2(l, f_dt1) + j0};
        const double* drnb[2] = {F2(l + 1, f_dr0) + j0, F2(l + 1, f_dr1) + j0};
        double* __restrict s12_ = s12;
        double* __restrict gm_ = gm;
        double* __restrict gp_ = gp;
        double* __restrict th_ = th;
        double* __restrict ds12_0 = ds12[0];
        double* __restrict ds12_1 = ds12[1];
        double* __restrict dgm_0 = dgm[0];
        double* __restrict dgm_1 = dgm[1];
        double* __restrict dgp_0 = dgp[0];
        double* __restrict dgp_1 = dgp[1];
        double* __restrict dth_0 = dth[0];
        double* __restrict dth_1 = dth[1];
#pragma omp simd
        for (index_t j = 0; j < nj; ++j) {
          const double P = ra * rb[j], h = 0.5 * ira * irb[j];
          const double g_m = gm_[j], g_p = gp_[j], s = s12_[j];
          pair_out<double> o;
          angle<double> g{};
          if constexpr (rule::uses_angle) {
            g = make_angle(g_m, g_p, h);
            o = act.pair_angle(g, s, P, h, paa, pba, ta, pab[j], pbb[j], tb[j]);
          } else {
            o = act.pair(s, g_m, g_p, P, h, paa, pba, ta, pab[j], pbb[j], tb[j]);
            o.tdot = rule::tdot(act, g_m, g_p, paa, pab[j]);
          }
          const double low = rule::uses_angle ? lower.tdot(g, s, P, h, pba, pca, ta, pbb[j], pcb[j], tb[j]) : 0.0;
          const double sgg = std::sqrt(g_m) * std::sqrt(g_p);  // P sin(theta); g_m g_p may overflow
          const double isg = sgg > 0 ? 1.0 / sgg : 0.0;
          const bool big = rule::uses_angle ? g.big() : false;
          const double s_next = wv * o.t + bv;
          const double qa = w * ta, qb = w * tb[j], dq = qa - qb;
          // bias_gap's B = b (qa - qb)^2 / den with den's reciprocal, which the tangents share; b / den first,
          // so that no product leaves the range of double at any input scale.
          const double iden = bv > 0 ? 1.0 / (rna * rnb[j] + qa * qb + bv) : 0.0;
          const double bterm = (bv * iden) * dq * dq;
          const double th_old = th_[j];
          // One direction k (0: w_std, 1: b_std): the tangents of the next layer from this layer's.
          auto step = [&](int k, double& ds12_k, double& dgm_k, double& dgp_k, double& dth_k) {
            pair_tangent_in in;
            in.hl = hsa[k] + hsb[k][j];
            in.a = big ? g_p * in.hl - dgp_k : dgm_k - g_m * in.hl;
            in.dtheta = in.a * isg;
            in.ds12 = ds12_k;
            in.ds1 = dsa[k];
            in.ds2 = dsb[k][j];
            in.dtt = dta[k] * tb[j] + ta * dtb[k][j];
            pair_tangent_out rt;
            if constexpr (rule::uses_angle)
              rt = rule::pair(act, ap, o, low, h, in);
            else
              rt = rule::pair_erf(o, s, g_m, g_p, paa, pab[j], dgm_k, dgp_k, in);
            const double dqa = (k == 0 ? ta : 0.0) + w * dta[k], dqb = (k == 0 ? tb[j] : 0.0) + w * dtb[k][j];
            const double dbp =
                bias_gap_tangent(bv, dbv[k], bterm, iden, qa, qb, dqa, dqb, rna, rnb[j], drna[k], drnb[k][j]);
            const double dsn = dwv[k] * o.t + wv * rt.dt + dbv[k];
            ds12_k = dsn;
            dgm_k = dbp + dwv[k] * o.gm + wv * rt.dgm;
            dgp_k = dbp + 2.0 * dbv[k] + dwv[k] * o.gp + wv * rt.dgp;
            dth_k = (add ? dsn : 0.0) + (dwv[k] * o.tdot + wv * rt.dtdot) * th_old + wv * o.tdot * dth_k;
          };
          step(0, ds12_0[j], dgm_0[j], dgp_0[j], dth_0[j]);
          step(1, ds12_1[j], dgm_1[j], dgp_1[j], dth_1[j]);
          s12_[j] = s_next;
          gm_[j] = bterm + wv * o.gm;
          gp_[j] = bterm + 2.0 * bv + wv * o.gp;
          th_[j] = (add ? s_next : 0.0) + wv * o.tdot * th_old;
        }
      }
      // 4. Store (the symmetric case's lower triangle is mirrored afterwards, in tiles).
      double* src[4] = {ds12[0], ds12[1], dth[0], dth[1]};
      for (int q = 0; q < 4; ++q) {
        T* o = out[q];
        if (!o) continue;
        for (index_t j = 0; j < nj; ++j) {
          const index_t col = j0 + j;
          const T v = T(src[q][j]);
          if (diag)
            o[i] = v;
          else
            o[i * n2 + col] = v;
        }
      }
    }
  }
  // 5. Mirror: (j, i) = (i, j) for the rows i of this call and j > i, in tiles (a row's strided column writes
  // would miss the cache on every element). Each tile row j is written by one thread.
  if (symmetric_ && !diag) {
    constexpr index_t tb = 64;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (index_t jb = r0; jb < n2; jb += tb) {
      const index_t je = std::min(jb + tb, n2);
      for (index_t ib = r0; ib < std::min(r1, je); ib += tb) {
        const index_t ie = std::min(ib + tb, r1);
        for (int q = 0; q < 4; ++q) {
          T* o = out[q];
          if (!o) continue;
          for (index_t j = jb; j < je; ++j)
            for (index_t i = ib; i < std::min(ie, j); ++i) o[j * n2 + i] = o[i * n2 + j];
        }
      }
    }
  }
}

template <class T>
void fc_grad_engine<T>::rows(index_t r0, index_t r1, T* nngp_dw, T* nngp_db, T* ntk_dw, T* ntk_db, int threads) const {
  ARCFLOW_CHECK(0 <= r0 && r0 <= r1 && r1 <= n1_, "fc_grad_engine::rows: bad row range");
  T* const out[4] = {nngp_dw, nngp_db, ntk_dw, ntk_db};
  fc_params unit = p_;
  unit.w_var = 1.0;
  by_activation<double, true>(unit, [&](const auto& act) { run(act, r0, r1, false, out, threads); });
}

template <class T>
void fc_grad_engine<T>::diag(T* nngp_dw, T* nngp_db, T* ntk_dw, T* ntk_db, int threads) const {
  ARCFLOW_CHECK(symmetric_, "fc_grad_engine::diag: needs the symmetric engine (x2 == x1)");
  T* const out[4] = {nngp_dw, nngp_db, ntk_dw, ntk_db};
  fc_params unit = p_;
  unit.w_var = 1.0;
  by_activation<double, true>(unit, [&](const auto& act) { run(act, 0, n1_, true, out, threads); });
}

template class fc_grad_engine<float>;
template class fc_grad_engine<double>;

}  // namespace arcflow
