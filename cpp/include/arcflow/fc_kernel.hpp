// NNGP and NTK of a deep fully-connected network: the fused, tiled recursion (docs/mathematics.md §1).
#pragma once
// Contract:
// - x1 (n1 x d) and x2 (n2 x d) are C-contiguous host arrays of T (float or double) that outlive the
//   engine; for the symmetric case (x2 = None in Python) pass x2 == x1 and symmetric = true.
// - Outputs are C-contiguous host arrays: nngp and ntk are n1 x n2; ntk_all is
//   (depth+1) x (depth+1) x n1 x n2 with ntk_all[l][k] = Theta after layer l+1 with the first k layers
//   frozen (written for k <= l only: the caller zero-fills the rest). Any of them may be null.
// - rows(r0, r1, ...) computes rows [r0, r1) of x1 against all of x2 in tiles of `tile` x `tile`: the Gram
//   tile, every layer and both kernels while the tile is in cache, each output element written once. In the
//   symmetric case only tiles on or above the diagonal are computed (r0 must be a multiple of `tile`) and
//   mirrored, so the result is exactly symmetric. OpenMP over tiles with `threads` threads.
// - diag(...) computes k(x, x) for the rows of x1 in O(n1 (d + depth)).
// - Throws std::invalid_argument on inconsistent arguments, allocation_error (a std::bad_alloc that says
//   what could not be allocated) when memory runs out, and interrupted when `interrupt` returned true;
//   never throws inside the parallel region. rows() never runs more threads than it has tiles.
// - `interrupt` (may be empty) is called now and then by the calling thread (between tiles, between blocks
//   of table rows); returning true stops the work early, leaving the outputs partly written.
// - Any input scale: rows whose per-row values leave the range where the tile kernel's products stay normal
//   are computed in long double (a kernel that underflows T comes out 0 or denormal, never NaN). Where the
//   exact kernel overflows T, fp_overflow (the first layer beyond the range in its message): a symmetric
//   rows() call and diag() raise before writing, a non-symmetric rows() call after its block.
//   Thread-safety: const methods may run concurrently on one engine.
#include <cmath>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"

namespace arcflow {

struct fc_params {
  act_params act;
  int depth = 1;            // hidden activations; the output is Sigma^(depth+1), Theta^(depth+1)
  double w_var = 1.0;       // W_std^2
  double b_var = 0.0;       // b_std^2
  double gram_scale = 1.0;  // Sigma^1 = gram_scale * <x, y> + b_var (W_std^2 / d normally, 1 for compat)
  int fix_dep = 0;          // Sigma^l enters Theta only for l > fix_dep
};

// A std::bad_alloc that names what could not be allocated (pybind11 makes it a MemoryError with this text).
class allocation_error : public std::bad_alloc {
 public:
  explicit allocation_error(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

// Thrown when the caller's interrupt callback asked to stop (the bindings turn it into the pending Python
// exception, KeyboardInterrupt for Ctrl-C).
struct interrupted : std::runtime_error {
  interrupted() : std::runtime_error("arcflow: interrupted") {}
};

using interrupt_fn = std::function<bool()>;

template <class T>
class fc_engine {
 public:
  static constexpr index_t tile = 64;

  fc_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t d, bool symmetric, const fc_params& p,
            const interrupt_fn& interrupt = {});

  void rows(index_t r0, index_t r1, T* nngp, T* ntk, T* ntk_all, int threads, const interrupt_fn& interrupt = {}) const;
  void diag(T* nngp, T* ntk, int threads, const interrupt_fn& interrupt = {}) const;

  index_t n1() const { return n1_; }
  index_t n2() const { return n2_; }

  // Per-row tables, one block per layer l = 0..depth: r, ir, pa, pb, t (see activations.hpp), then the
  // input norms |x| and 1/|x|. Public for the CUDA backend, which uploads them.
  struct row_table {
    index_t n = 0;
    int layers = 0;
    std::vector<T> data;  // [layer][field][row], fields r, ir, pa, pb, t
    std::vector<T> norm, inv_norm;
    // Per row: whether every value above lies in the range where the tile kernel's products neither
    // overflow nor lose precision (other rows' pairs are recomputed in long double), the diagonal
    // Sigma(x,x) and Theta(x,x) of the last layer (inf beyond double), and the first layer where each
    // exceeds T's range (0: none).
    std::vector<unsigned char> ok;
    std::vector<double> diag_s, diag_t;
    std::vector<int> over_s, over_t;
    bool all_ok = true;
    const T* field(int layer, int f) const { return data.data() + (index_t(layer) * 5 + f) * n; }
  };
  const row_table& rows1() const { return tab1_; }
  const row_table& rows2() const { return symmetric_ ? tab1_ : tab2_; }
  const fc_params& params() const { return p_; }

 private:
  const T *x1_, *x2_;
  index_t n1_, n2_, d_;
  bool symmetric_;
  fc_params p_;
  row_table tab1_, tab2_;
  // x2 packed for the Gram micro-kernel (fc_kernel.cpp, pack_panels), on the first rows() call: diag() needs
  // no Gram and so no copy of x2.
  mutable std::vector<T> panels2_;
  mutable std::once_flag packed_;
  const T* panels2() const;
};

// The diagonal recursion of one row, Sigma(x,x) and Theta(x,x) layer by layer in R, from nx2 = |x|^2: written once
// for the CPU engine (the tables and their range scan) and the CUDA backend's diag (on the host, from the
// device's |x|^2). th is Theta with every layer trained, thf with the first fix_dep layers frozen.
template <class R>
struct diag_state {
  R s, th, thf;
};

template <class R>
inline diag_state<R> diag_first(R nx2, const fc_params& p) {
  const R s = R(p.gram_scale) * nx2 + R(p.b_var);
  return {s, s, p.fix_dep < 1 ? s : R(0)};
}

// Sigma^(l+2)(x,x) from t11 = Act::diag_t(Sigma^(l+1)(x,x)).
template <class R>
inline R diag_next_sigma(R t11, const fc_params& p) {
  return R(p.w_var) * t11 + R(p.b_var);
}

// Layer l + 1 -> l + 2 (l from 0), t11 = Act::diag_t(p.act, st.s).
template <class Act, class R>
inline void diag_next(diag_state<R>& st, R t11, int l, const fc_params& p) {
  const R td = R(p.w_var) * Act::diag_tdot(p.act, st.s);
  const R sn = diag_next_sigma(t11, p);
  st.th = sn + td * st.th;
  st.thf = ((l + 2) > p.fix_dep ? sn : R(0)) + td * st.thf;
  st.s = sn;
}

// The last layer's Sigma(x,x) and Theta(x,x).
template <class Act, class R>
inline diag_state<R> diag_row(R nx2, const fc_params& p) {
  diag_state<R> st = diag_first(nx2, p);
  for (int l = 0; l < p.depth; ++l) diag_next<Act>(st, Act::diag_t(p.act, st.s), l, p);
  return st;
}

// Row i of the per-row tables from nx2 = |x_i|^2, computed in R (double by default) whatever T is. data is laid
// out [layer][field][row] with the fields r, ir, pa, pb, t of activations.hpp, np rows per field, layers
// 0..layers-1; norm and inv_norm get |x_i| and 1/|x_i| (0 for a zero row). One definition for the CPU
// engine's tables (and its long double ones for rows out of the fast path's range) and the CUDA backend's
// (which gets |x|^2 from the device).
template <class T, class Act, class R = double>
inline void fill_row_table(R nx2, const fc_params& p, int layers, index_t np, index_t i, T* data, T* norm,
                           T* inv_norm) {
  const R nx = std::sqrt(nx2);
  norm[i] = T(nx);
  inv_norm[i] = nx > 0 ? T(R(1) / nx) : T(0);
  R s = diag_first(nx2, p).s;
  for (int l = 0; l < layers; ++l) {
    const R r = std::sqrt(s);
    R pa = 0, pb = 0;
    Act::row(p.act, s, r, pa, pb);
    const R t11 = Act::diag_t(p.act, s);
    T* base = data + index_t(l) * 5 * np;
    base[0 * np + i] = T(r);
    base[1 * np + i] = r > 0 ? T(R(1) / r) : T(0);
    base[2 * np + i] = T(pa);
    base[3 * np + i] = T(pb);
    base[4 * np + i] = T(std::sqrt(t11));
    s = diag_next_sigma(t11, p);
  }
}

// Raised where the exact kernel overflows the output's dtype (the bindings turn it into FloatingPointError).
struct fp_overflow : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Vectorised-arccos throughput of this build on one core (fm::acos_poly on [-1, 1], elements per second), for
// the roofline.
double acos_throughput(bool single_precision, double seconds);

// The layer loops' layout (fc_kernel.cpp, run_tile): -1 = by the CPU (one fused loop with the division-free
// angle and the 64-byte-vector Gram on AVX-512, three loops and 32-byte vectors otherwise), 0 = three loops,
// 1 = fused. For tests, which run both layouts on any CPU. Returns the previous setting; not thread-safe
// against running kernels.
int set_fc_layout(int layout);

// The instruction-set variants of the tile kernel: "generic" (x86-64), "avx2" (x86-64-v3), "avx512"
// (x86-64-v4). fc_isa_levels() lists those this CPU runs, in increasing order. The active one is the best the
// CPU runs, capped by the environment variable ARCFLOW_ISA (read once, at the first use; "auto" or unset: no
// cap; another value throws std::invalid_argument), unless set_fc_isa forces one ("auto" undoes that;
// std::invalid_argument for an unknown name or a level the CPU cannot run). A level below avx512 also makes the
// layout three loops (set_fc_layout overrides). For tests; not thread-safe against running kernels.
std::vector<std::string> fc_isa_levels();
std::string fc_isa();
int fc_isa_level();  // the same as 0, 1, 2 (the convolutional engine follows it)
void set_fc_isa(const std::string& name);

}  // namespace arcflow
