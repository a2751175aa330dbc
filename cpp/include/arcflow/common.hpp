// Shared basics of the arcflow C++ core: the index type, the input check and host/device qualifiers.
#pragma once
// Contract: header-only, no pybind11 and no CUDA headers. ARCFLOW_CHECK throws std::invalid_argument
// (pybind11 turns it into ValueError); it is for conditions that the Python layer should already have
// rejected, so it never fires on validated input.
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define ARCFLOW_HD __host__ __device__ __forceinline__
#else
#define ARCFLOW_HD inline
#endif

namespace arcflow {

using index_t = std::int64_t;

#define ARCFLOW_CHECK(cond, msg)                                                \
  do {                                                                          \
    if (!(cond)) throw std::invalid_argument(std::string("arcflow: ") + (msg)); \
  } while (0)

}  // namespace arcflow
