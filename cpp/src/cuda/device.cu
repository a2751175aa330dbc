// CUDA device queries and the arcsine throughput probe; none of them needs a device to be present.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "arcflow/fast_math.hpp"
#include "arcflow/fc_kernel_cuda.hpp"
#include "check.cuh"

namespace arcflow {
namespace {

// Chains of fm::asin_pos in registers, as in the CPU probe (asin_throughput in fc_kernel.cpp): each
// thread keeps four independent chains so the latency is hidden; the result is stored so it is not
// optimised away.
template <class T>
__global__ void asin_probe_kernel(T* out, int reps) {
  T v[4];
  for (int u = 0; u < 4; ++u) v[u] = T(0.1) + T(0.15) * T(u) + T(1e-7) * T(threadIdx.x);
  for (int r = 0; r < reps; ++r) {
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = T(0.6) * fm::asin_pos(v[u], T(1) - v[u]) + T(0.1);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v[0] + v[1] + v[2] + v[3];
}

}  // namespace

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller
    return 0;
  }
  return count;
}

std::string cuda_status() {
  int count = 0, driver = 0, runtime = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  cudaGetLastError();
  cudaDriverGetVersion(&driver);  // 0 without a driver
  cudaRuntimeGetVersion(&runtime);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  std::string s = "runtime " + ver(runtime) + ", driver " + (driver ? ver(driver) : std::string("none"));
  if (e != cudaSuccess)
    s += std::string(", cudaGetDeviceCount: ") + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
  else
    s += ", " + std::to_string(count) + " device(s)";
  return s;
}

cuda_device_info cuda_get_device_info(int device) {
  if (cuda_device_count() == 0) throw std::runtime_error("arcflow: no CUDA device");
  cudaDeviceProp prop;
  ARCFLOW_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  cuda_device_info info{};
  std::strncpy(info.name, prop.name, sizeof(info.name) - 1);
  info.total_memory = prop.totalGlobalMem;
  info.major = prop.major;
  info.minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  return info;
}

double cuda_asin_throughput(bool single_precision, int device) {
  const cuda_device_info info = cuda_get_device_info(device);
  int prev = 0;
  ARCFLOW_CUDA_CHECK(cudaGetDevice(&prev));
  ARCFLOW_CUDA_CHECK(cudaSetDevice(device));
  const int threads = 256, blocks = info.multiprocessors * 8, reps = 4096;
  void* buf = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  float ms = 0.f;
  auto run = [&]() {
    if (single_precision)
      asin_probe_kernel<float><<<blocks, threads>>>(static_cast<float*>(buf), reps);
    else
      asin_probe_kernel<double><<<blocks, threads>>>(static_cast<double*>(buf), reps);
    ARCFLOW_CUDA_CHECK(cudaGetLastError());
  };
  try {
    ARCFLOW_CUDA_CHECK(cudaMalloc(&buf, std::size_t(blocks) * threads * sizeof(double)));
    ARCFLOW_CUDA_CHECK(cudaEventCreate(&e0));
    ARCFLOW_CUDA_CHECK(cudaEventCreate(&e1));
    run();  // warm-up (module load, clocks)
    ARCFLOW_CUDA_CHECK(cudaEventRecord(e0));
    run();
    ARCFLOW_CUDA_CHECK(cudaEventRecord(e1));
    ARCFLOW_CUDA_CHECK(cudaEventSynchronize(e1));
    ARCFLOW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  } catch (...) {
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (buf) cudaFree(buf);
    cudaSetDevice(prev);
    throw;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(buf);
  cudaSetDevice(prev);
  return double(blocks) * threads * 4.0 * reps / (double(ms) * 1e-3);
}

namespace bind {
// Declared in cpp/bindings/cuda.cpp.
int cuda_device_count_impl() { return cuda_device_count(); }
}  // namespace bind

}  // namespace arcflow
