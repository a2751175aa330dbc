// CUDA device query; the launchers are registered here when the CUDA backend is built.
#include "registry.hpp"

namespace arcflow::bind {

#ifdef ARCFLOW_WITH_CUDA
int cuda_device_count_impl();  // cpp/src/cuda/device.cu
#endif

void register_cuda(pybind11::module_& m) {
#ifdef ARCFLOW_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", []() { return cuda_device_count_impl(); });
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
#endif
}

}  // namespace arcflow::bind
