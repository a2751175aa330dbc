// CUDA device query and the CUDA launchers of the kernel recursions (only when the backend is built).
// Validation and dtype choice live in python/arcflow/_cuda.py; here we check shapes and call C++.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "arcflow/fc_kernel.hpp"
#include "registry.hpp"
#ifdef ARCFLOW_WITH_CUDA
#include "arcflow/fc_kernel_cuda.hpp"
#endif

namespace py = pybind11;

namespace arcflow::bind {

#ifdef ARCFLOW_WITH_CUDA
int cuda_device_count_impl();  // cpp/src/cuda/device.cu

namespace {

template <class T>
T* dev_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Device pointers as integers (from __cuda_array_interface__): no copies, queued on `stream`.
template <class T>
void bind_device(py::module_& m, const char* name) {
  m.def(
      name,
      [](std::uintptr_t x1, std::uintptr_t x2, std::int64_t n1, std::int64_t n2, std::int64_t d, const fc_params& p,
         std::uintptr_t nngp, std::uintptr_t ntk, int device, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        fc_kernels_cuda<T>(dev_ptr<const T>(x1), dev_ptr<const T>(x2), n1, n2, d, p, dev_ptr<T>(nngp), dev_ptr<T>(ntk),
                           device, stream);
      },
      py::arg("x1"), py::arg("x2"), py::arg("n1"), py::arg("n2"), py::arg("d"), py::arg("params"), py::arg("nngp"),
      py::arg("ntk"), py::arg("device") = -1, py::arg("stream") = 0,
      "NNGP/NTK on device pointers (x2 = 0: symmetric); asynchronous on `stream`.");
}

template <class T>
using carray = py::array_t<T, py::array::c_style>;

// Host arrays: copied to the device, computed, copied back; returns (nngp or None, ntk or None).
template <class T>
void bind_host(py::module_& m, const char* name) {
  m.def(
      name,
      [](carray<T> x1, py::object x2o, const fc_params& p, bool want_nngp, bool want_ntk, int device) {
        if (x1.ndim() != 2) throw std::invalid_argument("arcflow: x1 must be 2-D");
        const bool symmetric = x2o.is_none();
        carray<T> x2 = symmetric ? x1 : py::cast<carray<T>>(x2o);
        if (x2.ndim() != 2 || x2.shape(1) != x1.shape(1))
          throw std::invalid_argument("arcflow: x2 must be 2-D with as many columns as x1");
        const std::int64_t n1 = x1.shape(0), n2 = x2.shape(0), d = x1.shape(1);
        py::object rn = py::none(), rt = py::none();
        T *pn = nullptr, *pt = nullptr;
        if (want_nngp) {
          carray<T> o({n1, n2});
          pn = o.mutable_data();
          rn = o;
        }
        if (want_ntk) {
          carray<T> o({n1, n2});
          pt = o.mutable_data();
          rt = o;
        }
        {
          py::gil_scoped_release nogil;
          fc_kernels_cuda_host<T>(x1.data(), symmetric ? nullptr : x2.data(), n1, n2, d, p, pn, pt, device);
        }
        return py::make_tuple(rn, rt);
      },
      py::arg("x1").noconvert(), py::arg("x2"), py::arg("params"), py::arg("want_nngp"), py::arg("want_ntk"),
      py::arg("device") = -1,
      "NNGP/NTK of host arrays on the GPU (x2 = None: symmetric); returns (nngp or None, ntk or None).");
}

template <class T>
void bind_diag(py::module_& m, const char* dev_name, const char* host_name) {
  m.def(
      dev_name,
      [](std::uintptr_t x1, std::int64_t n1, std::int64_t d, const fc_params& p, std::uintptr_t nngp,
         std::uintptr_t ntk, int device, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        fc_kernels_cuda_diag<T>(dev_ptr<const T>(x1), n1, d, p, dev_ptr<T>(nngp), dev_ptr<T>(ntk), device, stream);
      },
      py::arg("x1"), py::arg("n1"), py::arg("d"), py::arg("params"), py::arg("nngp"), py::arg("ntk"),
      py::arg("device") = -1, py::arg("stream") = 0,
      "k(x, x) for the rows of x1 on device pointers; asynchronous on `stream`.");
  m.def(
      host_name,
      [](carray<T> x1, const fc_params& p, bool want_nngp, bool want_ntk, int device) {
        if (x1.ndim() != 2) throw std::invalid_argument("arcflow: x1 must be 2-D");
        const std::int64_t n1 = x1.shape(0), d = x1.shape(1);
        py::object rn = py::none(), rt = py::none();
        T *pn = nullptr, *pt = nullptr;
        if (want_nngp) {
          carray<T> o(n1);
          pn = o.mutable_data();
          rn = o;
        }
        if (want_ntk) {
          carray<T> o(n1);
          pt = o.mutable_data();
          rt = o;
        }
        {
          py::gil_scoped_release nogil;
          fc_kernels_cuda_diag_host<T>(x1.data(), n1, d, p, pn, pt, device);
        }
        return py::make_tuple(rn, rt);
      },
      py::arg("x1").noconvert(), py::arg("params"), py::arg("want_nngp"), py::arg("want_ntk"), py::arg("device") = -1,
      "k(x, x) for the rows of a host array on the GPU; returns (nngp or None, ntk or None).");
}

}  // namespace
#endif

void register_cuda(pybind11::module_& m) {
#ifdef ARCFLOW_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", []() { return cuda_device_count_impl(); });
  m.def(
      "cuda_status", []() { return cuda_status(); },
      "CUDA runtime and driver versions and the device count, or why no device is usable.");
  bind_device<float>(m, "fc_kernels_cuda_f32");
  bind_device<double>(m, "fc_kernels_cuda_f64");
  bind_host<float>(m, "fc_kernels_cuda_host_f32");
  bind_host<double>(m, "fc_kernels_cuda_host_f64");
  bind_diag<float>(m, "fc_diag_cuda_f32", "fc_diag_cuda_host_f32");
  bind_diag<double>(m, "fc_diag_cuda_f64", "fc_diag_cuda_host_f64");
  m.def(
      "cuda_device_info",
      [](int device) {
        const cuda_device_info i = cuda_get_device_info(device);
        py::dict r;
        r["name"] = std::string(i.name);
        r["total_memory"] = i.total_memory;
        r["compute_capability"] = py::make_tuple(i.major, i.minor);
        r["multiprocessors"] = i.multiprocessors;
        return r;
      },
      py::arg("device") = 0);
  m.def_submodule("_bench").def(
      "asin_throughput",
      [](bool single, int device) {
        py::gil_scoped_release nogil;
        return cuda_asin_throughput(single, device);
      },
      py::arg("single_precision"), py::arg("device") = 0,
      "Arcsine (fm::asin_pos) throughput of the whole device, elements per second (for the roofline).");
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_status", []() { return std::string("built without CUDA"); });
#endif
}

}  // namespace arcflow::bind
