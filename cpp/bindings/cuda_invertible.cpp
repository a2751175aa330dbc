// Bindings of the invertible-block ops on a CUDA device (invertible_cuda.hpp), only when the backend is built.
// Thin, as cuda.cpp: device pointers come as integers from __cuda_array_interface__ (0 = absent), Python
// (arcflow/invertible/_cuda_ops.py) validates shapes and dtypes and allocates; here the GIL is released and the
// launcher queues the work on `stream`. One name per op x dtype. CUDA failures raise RuntimeError naming the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.hpp"
#ifdef ARCFLOW_WITH_CUDA
#include "arcflow/invertible_cuda.hpp"
#endif

namespace py = pybind11;

namespace arcflow::bind {

#ifdef ARCFLOW_WITH_CUDA
namespace {

using ptr_t = std::uintptr_t;

template <class T>
T* dptr(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <class T>
void register_dtype(py::module_& m, const std::string& sfx) {
  m.def(("conv2d_cuda_" + sfx).c_str(),
        [](ptr_t x, ptr_t w, ptr_t bias, index_t n, index_t c, index_t h, index_t wd, index_t mo, index_t kh,
           index_t kw, index_t stride, index_t pad, ptr_t in_scale, ptr_t in_shift, bool in_relu, double alpha,
           ptr_t addend, ptr_t out, int device, ptr_t stream) {
          const Conv2dShape s{n, c, h, wd, mo, kh, kw, stride, pad};
          py::gil_scoped_release nogil;
          conv2d_cuda<T>(s, dptr<const T>(x), dptr<const T>(w), dptr<const T>(bias), dptr<const T>(in_scale),
                         dptr<const T>(in_shift), in_relu, static_cast<T>(alpha), dptr<const T>(addend), dptr<T>(out),
                         device, stream);
        },
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w_"),
        py::arg("m"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("pad"), py::arg("in_scale"),
        py::arg("in_shift"), py::arg("in_relu"), py::arg("alpha"), py::arg("addend"), py::arg("out"),
        py::arg("device") = -1, py::arg("stream") = 0,
        "out = [addend +] (alpha * conv2d(act(x), w) + bias) on device pointers (0 = absent); asynchronous.");
  m.def(("channel_affine_cuda_" + sfx).c_str(),
        [](ptr_t x, index_t n, index_t c, index_t hw, ptr_t scale, ptr_t shift, bool relu, ptr_t y, int device,
           ptr_t stream) {
          py::gil_scoped_release nogil;
          channel_affine_cuda<T>(dptr<const T>(x), n, c, hw, dptr<const T>(scale), dptr<const T>(shift), relu,
                                 dptr<T>(y), device, stream);
        },
        py::arg("x"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("scale"), py::arg("shift"), py::arg("relu"),
        py::arg("y"), py::arg("device") = -1, py::arg("stream") = 0);
  m.def(("psi_cuda_" + sfx).c_str(),
        [](ptr_t x, index_t n, index_t c, index_t h, index_t w, index_t b, ptr_t y, int device, ptr_t stream) {
          py::gil_scoped_release nogil;
          psi_forward_cuda<T>(dptr<const T>(x), n, c, h, w, b, dptr<T>(y), device, stream);
        },
        py::arg("x"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("block"), py::arg("y"),
        py::arg("device") = -1, py::arg("stream") = 0, "y = psi(x); (n, c, h, w) are x's sizes.");
  m.def(("psi_inverse_cuda_" + sfx).c_str(),
        [](ptr_t y, index_t n, index_t c, index_t h, index_t w, index_t b, ptr_t x, int device, ptr_t stream) {
          py::gil_scoped_release nogil;
          psi_inverse_cuda<T>(dptr<const T>(y), n, c, h, w, b, dptr<T>(x), device, stream);
        },
        py::arg("y"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("block"), py::arg("x"),
        py::arg("device") = -1, py::arg("stream") = 0, "x = psi_inverse(y); (n, c, h, w) are x's sizes.");
  m.def(("actnorm_cuda_" + sfx).c_str(),
        [](ptr_t x, index_t n, index_t c, index_t hw, ptr_t loc, ptr_t scale, bool inverse, ptr_t y, int device,
           ptr_t stream) {
          py::gil_scoped_release nogil;
          actnorm_cuda<T>(dptr<const T>(x), n, c, hw, dptr<const T>(loc), dptr<const T>(scale), inverse, dptr<T>(y),
                          device, stream);
        },
        py::arg("x"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("loc"), py::arg("scale"), py::arg("inverse"),
        py::arg("y"), py::arg("device") = -1, py::arg("stream") = 0);
  m.def(("affine_coupling_cuda_" + sfx).c_str(),
        [](ptr_t x, ptr_t net, index_t n, index_t c1, index_t c2, index_t hw, double clamp, bool inverse, ptr_t y,
           ptr_t s_out, int device, ptr_t stream) {
          py::gil_scoped_release nogil;
          affine_coupling_cuda<T>(dptr<const T>(x), dptr<const T>(net), n, c1, c2, hw, clamp, inverse, dptr<T>(y),
                                  dptr<T>(s_out), device, stream);
        },
        py::arg("x"), py::arg("net"), py::arg("n"), py::arg("c1"), py::arg("c2"), py::arg("hw"), py::arg("clamp"),
        py::arg("inverse"), py::arg("y"), py::arg("s_out"), py::arg("device") = -1, py::arg("stream") = 0);
  m.def(("channel_copy_cuda_" + sfx).c_str(),
        [](ptr_t src, index_t n, index_t cs, index_t s0, ptr_t dst, index_t cd, index_t d0, index_t count, index_t hw,
           int device, ptr_t stream) {
          py::gil_scoped_release nogil;
          channel_copy_cuda<T>(dptr<const T>(src), n, cs, s0, dptr<T>(dst), cd, d0, count, hw, device, stream);
        },
        py::arg("src"), py::arg("n"), py::arg("cs"), py::arg("s0"), py::arg("dst"), py::arg("cd"), py::arg("d0"),
        py::arg("count"), py::arg("hw"), py::arg("device") = -1, py::arg("stream") = 0,
        "dst[:, d0:d0+count] = src[:, s0:s0+count] for (n, C, hw) device arrays.");
}

}  // namespace
#endif

void register_cuda_invertible(pybind11::module_& m) {
#ifdef ARCFLOW_WITH_CUDA
  register_dtype<float>(m, "f32");
  register_dtype<double>(m, "f64");
  using bytes_t = py::array_t<std::uint8_t, py::array::c_style>;
  m.def(
      "cuda_buffer_alloc", [](std::size_t nbytes, int device) { return cuda_buffer_alloc(nbytes, device); },
      py::arg("nbytes"), py::arg("device") = -1, "cudaMalloc; returns the device pointer as an integer.");
  m.def("cuda_buffer_free", [](ptr_t p) { cuda_buffer_free(p); }, py::arg("ptr"));
  m.def(
      "cuda_copy_to_device",
      [](ptr_t dst, const bytes_t& src) {
        const void* s = src.data();
        const std::size_t n = std::size_t(src.size());
        py::gil_scoped_release nogil;
        cuda_copy_to_device(dst, s, n);
      },
      py::arg("dst"), py::arg("src").noconvert(), "Synchronous copy of a C-contiguous uint8 view to the device.");
  m.def(
      "cuda_copy_to_host",
      [](bytes_t& dst, ptr_t src) {
        void* d = dst.mutable_data();
        const std::size_t n = std::size_t(dst.size());
        py::gil_scoped_release nogil;
        cuda_copy_to_host(d, src, n);
      },
      py::arg("dst").noconvert(), py::arg("src"), "Synchronous copy from the device into a C-contiguous uint8 view.");
  m.attr("built_with_cuda_invertible") = true;
#else
  m.attr("built_with_cuda_invertible") = false;
#endif
}

}  // namespace arcflow::bind
