// Batch-norm in inference form (a per-channel affine map) with an optional ReLU, and a plain ReLU. NCHW.
#pragma once
// Contract: x and y are (n, c, hw) C-contiguous host arrays (hw = h*w); y may alias x (in place).
//   channel_affine: y[n, ci, p] = x[n, ci, p] * scale[ci] + shift[ci], then max(0, .) if relu.
// Batch-norm with running statistics is this map with scale = gamma / sqrt(running_var + eps) and
// shift = beta - running_mean * scale (computed by the caller, once per weight set).
//   relu: y[i] = max(0, x[i]) over `size` values (NaN stays NaN).
// OpenMP over (n, c) with `threads` threads (<= 0: OpenMP's default). Thread-safe, no global state.
#include "arcflow/common.hpp"

namespace arcflow {

template <typename T>
void channel_affine_cpu(const T* x, index_t n, index_t c, index_t hw, const T* scale, const T* shift, bool relu, T* y,
                        int threads = 0);

template <typename T>
void relu_cpu(const T* x, index_t size, T* y, int threads = 0);

}  // namespace arcflow
