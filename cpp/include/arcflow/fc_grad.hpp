// Gradients of the fully-connected NNGP and NTK with respect to w_std and b_std (forward mode).
#pragma once
// Contract:
// - Same recursion and parameters as fc_engine (fc_kernel.hpp, docs/mathematics.md §1), with
//   gram_scale = w_var / d (as arcflow.kernels builds it): Sigma^1 = w_std^2 <x, y> / d + b_std^2.
// - Forward mode: every layer's Sigma(x, y), its gaps P -/+ Sigma and Theta carry their tangents in the two
//   directions w_std and b_std next to their values; the values come from the activations' own pair and
//   diagonal code (activations.hpp), the tangents from fc_grad_activations.hpp. Everything is carried in
//   double, also for float inputs (the outputs are rounded to T once, at the end).
// - x1 (n1 x d) and x2 (n2 x d) are C-contiguous host arrays of T that outlive the engine; for the symmetric
//   case pass x2 == x1 and symmetric = true.
// - rows(r0, r1, ...) writes rows [r0, r1) of the n1 x n2 outputs d NNGP / d w_std, d NNGP / d b_std,
//   d NTK / d w_std, d NTK / d b_std (any may be null; the NTK ones only where the activation has an NTK).
//   Symmetric: each row computes its pairs j >= i and mirrors them, so the result is exactly symmetric.
//   OpenMP over rows with `threads` threads.
// - diag(...) writes the same four for k(x, x), n1 values each.
// - Throws std::invalid_argument on inconsistent arguments, std::bad_alloc when memory runs out; never
//   throws inside the parallel region. Const methods may run concurrently on one engine.
#include <vector>

#include "arcflow/common.hpp"
#include "arcflow/fc_kernel.hpp"

namespace arcflow {

template <class T>
class fc_grad_engine {
 public:
  fc_grad_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t d, bool symmetric, const fc_params& p);

  void rows(index_t r0, index_t r1, T* nngp_dw, T* nngp_db, T* ntk_dw, T* ntk_db, int threads) const;
  void diag(T* nngp_dw, T* nngp_db, T* ntk_dw, T* ntk_db, int threads) const;

  index_t n1() const { return n1_; }
  index_t n2() const { return n2_; }

  // Per-row tables in double, [layer][field][row] for layers 0..depth (Sigma^1 .. Sigma^(depth+1) on the
  // diagonal), the fields below; dir 0 is w_std, 1 is b_std.
  enum field : int {
    f_s,
    f_r,
    f_ir,
    f_pa,
    f_pb,
    f_pc,
    f_t,
    f_ds0,
    f_ds1,
    f_hs0,
    f_hs1,
    f_dr0,
    f_dr1,
    f_dt0,
    f_dt1,
    n_fields
  };
  struct row_table {
    index_t n = 0;
    std::vector<double> data;
    std::vector<double> norm;  // |x|
    const double* field(int layer, int f) const { return data.data() + (index_t(layer) * n_fields + f) * n; }
  };

 private:
  const T *x1_, *x2_;
  index_t n1_, n2_, d_;
  bool symmetric_;
  fc_params p_;
  row_table tab1_, tab2_;
  std::vector<double> x2t_;  // x2 transposed (d x n2), in double: the Gram loop runs over the columns
  const row_table& tab2() const { return symmetric_ ? tab1_ : tab2_; }
  template <class Act>
  void run(const Act& act, index_t r0, index_t r1, bool diag, T* const* out, int threads) const;
};

}  // namespace arcflow
