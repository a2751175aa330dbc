// NNGP and NTK of a deep fully-connected network on a CUDA device: the host entry points.
#pragma once
// Contract (declarations only: no CUDA headers, so the bindings compile with the plain C++ compiler;
// the definitions live in cpp/src/cuda/fc_kernel.cu and exist only when ARCFLOW_WITH_CUDA is defined):
// - fc_kernels_cuda: x1 (n1 x d) and x2 (n2 x d) are C-contiguous arrays of T in DEVICE memory; x2 == nullptr
//   is the symmetric case (x2 = x1, n2 must equal n1: only tiles on or above the diagonal are computed and
//   mirrored, so the result is exactly symmetric). nngp and ntk are C-contiguous n1 x n2 DEVICE arrays or
//   nullptr. The work is queued on `stream` (a cudaStream_t as an integer, 0 = the legacy default stream) of
//   `device` (-1 = the current device) and is asynchronous except for one small synchronisation: the row
//   norms (n doubles) come back to the host, which builds the per-row tables (docs/mathematics.md §1) in
//   double exactly as the CPU engine does and uploads them. Temporaries are stream-ordered
//   (cudaMallocAsync / cudaFreeAsync; cudaMalloc where memory pools are unsupported). As for any asynchronous
//   CUDA call, the caller keeps x1, x2 and the outputs alive until the stream has reached this work.
// - fc_kernels_cuda_host: the same with x1, x2, nngp, ntk in HOST memory; copies in and out, synchronous.
//   The device must hold x1, x2 and the requested outputs at once.
// - d must be >= 1 (the Python layer rejects d = 0 with n1, n2 > 0).
// - Same numbers as fc_engine<T> (the CPU backend) up to rounding: the same per-pair formulas
//   (activations.hpp) and the same refinement of near-collinear first-layer pairs.
// - Throws std::invalid_argument for inconsistent arguments, std::runtime_error (naming the CUDA call and
//   cudaGetErrorString) when a CUDA call fails, including "no CUDA device". Thread-safety: reentrant.
#include <cstddef>
#include <cstdint>
#include <string>

#include "arcflow/common.hpp"
#include "arcflow/fc_kernel.hpp"

namespace arcflow {

template <class T>
void fc_kernels_cuda(const T* x1, const T* x2, index_t n1, index_t n2, index_t d, const fc_params& p, T* nngp, T* ntk,
                     int device, std::uintptr_t stream);

template <class T>
void fc_kernels_cuda_host(const T* x1, const T* x2, index_t n1, index_t n2, index_t d, const fc_params& p, T* nngp,
                          T* ntk, int device);

// k(x, x) for the rows of x1 (DEVICE pointers, as fc_kernels_cuda): nngp and ntk are n1-vectors or nullptr.
template <class T>
void fc_kernels_cuda_diag(const T* x1, index_t n1, index_t d, const fc_params& p, T* nngp, T* ntk, int device,
                          std::uintptr_t stream);
template <class T>
void fc_kernels_cuda_diag_host(const T* x1, index_t n1, index_t d, const fc_params& p, T* nngp, T* ntk, int device);

// Number of visible CUDA devices; 0 (never an exception) without a driver or a device.
int cuda_device_count() noexcept;

// One line for error messages: CUDA runtime and driver versions, and the device count or why there is none
// (for example a driver older than the runtime this module was built with). Never throws CUDA errors.
std::string cuda_status();

// Name and total memory (bytes) of a device, for benchmarks and error messages.
struct cuda_device_info {
  char name[256];
  std::size_t total_memory;
  int major, minor, multiprocessors;
};
cuda_device_info cuda_get_device_info(int device);

// Throughput (elements per second) of the branch-free arcsine fm::asin_pos on the whole device, in
// registers (no memory traffic): the arccos term of the roofline in bench/gpu_compare.py.
double cuda_asin_throughput(bool single_precision, int device);

extern template void fc_kernels_cuda<float>(const float*, const float*, index_t, index_t, index_t, const fc_params&,
                                            float*, float*, int, std::uintptr_t);
extern template void fc_kernels_cuda<double>(const double*, const double*, index_t, index_t, index_t, const fc_params&,
                                             double*, double*, int, std::uintptr_t);
extern template void fc_kernels_cuda_host<float>(const float*, const float*, index_t, index_t, index_t,
                                                 const fc_params&, float*, float*, int);
extern template void fc_kernels_cuda_host<double>(const double*, const double*, index_t, index_t, index_t,
                                                  const fc_params&, double*, double*, int);
extern template void fc_kernels_cuda_diag<float>(const float*, index_t, index_t, const fc_params&, float*, float*, int,
                                                 std::uintptr_t);
extern template void fc_kernels_cuda_diag<double>(const double*, index_t, index_t, const fc_params&, double*, double*,
                                                  int, std::uintptr_t);
extern template void fc_kernels_cuda_diag_host<float>(const float*, index_t, index_t, const fc_params&, float*, float*,
                                                      int);
extern template void fc_kernels_cuda_diag_host<double>(const double*, index_t, index_t, const fc_params&, double*,
                                                       double*, int);

}  // namespace arcflow
