// CUDA launchers of the fused NNGP/NTK recursion: row norms on the device, per-row tables (and the diagonal
// k(x, x)) on the host, one tile kernel per activation family, explicit float/double instantiations.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "arcflow/fc_kernel_cuda.hpp"
#include "check.cuh"
#include "fc_tile.cuh"

namespace arcflow {
namespace cuda_detail {
namespace {

// |x_i|^2 in double, summed in the CPU engine's order with every product and sum rounded on its own, so
// the tables (and the near-collinear test built on them) match the CPU bit for bit.
template <class T>
__global__ void row_norm2_kernel(const T* x, index_t n, index_t d, double* out) {
  const index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T* xi = x + i * d;
  double acc = 0.0;
  for (index_t k = 0; k < d; ++k) {
    const double v = double(xi[k]);
    acc = __dadd_rn(acc, __dmul_rn(v, v));
  }
  out[i] = acc;
}

// Device memory owned for the duration of one call, released in stream order (also on exceptions).
// Devices without stream-ordered allocation (cudaMallocAsync: cudaErrorNotSupported) get cudaMalloc, and the
// release then waits for the stream first.
struct device_buffer {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  bool pooled = true;
  device_buffer(std::size_t bytes, cudaStream_t s) : stream(s) {
    if (!bytes) return;
    const cudaError_t e = cudaMallocAsync(&ptr, bytes, s);
    if (e == cudaErrorNotSupported) {
      cudaGetLastError();
      ptr = nullptr;
      pooled = false;
      ARCFLOW_CUDA_CHECK(cudaMalloc(&ptr, bytes));
    } else {
      ARCFLOW_CUDA_CHECK(e);
    }
  }
  ~device_buffer() {
    if (!ptr) return;
    if (pooled) {
      cudaFreeAsync(ptr, stream);
    } else {
      cudaStreamSynchronize(stream);
      cudaFree(ptr);
    }
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

void check_params(index_t n1, index_t n2, index_t d, const fc_params& p, bool symmetric) {
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && d >= 0, "negative shape");
  ARCFLOW_CHECK(p.depth >= 0, "depth must be >= 0");
  ARCFLOW_CHECK(p.fix_dep >= 0 && p.fix_dep <= p.depth + 1, "fix_dep out of range");
  ARCFLOW_CHECK(p.w_var >= 0 && p.b_var >= 0 && p.gram_scale >= 0, "variances must be >= 0");
  ARCFLOW_CHECK(!symmetric || n1 == n2, "the symmetric case needs n2 == n1");
  ARCFLOW_CHECK(p.act.kind != act_kind::monomial || p.act.n >= 0, "monomial order must be >= 0");
}

template <class T>
void norms_to_host(const T* x, index_t n, index_t d, cudaStream_t st, std::vector<double>& out) {
  out.assign(std::size_t(n), 0.0);
  device_buffer buf(std::size_t(n) * sizeof(double), st);
  const unsigned blocks = unsigned((n + 255) / 256);
  row_norm2_kernel<T><<<blocks, 256, 0, st>>>(x, n, d, buf.as<double>());
  ARCFLOW_CUDA_CHECK(cudaGetLastError());
  ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(out.data(), buf.ptr, std::size_t(n) * sizeof(double), cudaMemcpyDeviceToHost, st));
  ARCFLOW_CUDA_CHECK(cudaStreamSynchronize(st));
}

}  // namespace
}  // namespace cuda_detail

template <class T>
void fc_kernels_cuda(const T* x1, const T* x2, index_t n1, index_t n2, index_t d, const fc_params& p, T* nngp, T* ntk,
                     int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  const bool symmetric = x2 == nullptr;
  check_params(n1, n2, d, p, symmetric);
  if (n1 == 0 || n2 == 0 || (!nngp && !ntk)) return;
  ARCFLOW_CHECK(d >= 1, "the CUDA backend needs d >= 1");
  ARCFLOW_CHECK(x1 != nullptr, "x1 is a null pointer");
  constexpr index_t BM = TY * tile_cfg<T>::TM, BN = TX * tile_cfg<T>::TN;
  const index_t gy = (n1 + BM - 1) / BM, gx = (n2 + BN - 1) / BN;
  ARCFLOW_CHECK(gy <= 65535 && gx <= 2147483647, "too many rows for one CUDA launch");
  device_guard guard(device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (symmetric) x2 = x1;
  ARCFLOW_CHECK(x2 != nullptr, "x2 is a null pointer");

  std::vector<double> nrm1, nrm2;
  norms_to_host(x1, n1, d, st, nrm1);
  if (!symmetric) norms_to_host(x2, n2, d, st, nrm2);
  const index_t np1 = round_up(std::max<index_t>(n1, 1), TABLE_PAD);
  const index_t np2 = symmetric ? np1 : round_up(std::max<index_t>(n2, 1), TABLE_PAD);
  const std::size_t per_row = std::size_t(p.depth + 1) * 5 + 2;
  device_buffer tab1(per_row * std::size_t(np1) * sizeof(T), st);
  device_buffer tab2(symmetric ? 0 : per_row * std::size_t(np2) * sizeof(T), st);

  by_activation<T, false>(p, [&](auto act) {
    using Act = decltype(act);
    {
      const std::vector<T> h = build_table<T, Act>(nrm1, n1, np1, p);
      // From pageable memory cudaMemcpyAsync returns once the data is staged: `h` may go out of scope.
      ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(tab1.ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice, st));
    }
    if (!symmetric) {
      const std::vector<T> h = build_table<T, Act>(nrm2, n2, np2, p);
      ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(tab2.ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice, st));
    }
    tile_args<T> a;
    a.x1 = x1;
    a.x2 = x2;
    a.n1 = n1;
    a.n2 = n2;
    a.d = d;
    a.tab1 = tab1.as<T>();
    a.tab2 = symmetric ? tab1.as<T>() : tab2.as<T>();
    a.np1 = np1;
    a.np2 = np2;
    a.nngp = nngp;
    a.ntk = ntk;
    a.depth = p.depth;
    a.fix_dep = p.fix_dep;
    a.symmetric = symmetric ? 1 : 0;
    a.bv = T(p.b_var);
    a.gs = T(p.gram_scale);
    a.sq_gs = T(std::sqrt(p.gram_scale));
    a.w_sd = T(std::sqrt(p.w_var));
    const dim3 grid{unsigned(gx), unsigned(gy), 1u};
    fc_tile_kernel<T, Act><<<grid, NTHREADS, 0, st>>>(a, act);
    ARCFLOW_CUDA_CHECK(cudaGetLastError());
  });
}

template <class T>
void fc_kernels_cuda_host(const T* x1, const T* x2, index_t n1, index_t n2, index_t d, const fc_params& p, T* nngp,
                          T* ntk, int device) {
  using namespace cuda_detail;
  const bool symmetric = x2 == nullptr;
  check_params(n1, n2, d, p, symmetric);
  if (n1 == 0 || n2 == 0 || (!nngp && !ntk)) return;
  ARCFLOW_CHECK(d >= 1, "the CUDA backend needs d >= 1");
  device_guard guard(device);
  owned_stream owner;
  const cudaStream_t st = owner.s;
  const std::size_t in1 = std::size_t(n1) * std::size_t(d) * sizeof(T);
  const std::size_t in2 = symmetric ? 0 : std::size_t(n2) * std::size_t(d) * sizeof(T);
  const std::size_t out = std::size_t(n1) * std::size_t(n2) * sizeof(T);
  {
    device_buffer dx1(in1, st), dx2(in2, st), dn(nngp ? out : 0, st), dt(ntk ? out : 0, st);
    if (in1) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(dx1.ptr, x1, in1, cudaMemcpyHostToDevice, st));
    if (in2) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(dx2.ptr, x2, in2, cudaMemcpyHostToDevice, st));
    const T* px2 = symmetric ? nullptr : dx2.as<T>();
    fc_kernels_cuda<T>(dx1.as<T>(), px2, n1, n2, d, p, dn.as<T>(), dt.as<T>(), -1,
                       reinterpret_cast<std::uintptr_t>(st));
    if (nngp) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(nngp, dn.ptr, out, cudaMemcpyDeviceToHost, st));
    if (ntk) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(ntk, dt.ptr, out, cudaMemcpyDeviceToHost, st));
    ARCFLOW_CUDA_CHECK(cudaStreamSynchronize(st));
  }
}

template <class T>
void fc_kernels_cuda_diag(const T* x1, index_t n1, index_t d, const fc_params& p, T* nngp, T* ntk, int device,
                          std::uintptr_t stream) {
  using namespace cuda_detail;
  check_params(n1, n1, d, p, true);
  if (n1 == 0 || (!nngp && !ntk)) return;
  ARCFLOW_CHECK(d >= 1, "the CUDA backend needs d >= 1");
  ARCFLOW_CHECK(x1 != nullptr, "x1 is a null pointer");
  device_guard guard(device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  std::vector<double> nrm;
  norms_to_host(x1, n1, d, st, nrm);
  std::vector<T> hn(nngp ? std::size_t(n1) : 0), ht(ntk ? std::size_t(n1) : 0);
  by_activation<T, false>(p, [&](auto act) {
    diag_values<T, decltype(act)>(nrm, n1, p, nngp ? hn.data() : nullptr, ntk ? ht.data() : nullptr);
  });
  // From pageable memory cudaMemcpyAsync returns once the data is staged: hn and ht may go out of scope.
  const std::size_t bytes = std::size_t(n1) * sizeof(T);
  if (nngp) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(nngp, hn.data(), bytes, cudaMemcpyHostToDevice, st));
  if (ntk) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(ntk, ht.data(), bytes, cudaMemcpyHostToDevice, st));
}

template <class T>
void fc_kernels_cuda_diag_host(const T* x1, index_t n1, index_t d, const fc_params& p, T* nngp, T* ntk, int device) {
  using namespace cuda_detail;
  check_params(n1, n1, d, p, true);
  if (n1 == 0 || (!nngp && !ntk)) return;
  ARCFLOW_CHECK(d >= 1, "the CUDA backend needs d >= 1");
  device_guard guard(device);
  owned_stream owner;
  const cudaStream_t st = owner.s;
  const std::size_t in = std::size_t(n1) * std::size_t(d) * sizeof(T), out = std::size_t(n1) * sizeof(T);
  device_buffer dx(in, st), dn(nngp ? out : 0, st), dt(ntk ? out : 0, st);
  ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(dx.ptr, x1, in, cudaMemcpyHostToDevice, st));
  fc_kernels_cuda_diag<T>(dx.as<T>(), n1, d, p, dn.as<T>(), dt.as<T>(), -1, reinterpret_cast<std::uintptr_t>(st));
  if (nngp) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(nngp, dn.ptr, out, cudaMemcpyDeviceToHost, st));
  if (ntk) ARCFLOW_CUDA_CHECK(cudaMemcpyAsync(ntk, dt.ptr, out, cudaMemcpyDeviceToHost, st));
  ARCFLOW_CUDA_CHECK(cudaStreamSynchronize(st));
}

template void fc_kernels_cuda<float>(const float*, const float*, index_t, index_t, index_t, const fc_params&, float*,
                                     float*, int, std::uintptr_t);
template void fc_kernels_cuda<double>(const double*, const double*, index_t, index_t, index_t, const fc_params&,
                                      double*, double*, int, std::uintptr_t);
template void fc_kernels_cuda_host<float>(const float*, const float*, index_t, index_t, index_t, const fc_params&,
                                          float*, float*, int);
template void fc_kernels_cuda_host<double>(const double*, const double*, index_t, index_t, index_t, const fc_params&,
                                           double*, double*, int);
template void fc_kernels_cuda_diag<float>(const float*, index_t, index_t, const fc_params&, float*, float*, int,
                                          std::uintptr_t);
template void fc_kernels_cuda_diag<double>(const double*, index_t, index_t, const fc_params&, double*, double*, int,
                                           std::uintptr_t);
template void fc_kernels_cuda_diag_host<float>(const float*, index_t, index_t, const fc_params&, float*, float*, int);
template void fc_kernels_cuda_diag_host<double>(const double*, index_t, index_t, const fc_params&, double*, double*,
                                                int);

}  // namespace arcflow
