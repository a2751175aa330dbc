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
