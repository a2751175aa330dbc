// NNGP (CNN-GP) and NTK (CNTK) of convolutional networks on a CUDA device: the host engine.
#pragma once
// Contract (declarations only, no CUDA headers; the definitions live in cpp/src/cuda/conv_kernel.cu and exist
// only when ARCFLOW_WITH_CUDA is defined):
// - The same engine as conv_engine<T> (conv_kernel.hpp) with HOST arrays: the constructor copies the images to
//   the device (`device`, -1 = the current one) and runs every image's own recursion there (the tables of the
//   pairs and k(x, x)); rows(r0, r1, ...) computes rows [r0, r1) of the n1 x n2 outputs on the device and writes
//   them into the host arrays (in the symmetric case the pairs j > i, their mirrors and the diagonal, so the
//   result is exactly symmetric); diag() gives k(x, x) of x1. Calls are synchronous.
// - Device memory: the images, the tables (table_bytes), the outputs of one block of rows, and a scratch of
//   2 (NNGP) or 4 (NTK) pixel-pair arrays per resident block of threads (as many blocks as a quarter of the free
//   memory holds, at most 4 per multiprocessor).
// - Same numbers as conv_engine<T> up to rounding (the same per-element formulas; the readout sums in another
//   order). Throws std::invalid_argument on inconsistent arguments, allocation_error when the device memory
//   cannot hold one block's scratch, fp_overflow (naming the layer, as the CPU engine) from the constructor,
//   std::runtime_error when a CUDA call fails (naming it), including "no CUDA device".
#include <vector>

#include "arcflow/common.hpp"
#include "arcflow/conv_kernel.hpp"

namespace arcflow {

template <class T>
class conv_engine_cuda {
 public:
  conv_engine_cuda(const T* x1, index_t n1, const T* x2, index_t n2, index_t h, index_t w, index_t c, bool symmetric,
                   const std::vector<conv_op>& ops, bool want_ntk, int device);
  ~conv_engine_cuda();
  conv_engine_cuda(const conv_engine_cuda&) = delete;
  conv_engine_cuda& operator=(const conv_engine_cuda&) = delete;

  void rows(index_t r0, index_t r1, T* nngp, T* ntk) const;
  void diag(T* nngp, T* ntk) const;
  // Blocks of threads resident at once (each with its own scratch): the pairs one launch works on in parallel.
  index_t blocks() const;

  struct state;

 private:
  state* st_;  // owned (conv_kernel.cu)
};

extern template class conv_engine_cuda<float>;
extern template class conv_engine_cuda<double>;

}  // namespace arcflow
