// CUDA engine of the convolutional NNGP / NTK (conv_kernel_cuda.hpp): the images and tables in device memory,
// the self pass at construction, one launch of the pair kernel (conv_tile.cuh) per block of rows.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "arcflow/conv_kernel_cuda.hpp"
#include "arcflow/conv_plan.hpp"
#include "arcflow/fc_kernel.hpp"
#include "check.cuh"
#include "conv_tile.cuh"

namespace arcflow {
namespace cuda_detail {
namespace {

// Device memory owned by the engine for its lifetime (cudaMalloc / cudaFree).
struct device_array {
  void* ptr = nullptr;
  device_array() = default;
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() {
    if (ptr) cudaFree(ptr);
  }
  void alloc(std::size_t bytes, const char* what) {
    if (!bytes) return;
    const cudaError_t e = cudaMalloc(&ptr, bytes);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      ptr = nullptr;
      throw allocation_error(std::string("arcflow (CUDA): out of device memory allocating ") + what + " (" +
                             std::to_string(bytes >> 20) + " MiB)");
    }
    ARCFLOW_CUDA_CHECK(e);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

template <class T>
void upload(device_array& d, const T* h, std::size_t n, const char* what) {
  d.alloc(n * sizeof(T), what);
  if (n) ARCFLOW_CUDA_CHECK(cudaMemcpy(d.ptr, h, n * sizeof(T), cudaMemcpyHostToDevice));
}

}  // namespace
}  // namespace cuda_detail

template <class T>
struct conv_engine_cuda<T>::state {
  conv_layout L;
  std::vector<conv_op> ops;
  index_t n1 = 0, n2 = 0, h = 0, w = 0, c = 0;
  bool symmetric = false, want_ntk = false;
  int device = 0;
  index_t blocks = 1;
  cuda_detail::device_array x1, x2, stages, tab1, tab2, scratch;
  std::vector<T> self_nngp, self_ntk;  // k(x, x) of x1, then (not symmetric) of x2

  cuda_detail::conv_args<T> args() const {
    cuda_detail::conv_args<T> a{};
    a.st = stages.as<conv_stage>();
    a.nst = int(L.st.size());
    a.x1 = x1.as<T>();
    a.x2 = symmetric ? x1.as<T>() : x2.as<T>();
    a.n1 = n1;
    a.n2 = n2;
    a.h = h;
    a.w = w;
    a.c = c;
    a.diag_mode = L.diag_mode ? 1 : 0;
    a.want_ntk = want_ntk ? 1 : 0;
    a.symmetric = symmetric ? 1 : 0;
    a.tab1 = tab1.as<T>();
    a.tab2 = symmetric ? tab1.as<T>() : tab2.as<T>();
    a.tab_len = L.tab_len;
    a.scratch = scratch.as<T>();
    a.buf_len = L.buf_len;
    return a;
  }
};

template <class T>
conv_engine_cuda<T>::conv_engine_cuda(const T* x1, index_t n1, const T* x2, index_t n2, index_t h, index_t w, index_t c,
                                      bool symmetric, const std::vector<conv_op>& ops, bool want_ntk, int device)
    : st_(new state) {
  using namespace cuda_detail;
  std::unique_ptr<state> own(st_);
  state& s = *st_;
  ARCFLOW_CHECK(n1 >= 0 && n2 >= 0 && h >= 1 && w >= 1 && c >= 1, "bad image shape");
  ARCFLOW_CHECK(!symmetric || (x2 == x1 && n2 == n1), "symmetric needs x2 == x1");
  s.L = make_conv_layout(h, w, ops);
  ARCFLOW_CHECK(s.L.buf_len < index_t(1) << 30,
                "the images are too large for the CUDA engine (pixel-pair arrays of more than 2^30 values)");
  s.ops = ops;
  s.n1 = n1;
  s.n2 = n2;
  s.h = h;
  s.w = w;
  s.c = c;
  s.symmetric = symmetric;
  s.want_ntk = want_ntk;
  device_guard guard(device);
  ARCFLOW_CUDA_CHECK(cudaGetDevice(&s.device));
  const std::size_t img = std::size_t(h * w * c);
  upload(s.x1, x1, std::size_t(n1) * img, "the images x1");
  if (!symmetric) upload(s.x2, x2, std::size_t(n2) * img, "the images x2");
  upload(s.stages, s.L.st.data(), s.L.st.size(), "the network");
  s.tab1.alloc(std::size_t(n1 * s.L.tab_len) * sizeof(T), "the variance tables of x1");
  if (!symmetric) s.tab2.alloc(std::size_t(n2 * s.L.tab_len) * sizeof(T), "the variance tables of x2");

  // Resident blocks: at most 4 per multiprocessor, as many as a quarter of the free memory holds.
  int sms = 1;
  ARCFLOW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, s.device));
  std::size_t free_b = 0, total_b = 0;
  ARCFLOW_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const std::size_t per_block = std::size_t((want_ntk ? 4 : 2) * s.L.buf_len) * sizeof(T);
  const index_t items = std::max<index_t>(1, std::max(n1 + (symmetric ? 0 : n2), n1 * n2));
  s.blocks = std::min<index_t>({index_t(4) * sms, index_t(free_b / 4 / per_block), items});
  if (s.blocks < 1) {
    if (free_b / 2 < per_block)
      throw allocation_error("arcflow (CUDA): one pair's pixel-pair buffers (" + std::to_string(per_block >> 20) +
                             " MiB) do not fit in the device's free memory (" + std::to_string(free_b >> 20) +
                             " MiB); use smaller images or the CPU");
    s.blocks = 1;
  }
  s.scratch.alloc(std::size_t(s.blocks) * per_block, "the pixel-pair buffers");

  const index_t n_self = n1 + (symmetric ? 0 : n2);
  s.self_nngp.assign(std::size_t(n_self), T(0));
  s.self_ntk.assign(std::size_t(n_self), T(0));
  if (n_self == 0) {
    own.release();
    return;
  }
  device_array dn, dt, dbad;
  dn.alloc(std::size_t(n_self) * sizeof(T), "k(x, x)");
  if (want_ntk) dt.alloc(std::size_t(n_self) * sizeof(T), "k(x, x)");
  dbad.alloc(std::size_t(n_self) * sizeof(int), "k(x, x)");
  conv_args<T> a = s.args();
  a.self = 1;
  a.self_nngp = dn.as<T>();
  a.self_ntk = dt.as<T>();
  a.bad = dbad.as<int>();
  conv_pair_kernel<T><<<unsigned(std::min(s.blocks, n_self)), CONV_THREADS>>>(a);
  ARCFLOW_CUDA_CHECK(cudaGetLastError());
  ARCFLOW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int> bad(std::size_t(n_self), -1);
  ARCFLOW_CUDA_CHECK(cudaMemcpy(bad.data(), dbad.ptr, bad.size() * sizeof(int), cudaMemcpyDeviceToHost));
  ARCFLOW_CUDA_CHECK(cudaMemcpy(s.self_nngp.data(), dn.ptr, std::size_t(n_self) * sizeof(T), cudaMemcpyDeviceToHost));
  if (want_ntk)
    ARCFLOW_CUDA_CHECK(cudaMemcpy(s.self_ntk.data(), dt.ptr, std::size_t(n_self) * sizeof(T), cudaMemcpyDeviceToHost));
  int first_bad = -1;
  for (int b : bad)
    if (b >= 0 && (first_bad < 0 || b < first_bad)) first_bad = b;
  if (first_bad >= 0) throw fp_overflow(conv_overflow_message(ops, first_bad, sizeof(T) == 4));
  own.release();
}

template <class T>
conv_engine_cuda<T>::~conv_engine_cuda() {
  delete st_;
}

template <class T>
index_t conv_engine_cuda<T>::blocks() const {
  return st_->blocks;
}

template <class T>
void conv_engine_cuda<T>::rows(index_t r0, index_t r1, T* nngp, T* ntk) const {
  using namespace cuda_detail;
  const state& s = *st_;
  ARCFLOW_CHECK(0 <= r0 && r0 <= r1 && r1 <= s.n1, "row range out of bounds");
  ARCFLOW_CHECK(!ntk || s.want_ntk, "the engine was built without the NTK");
  const index_t rows = r1 - r0, n2 = s.n2;
  if (rows == 0 || n2 == 0 || (!nngp && !ntk)) return;
  device_guard guard(s.device);
  const std::size_t count = std::size_t(rows * n2);
  device_array dn, dt;
  if (nngp) dn.alloc(count * sizeof(T), "a block of output rows");
  if (ntk) dt.alloc(count * sizeof(T), "a block of output rows");
  conv_args<T> a = s.args();
  a.self = 0;
  a.r0 = r0;
  a.rows = rows;
  a.out_nngp = dn.as<T>();
  a.out_ntk = dt.as<T>();
  conv_pair_kernel<T><<<unsigned(std::min<index_t>(s.blocks, rows * n2)), CONV_THREADS>>>(a);
  ARCFLOW_CUDA_CHECK(cudaGetLastError());
  ARCFLOW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> tmp(count);
  for (int k = 0; k < 2; ++k) {
    T* out = k == 0 ? nngp : ntk;
    if (!out) continue;
    ARCFLOW_CUDA_CHECK(cudaMemcpy(tmp.data(), (k == 0 ? dn : dt).ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    conv_scatter_rows(tmp.data(), r0, rows, n2, s.symmetric, (k == 0 ? s.self_nngp : s.self_ntk).data(), out);
  }
}

template <class T>
void conv_engine_cuda<T>::diag(T* nngp, T* ntk) const {
  const state& s = *st_;
  ARCFLOW_CHECK(!ntk || s.want_ntk, "the engine was built without the NTK");
  for (index_t i = 0; i < s.n1; ++i) {
    if (nngp) nngp[i] = s.self_nngp[std::size_t(i)];
    if (ntk) ntk[i] = s.self_ntk[std::size_t(i)];
  }
}

template class conv_engine_cuda<float>;
template class conv_engine_cuda<double>;

}  // namespace arcflow
