// CUDA kernels and launchers of the invertible-block ops (invertible_cuda.hpp): a tiled shared-memory
// implicit-GEMM convolution and the elementwise ops, explicit float/double instantiations.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "arcflow/invertible_cuda.hpp"
#include "check.cuh"
#include "invertible_tile.cuh"

namespace arcflow {
namespace cuda_detail {
namespace {

// A launch error (bad configuration, no kernel image for this GPU, ...) names the op.
void check_launch(const char* what) { check_cuda(cudaGetLastError(), what, __FILE__, __LINE__); }

template <class T, int BM, int BN>
__global__ void __launch_bounds__(conv_cfg::NTHREADS) conv2d_kernel(const conv_args<T> g) {
  __shared__ T As[conv_cfg::BK * BM];
  __shared__ T Bs[conv_cfg::BK * BN];
  const int tid = int(threadIdx.x);
  const index_t p0 = index_t(blockIdx.x) * BN, m0 = index_t(blockIdx.y) * BM;
  T acc[conv_cfg::TM][conv_cfg::TN];
#pragma unroll
  for (int i = 0; i < conv_cfg::TM; ++i)
#pragma unroll
    for (int j = 0; j < conv_cfg::TN; ++j) acc[i][j] = T(0);
  const conv_pixel q = conv_thread_pixel<T, BN>(g, tid, p0);
  for (int k0 = 0; k0 < g.K; k0 += conv_cfg::BK) {
    conv_load_tile<T, BM, BN>(g, tid, m0, q, k0, As, Bs);
    __syncthreads();
    conv_mma<T, BM, BN>(tid, As, Bs, acc);
    __syncthreads();
  }
  conv_store<T, BM, BN>(g, tid, m0, p0, acc);
}

template <class T, int BM, int BN>
void launch_conv(const conv_args<T>& g, cudaStream_t st) {
  const index_t gx = (g.npix + BN - 1) / BN, gy = (g.m + BM - 1) / BM;
  ARCFLOW_CHECK(gx <= 2147483647 && gy <= 65535, "conv2d_cuda: too many pixels or channels for one launch");
  conv2d_kernel<T, BM, BN><<<dim3(unsigned(gx), unsigned(gy)), conv_cfg::NTHREADS, 0, st>>>(g);
  check_launch("conv2d_cuda kernel launch");
}

template <class T>
__global__ void channel_affine_kernel(const T* x, index_t total, index_t c, index_t hw, const T* scale, const T* shift,
                                      bool relu, T* y) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x)
    y[i] = channel_affine_value(x, scale, shift, relu, i, c, hw);
}

template <class T>
__global__ void actnorm_kernel(const T* x, index_t total, index_t c, index_t hw, const T* loc, const T* scale,
                               bool inverse, T* y) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x)
    y[i] = actnorm_value(x, loc, scale, inverse, i, c, hw);
}

template <class T, bool Inverse>
__global__ void psi_kernel(const T* in, index_t total, index_t c, index_t h, index_t w, index_t b, T* out) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t src = psi_source(i, c, h, w, b);
    if (Inverse)
      out[src] = in[i];
    else
      out[i] = in[src];
  }
}

template <class T>
__global__ void affine_coupling_kernel(const T* x, const T* net, index_t total, index_t c1, index_t c2, index_t hw,
                                       double clamp, bool inverse, T* y, T* s_out) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x)
    y[i] = affine_coupling_value(x, net, i, c1, c2, hw, clamp, inverse, s_out);
}

template <class T>
__global__ void channel_copy_kernel(const T* src, index_t total, index_t cs, index_t s0, T* dst, index_t cd, index_t d0,
                                    index_t count, index_t hw) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    index_t a, b;
    channel_copy_offsets(i, count, hw, cs, s0, cd, d0, a, b);
    dst[b] = src[a];
  }
}

// Grid-stride launches of 256 threads, at most 65535 * 8 blocks (the loops cover the rest).
unsigned elementwise_blocks(index_t total) {
  const index_t b = (total + 255) / 256;
  return unsigned(b < 65535 * 8 ? b : 65535 * 8);
}

}  // namespace
}  // namespace cuda_detail

template <typename T>
void conv2d_cuda(const Conv2dShape& s, const T* x, const T* weight, const T* bias, const T* in_scale, const T* in_shift,
                 bool in_relu, T alpha, const T* addend, T* out, int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(s.n >= 0 && s.c > 0 && s.h > 0 && s.w > 0, "conv2d_cuda: bad input shape");
  ARCFLOW_CHECK(s.m > 0 && s.kh > 0 && s.kw > 0, "conv2d_cuda: bad weight shape");
  ARCFLOW_CHECK(s.stride >= 1 && s.pad >= 0, "conv2d_cuda: stride must be >= 1 and padding >= 0");
  ARCFLOW_CHECK(s.h + 2 * s.pad >= s.kh && s.w + 2 * s.pad >= s.kw, "conv2d_cuda: kernel larger than the padded input");
  ARCFLOW_CHECK((in_scale == nullptr) == (in_shift == nullptr), "conv2d_cuda: in_scale and in_shift go together");
  ARCFLOW_CHECK(s.c * s.kh * s.kw < (index_t(1) << 30) && s.stride < (1 << 20) && s.pad < (1 << 20),
                "conv2d_cuda: kernel too large");
  if (s.n == 0) return;
  ARCFLOW_CHECK(x && weight && out, "conv2d_cuda: null pointer");
  const conv_args<T> g = make_conv_args<T>(s, x, weight, bias, in_scale, in_shift, in_relu, alpha, addend, out);
  device_guard guard(device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (conv_use_wide_tile(s.m))
    launch_conv<T, 16, 256>(g, st);
  else
    launch_conv<T, 64, 64>(g, st);
}

template <typename T>
void channel_affine_cuda(const T* x, index_t n, index_t c, index_t hw, const T* scale, const T* shift, bool relu, T* y,
                         int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(n >= 0 && c >= 0 && hw >= 0, "channel_affine_cuda: negative shape");
  const index_t total = n * c * hw;
  if (total == 0) return;
  device_guard guard(device);
  channel_affine_kernel<T><<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, total, c, hw, scale, shift, relu, y);
  check_launch("channel_affine_cuda kernel launch");
}

template <typename T>
void psi_forward_cuda(const T* x, index_t n, index_t c, index_t h, index_t w, index_t b, T* y, int device,
                      std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(b >= 1 && h % b == 0 && w % b == 0, "psi: h and w must be divisible by the block size");
  const index_t total = n * c * h * w;
  if (total == 0) return;
  device_guard guard(device);
  psi_kernel<T, false>
      <<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(x, total, c, h, w, b, y);
  check_launch("psi_forward_cuda kernel launch");
}

template <typename T>
void psi_inverse_cuda(const T* y, index_t n, index_t c, index_t h, index_t w, index_t b, T* x, int device,
                      std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(b >= 1 && h % b == 0 && w % b == 0, "psi_inverse: h and w must be divisible by the block size");
  const index_t total = n * c * h * w;
  if (total == 0) return;
  device_guard guard(device);
  psi_kernel<T, true>
      <<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(y, total, c, h, w, b, x);
  check_launch("psi_inverse_cuda kernel launch");
}

template <typename T>
void actnorm_cuda(const T* x, index_t n, index_t c, index_t hw, const T* loc, const T* scale, bool inverse, T* y,
                  int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(n >= 0 && c >= 0 && hw >= 0, "actnorm_cuda: negative shape");
  const index_t total = n * c * hw;
  if (total == 0) return;
  device_guard guard(device);
  actnorm_kernel<T><<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(x, total, c, hw, loc,
                                                                                                   scale, inverse, y);
  check_launch("actnorm_cuda kernel launch");
}

template <typename T>
void affine_coupling_cuda(const T* x, const T* net, index_t n, index_t c1, index_t c2, index_t hw, double clamp,
                          bool inverse, T* y, T* s_out, int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(n >= 0 && c1 >= 0 && c2 >= 0 && hw >= 0, "affine_coupling_cuda: negative shape");
  const index_t total = n * (c1 + c2) * hw;
  if (total == 0) return;
  device_guard guard(device);
  affine_coupling_kernel<T><<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, net, total, c1, c2, hw, clamp, inverse, y, s_out);
  check_launch("affine_coupling_cuda kernel launch");
}

template <typename T>
void channel_copy_cuda(const T* src, index_t n, index_t cs, index_t s0, T* dst, index_t cd, index_t d0, index_t count,
                       index_t hw, int device, std::uintptr_t stream) {
  using namespace cuda_detail;
  ARCFLOW_CHECK(n >= 0 && count >= 0 && hw >= 0 && s0 >= 0 && d0 >= 0 && s0 + count <= cs && d0 + count <= cd,
                "channel_copy_cuda: channel range out of bounds");
  const index_t total = n * count * hw;
  if (total == 0) return;
  device_guard guard(device);
  channel_copy_kernel<T><<<elementwise_blocks(total), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      src, total, cs, s0, dst, cd, d0, count, hw);
  check_launch("channel_copy_cuda kernel launch");
}

std::uintptr_t cuda_buffer_alloc(std::size_t bytes, int device) {
  cuda_detail::device_guard guard(device);
  void* p = nullptr;
  ARCFLOW_CUDA_CHECK(cudaMalloc(&p, bytes));
  return reinterpret_cast<std::uintptr_t>(p);
}

void cuda_buffer_free(std::uintptr_t ptr) { ARCFLOW_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr))); }

void cuda_copy_to_device(std::uintptr_t dst, const void* src, std::size_t bytes) {
  ARCFLOW_CUDA_CHECK(cudaMemcpy(reinterpret_cast<void*>(dst), src, bytes, cudaMemcpyHostToDevice));
}

void cuda_copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes) {
  ARCFLOW_CUDA_CHECK(cudaMemcpy(dst, reinterpret_cast<const void*>(src), bytes, cudaMemcpyDeviceToHost));
}

#define ARCFLOW_INV_CUDA_INSTANTIATE(T)                                                                                \
  template void conv2d_cuda<T>(const Conv2dShape&, const T*, const T*, const T*, const T*, const T*, bool, T,          \
                               const T*, T*, int, std::uintptr_t);                                                     \
  template void channel_affine_cuda<T>(const T*, index_t, index_t, index_t, const T*, const T*, bool, T*, int,         \
                                       std::uintptr_t);                                                                \
  template void psi_forward_cuda<T>(const T*, index_t, index_t, index_t, index_t, index_t, T*, int, std::uintptr_t);   \
  template void psi_inverse_cuda<T>(const T*, index_t, index_t, index_t, index_t, index_t, T*, int, std::uintptr_t);   \
  template void actnorm_cuda<T>(const T*, index_t, index_t, index_t, const T*, const T*, bool, T*, int,                \
                                std::uintptr_t);                                                                       \
  template void affine_coupling_cuda<T>(const T*, const T*, index_t, index_t, index_t, index_t, double, bool, T*, T*,  \
                                        int, std::uintptr_t);                                                          \
  template void channel_copy_cuda<T>(const T*, index_t, index_t, index_t, T*, index_t, index_t, index_t, index_t, int, \
                                     std::uintptr_t);

ARCFLOW_INV_CUDA_INSTANTIATE(float)
ARCFLOW_INV_CUDA_INSTANTIATE(double)
#undef ARCFLOW_INV_CUDA_INSTANTIATE

}  // namespace arcflow
