// Bindings of the w_std / b_std gradients of the fully-connected kernels: one class per dtype.
// Validation and dtype choice live in python/arcflow/_grads.py; here we only check shapes and pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "arcflow/fc_grad.hpp"
#include "registry.hpp"

namespace py = pybind11;

namespace arcflow::bind {
namespace {

template <class T>
using carray = py::array_t<T, py::array::c_style>;

// An output of `size` items of T, written in place (None: not wanted). The Python layer allocates them.
template <class T>
T* grad_out(const py::object& o, py::ssize_t size, const char* name) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<carray<T>>(o))
    throw std::invalid_argument(std::string("arcflow: ") + name + " must be a C-contiguous array of the inputs' dtype");
  auto a = py::reinterpret_borrow<carray<T>>(o);
  if (!a.writeable() || a.size() != size || reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
    throw std::invalid_argument(std::string("arcflow: ") + name + " must be writeable, aligned and of size " +
                                std::to_string(size));
  return a.mutable_data();
}

template <class T>
struct py_grad {
  carray<T> x1, x2;
  bool symmetric;
  std::unique_ptr<fc_grad_engine<T>> eng;

  py_grad(carray<T> a, py::object b, const fc_params& p) : x1(std::move(a)), symmetric(b.is_none()) {
    if (x1.ndim() != 2) throw std::invalid_argument("arcflow: x1 must be 2-D");
    x2 = symmetric ? x1 : py::cast<carray<T>>(b);
    if (x2.ndim() != 2 || x2.shape(1) != x1.shape(1))
      throw std::invalid_argument("arcflow: x2 must be 2-D with as many columns as x1");
    const T *p1 = x1.data(), *p2 = x2.data();
    const py::ssize_t n1 = x1.shape(0), n2 = x2.shape(0), d = x1.shape(1);
    const bool sym = symmetric;
    py::gil_scoped_release nogil;
    eng = std::make_unique<fc_grad_engine<T>>(p1, n1, p2, n2, d, sym, p);
  }

  void rows(py::ssize_t r0, py::ssize_t r1, py::object a, py::object b, py::object c, py::object d, int threads) {
    const py::ssize_t n = x1.shape(0) * x2.shape(0);
    T* pa = grad_out<T>(a, n, "nngp d_w_std");
    T* pb = grad_out<T>(b, n, "nngp d_b_std");
    T* pc = grad_out<T>(c, n, "ntk d_w_std");
    T* pd = grad_out<T>(d, n, "ntk d_b_std");
    py::gil_scoped_release nogil;
    eng->rows(r0, r1, pa, pb, pc, pd, threads);
  }

  void diag(py::object a, py::object b, py::object c, py::object d, int threads) {
    const py::ssize_t n = x1.shape(0);
    T* pa = grad_out<T>(a, n, "nngp d_w_std");
    T* pb = grad_out<T>(b, n, "nngp d_b_std");
    T* pc = grad_out<T>(c, n, "ntk d_w_std");
    T* pd = grad_out<T>(d, n, "ntk d_b_std");
    py::gil_scoped_release nogil;
    eng->diag(pa, pb, pc, pd, threads);
  }
};

template <class T>
void bind_grad(py::module_& m, const char* name) {
  py::class_<py_grad<T>>(m, name)
      .def(py::init([](carray<T> x1, py::object x2, const fc_params& params) {
             return new py_grad<T>(std::move(x1), std::move(x2), params);
           }),
           py::arg("x1").noconvert(), py::arg("x2"), py::arg("params"))
      .def("rows", &py_grad<T>::rows, py::arg("r0"), py::arg("r1"), py::arg("nngp_dw"), py::arg("nngp_db"),
           py::arg("ntk_dw"), py::arg("ntk_db"), py::arg("threads"))
      .def("diag", &py_grad<T>::diag, py::arg("nngp_dw"), py::arg("nngp_db"), py::arg("ntk_dw"), py::arg("ntk_db"),
           py::arg("threads"));
}

}  // namespace

void register_fc_grad(py::module_& m) {
  bind_grad<float>(m, "FcGradF32");
  bind_grad<double>(m, "FcGradF64");
}

}  // namespace arcflow::bind
