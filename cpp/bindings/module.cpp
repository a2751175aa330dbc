// The extension module arcflow._core: build facts plus each op's registration.
#include <pybind11/pybind11.h>

#include "registry.hpp"

#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "arcflow C++ core (internal; use the arcflow package)";
#ifdef ARCFLOW_HAVE_OPENMP
  m.attr("built_with_openmp") = true;
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("built_with_openmp") = false;
  m.def("omp_max_threads", []() { return 1; });
#endif
  arcflow::bind::register_fc_params(m);  // before the functions that take them
  arcflow::bind::register_fc_kernel(m);
  arcflow::bind::register_fc_grad(m);
  arcflow::bind::register_conv_kernel(m);
  arcflow::bind::register_invertible(m);
  arcflow::bind::register_cuda(m);
  arcflow::bind::register_cuda_invertible(m);
}
