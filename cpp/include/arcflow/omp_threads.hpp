// The thread count of a CPU op's OpenMP region: the caller's request, or OpenMP's default.
#pragma once
// Contract: host only (the CPU sources include it, never CUDA). threads <= 0 means omp_get_max_threads();
// without OpenMP every op runs on one thread.
#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif

namespace arcflow {

inline int omp_threads(int threads) {
#ifdef ARCFLOW_HAVE_OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

}  // namespace arcflow
