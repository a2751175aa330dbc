// channel_affine_cpu (inference batch-norm, optional ReLU) and relu_cpu.
#include "arcflow/batchnorm.hpp"

#include "arcflow/omp_threads.hpp"

namespace arcflow {

template <typename T>
void channel_affine_cpu(const T* x, index_t n, index_t c, index_t hw, const T* scale, const T* shift, bool relu, T* y,
                        int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(omp_threads(threads)) if (n * c * hw > (1 << 17))
  for (index_t in = 0; in < n; ++in)
    for (index_t ci = 0; ci < c; ++ci) {
      const T sc = scale[ci], sf = shift[ci];
      const T* src = x + (in * c + ci) * hw;
      T* dst = y + (in * c + ci) * hw;
      if (relu)
        for (index_t p = 0; p < hw; ++p) {
          const T v = src[p] * sc + sf;
          dst[p] = v > T(0) ? v : (v != v ? v : T(0));
        }
      else
        for (index_t p = 0; p < hw; ++p) dst[p] = src[p] * sc + sf;
    }
}

template <typename T>
void relu_cpu(const T* x, index_t size, T* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(omp_threads(threads)) if (size > (1 << 17))
  for (index_t i = 0; i < size; ++i) {
    const T v = x[i];
    y[i] = v > T(0) ? v : (v != v ? v : T(0));
  }
}

template void channel_affine_cpu<float>(const float*, index_t, index_t, index_t, const float*, const float*, bool,
                                        float*, int);
template void channel_affine_cpu<double>(const double*, index_t, index_t, index_t, const double*, const double*, bool,
                                         double*, int);
template void relu_cpu<float>(const float*, index_t, float*, int);
template void relu_cpu<double>(const double*, index_t, double*, int);

}  // namespace arcflow
