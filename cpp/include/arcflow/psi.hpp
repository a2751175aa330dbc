// psi: the i-RevNet space-to-depth permutation (block size b) and its inverse, NCHW.
#pragma once
// Contract (docs/mathematics.md §2): x is (n, c, h, w) with h and w divisible by b; y = psi(x) is
// (n, b*b*c, h/b, w/b) with
//   y[n, (dy*b + dx)*c + ci, i, j] = x[n, ci, i*b + dy, j*b + dx]
// (position inside the block first, then the channel: the order of the reference i-RevNet code, not
// pixel_unshuffle's). psi is a permutation, so psi_inverse(psi(x)) == x bit for bit.
// C-contiguous host arrays; in and out must not alias. threads <= 0: OpenMP's default. Throws std::invalid_argument on
// bad sizes.
#include "arcflow/common.hpp"

namespace arcflow {

template <typename T>
void psi_forward_cpu(const T* x, index_t n, index_t c, index_t h, index_t w, index_t b, T* y, int threads = 0);

// y is (n, b*b*c, h/b, w/b); x (n, c, h, w) is written.
template <typename T>
void psi_inverse_cpu(const T* y, index_t n, index_t c, index_t h, index_t w, index_t b, T* x, int threads = 0);

}  // namespace arcflow
