// NNGP (CNN-GP) and NTK (CNTK) of convolutional networks described layer by layer (arcflow.stax): the fused
// pixel-pair recursion (docs/mathematics.md §1.6).
#pragma once
// Contract:
// - Images are C-contiguous host arrays of T (float or double), n x H x W x C, that outlive the engine; rows of
//   a fully-connected network are images with H = W = 1 and C = d. Symmetric (x2 = None in Python): pass
//   x2 == x1 and symmetric = true.
// - The network is a list of ops (conv_op), already checked for order by the Python layer: Conv / AvgPool on
//   images, then one readout (Flatten or GlobalAvgPool), then Dense and activations on the pair's scalar
//   (a fully-connected network has no readout: its "image" is 1 x 1 from the start).
// - For each pair of images the covariance of every pair of pixel positions, Sigma[p, q] and Theta[p, q], lives
//   only in the calling thread's scratch: (H W)^2 values per array, or H W when the network's readout is Flatten
//   with no AvgPool (then only the same-position pairs (p, p) are ever needed). Never an n1 x n2 x (H W)^2 array.
// - The constructor runs each image's own recursion (x with itself), keeping per image and activation the
//   variances Sigma(x, x)[p, p] (the tables the pairs' activations need) and k(x, x) (diag()). It runs with
//   `threads` threads and calls `interrupt` between blocks of images.
// - rows(r0, r1, ...) writes rows [r0, r1) of the n1 x n2 outputs (either may be null): each element once; in
//   the symmetric case the pairs j > i are computed and mirrored, and the diagonal is k(x, x) from the
//   constructor, so the result is exactly symmetric. OpenMP over pairs.
// - Identical patches stay exact: each pair runs the same operations in the same order as an image's own
//   recursion, so two positions whose receptive fields hold the same values get bit-identical Sigma, and the
//   angle comes from the gap sqrt(S11 S22) - S12, which is then exactly 0 (cosine 1, no arccos(1 - eps)).
// - Throws std::invalid_argument on inconsistent arguments, allocation_error when memory runs out, interrupted
//   when `interrupt` returned true (outputs partly written), fp_overflow (naming the layer) when an image's
//   own kernel leaves T's range (from the constructor, before any output is written).
#include <vector>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"
#include "arcflow/fc_kernel.hpp"

namespace arcflow {

enum class conv_op_kind : int { dense = 0, conv = 1, pool = 2, act = 3, flatten = 4, gap = 5 };
enum class conv_padding : int { valid = 0, same = 1, circular = 2 };

struct conv_op {
  conv_op_kind kind = conv_op_kind::dense;
  int fh = 1, fw = 1;  // filter (conv) or window (pool)
  int sh = 1, sw = 1;  // strides (pool)
  conv_padding padding = conv_padding::valid;
  double w_var = 1.0, b_var = 0.0;  // dense / conv: Sigma <- w_var mean(Sigma) + b_var
  act_params act;                   // act
};

template <class T>
class conv_engine {
 public:
  conv_engine(const T* x1, index_t n1, const T* x2, index_t n2, index_t h, index_t w, index_t c, bool symmetric,
              const std::vector<conv_op>& ops, bool want_ntk, int threads, const interrupt_fn& interrupt = {});
  ~conv_engine();
  conv_engine(const conv_engine&) = delete;
  conv_engine& operator=(const conv_engine&) = delete;

  void rows(index_t r0, index_t r1, T* nngp, T* ntk, int threads, const interrupt_fn& interrupt = {}) const;
  // k(x1[i], x1[i]) for every row of x1.
  void diag(T* nngp, T* ntk) const;

  // Bytes of one thread's scratch and of the per-image tables (for the Python layer's memory check).
  static index_t scratch_bytes(index_t h, index_t w, index_t c, const std::vector<conv_op>& ops);
  static index_t table_bytes(index_t n, index_t h, index_t w, const std::vector<conv_op>& ops);
  // Multiply-adds of one pair's recursion (conv and pooling sums, per array), for the blocks of rows().
  static double pair_work(index_t h, index_t w, index_t c, const std::vector<conv_op>& ops);

  struct plan;

 private:
  plan* plan_;  // owned (conv_kernel.cpp)
};

}  // namespace arcflow
