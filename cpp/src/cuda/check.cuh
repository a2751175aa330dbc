// Error checking for CUDA runtime calls: a failure becomes std::runtime_error naming the call.
#pragma once
// Contract: ARCFLOW_CUDA_CHECK(call) evaluates `call` once; on anything but cudaSuccess it throws
// std::runtime_error("arcflow: <call> failed: <cudaGetErrorString> (<error name>) at file:line"), which
// pybind11 turns into RuntimeError. Host code only.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace arcflow::cuda_detail {

inline void check_cuda(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("arcflow: ") + call + " failed: " + cudaGetErrorString(err) + " (" +
                           cudaGetErrorName(err) + ") at " + file + ":" + std::to_string(line));
}

}  // namespace arcflow::cuda_detail

#define ARCFLOW_CUDA_CHECK(call) ::arcflow::cuda_detail::check_cuda((call), #call, __FILE__, __LINE__)

namespace arcflow::cuda_detail {

// Selects a device for the duration of a call and restores the previous one; no device (or no driver) is a
// std::runtime_error that says so.
struct device_guard {
  int prev = -1;
  explicit device_guard(int device) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      cudaGetLastError();  // clear the error state
      throw std::runtime_error(std::string("arcflow: no CUDA device (cudaGetDeviceCount: ") +
                               (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")");
    }
    ARCFLOW_CUDA_CHECK(cudaGetDevice(&prev));
    if (device >= 0 && device != prev) ARCFLOW_CUDA_CHECK(cudaSetDevice(device));
  }
  ~device_guard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
};

// A non-blocking stream for one call, synchronised and destroyed when the call returns or throws (buffers
// freed in stream order are gone before the stream is).
struct owned_stream {
  cudaStream_t s = nullptr;
  owned_stream() { ARCFLOW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~owned_stream() {
    cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
  }
  owned_stream(const owned_stream&) = delete;
  owned_stream& operator=(const owned_stream&) = delete;
};

}  // namespace arcflow::cuda_detail
