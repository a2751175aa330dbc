// psi_forward_cpu / psi_inverse_cpu: the reference i-RevNet space-to-depth order (docs/mathematics.md §2).
#include "arcflow/psi.hpp"

#include "arcflow/omp_threads.hpp"

namespace arcflow {

template <typename T>
void psi_forward_cpu(const T* x, index_t n, index_t c, index_t h, index_t w, index_t b, T* y, int threads) {
  ARCFLOW_CHECK(b >= 1 && h % b == 0 && w % b == 0, "psi: h and w must be divisible by the block size");
  const index_t ho = h / b, wo = w / b;
  if (b == 2) {
    // The i-RevNet case: one pass over each pair of input rows, four output rows written at once
    // (the stride-2 reads and writes vectorise as even/odd shuffles); the op is memory-bound.
#pragma omp parallel for collapse(2) schedule(static) num_threads(omp_threads(threads)) if (n * c * h * w > (1 << 17))
    for (index_t in = 0; in < n; ++in)
      for (index_t ci = 0; ci < c; ++ci) {
        const T* xc = x + (in * c + ci) * h * w;
        T* y0 = y + (in * 4 * c + ci) * ho * wo;  // (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1)
        T* y1 = y0 + c * ho * wo;
        T* y2 = y1 + c * ho * wo;
        T* y3 = y2 + c * ho * wo;
        for (index_t i = 0; i < ho; ++i) {
          const T* __restrict r0 = xc + 2 * i * w;
          const T* __restrict r1 = r0 + w;
          T* __restrict d0 = y0 + i * wo;
          T* __restrict d1 = y1 + i * wo;
          T* __restrict d2 = y2 + i * wo;
          T* __restrict d3 = y3 + i * wo;
          for (index_t j = 0; j < wo; ++j) {
            d0[j] = r0[2 * j];
            d1[j] = r0[2 * j + 1];
          }
          for (index_t j = 0; j < wo; ++j) {
            d2[j] = r1[2 * j];
            d3[j] = r1[2 * j + 1];
          }
        }
      }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static) num_threads(omp_threads(threads)) if (n * c * h * w > (1 << 17))
  for (index_t in = 0; in < n; ++in)
    for (index_t ci = 0; ci < c; ++ci) {
      const T* xc = x + (in * c + ci) * h * w;
      for (index_t dy = 0; dy < b; ++dy)
        for (index_t dx = 0; dx < b; ++dx) {
          T* yc = y + (in * b * b * c + (dy * b + dx) * c + ci) * ho * wo;
          for (index_t i = 0; i < ho; ++i) {
            const T* src = xc + (i * b + dy) * w + dx;
            T* dst = yc + i * wo;
            for (index_t j = 0; j < wo; ++j) dst[j] = src[j * b];
          }
        }
    }
}

template <typename T>
void psi_inverse_cpu(const T* y, index_t n, index_t c, index_t h, index_t w, index_t b, T* x, int threads) {
  ARCFLOW_CHECK(b >= 1 && h % b == 0 && w % b == 0, "psi_inverse: h and w must be divisible by the block size");
  const index_t ho = h / b, wo = w / b;
  if (b == 2) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(omp_threads(threads)) if (n * c * h * w > (1 << 17))
    for (index_t in = 0; in < n; ++in)
      for (index_t ci = 0; ci < c; ++ci) {
        T* xc = x + (in * c + ci) * h * w;
        const T* y0 = y + (in * 4 * c + ci) * ho * wo;
        const T* y1 = y0 + c * ho * wo;
        const T* y2 = y1 + c * ho * wo;
        const T* y3 = y2 + c * ho * wo;
        for (index_t i = 0; i < ho; ++i) {
          T* __restrict r0 = xc + 2 * i * w;
          T* __restrict r1 = r0 + w;
          const T* __restrict s0 = y0 + i * wo;
          const T* __restrict s1 = y1 + i * wo;
          const T* __restrict s2 = y2 + i * wo;
          const T* __restrict s3 = y3 + i * wo;
          for (index_t j = 0; j < wo; ++j) {
            r0[2 * j] = s0[j];
            r0[2 * j + 1] = s1[j];
            r1[2 * j] = s2[j];
            r1[2 * j + 1] = s3[j];
          }
        }
      }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static) num_threads(omp_threads(threads)) if (n * c * h * w > (1 << 17))
  for (index_t in = 0; in < n; ++in)
    for (index_t ci = 0; ci < c; ++ci) {
      T* xc = x + (in * c + ci) * h * w;
      for (index_t dy = 0; dy < b; ++dy)
        for (index_t dx = 0; dx < b; ++dx) {
          const T* yc = y + (in * b * b * c + (dy * b + dx) * c + ci) * ho * wo;
          for (index_t i = 0; i < ho; ++i) {
            T* dst = xc + (i * b + dy) * w + dx;
            const T* src = yc + i * wo;
            for (index_t j = 0; j < wo; ++j) dst[j * b] = src[j];
          }
        }
    }
}

template void psi_forward_cpu<float>(const float*, index_t, index_t, index_t, index_t, index_t, float*, int);
template void psi_forward_cpu<double>(const double*, index_t, index_t, index_t, index_t, index_t, double*, int);
template void psi_inverse_cpu<float>(const float*, index_t, index_t, index_t, index_t, index_t, float*, int);
template void psi_inverse_cpu<double>(const double*, index_t, index_t, index_t, index_t, index_t, double*, int);

}  // namespace arcflow
