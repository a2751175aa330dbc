// Bindings of the fully-connected kernel recursions (NNGP, NTK): one engine class per dtype.
// Validation and dtype choice live in python/arcflow/_dispatch.py; here we only check shapes and pointers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "arcflow/fc_kernel.hpp"
#include "engine_util.hpp"
#include "registry.hpp"

namespace py = pybind11;

namespace arcflow::bind {
namespace {

template <class T>
struct py_engine {
  carray<T> x1, x2;
  bool symmetric;
  std::unique_ptr<fc_engine<T>> eng;

  py_engine(carray<T> a, py::object b, fc_params p) : x1(std::move(a)), symmetric(b.is_none()) {
    if (x1.ndim() != 2) throw std::invalid_argument("arcflow: x1 must be 2-D");
    x2 = symmetric ? x1 : py::cast<carray<T>>(b);
    if (x2.ndim() != 2 || x2.shape(1) != x1.shape(1))
      throw std::invalid_argument("arcflow: x2 must be 2-D with as many columns as x1");
    check_aligned<T>(x1.data(), "x1");
    check_aligned<T>(x2.data(), "x2");
    // The per-row tables take O(n depth) time: built without the GIL, interruptible.
    const T *p1 = x1.data(), *p2 = x2.data();
    const py::ssize_t n1 = x1.shape(0), n2 = x2.shape(0), d = x1.shape(1);
    const bool sym = symmetric;
    run_interruptible([&](const interrupt_fn& interrupt) {
      eng = std::make_unique<fc_engine<T>>(p1, n1, p2, n2, d, sym, p, interrupt);
    });
  }

  void rows(py::ssize_t r0, py::ssize_t r1, py::object nngp, py::object ntk, py::object ntk_all, int threads) {
    const py::ssize_t n1 = x1.shape(0), n2 = x2.shape(0);
    const py::ssize_t L = eng->params().depth + 1;
    T* a = out_ptr<T>(nngp, n1, n2, "nngp output");
    T* b = out_ptr<T>(ntk, n1, n2, "ntk output");
    T* c = out_ptr<T>(ntk_all, L * L * n1, n2, "ntk_all output");
    run_interruptible([&](const interrupt_fn& interrupt) { eng->rows(r0, r1, a, b, c, threads, interrupt); });
  }

  void diag(py::object nngp, py::object ntk, int threads) {
    const py::ssize_t n1 = x1.shape(0);
    T* a = out_ptr<T>(nngp, n1, 1, "nngp output");
    T* b = out_ptr<T>(ntk, n1, 1, "ntk output");
    run_interruptible([&](const interrupt_fn& interrupt) { eng->diag(a, b, threads, interrupt); });
  }
};

template <class T>
void bind_engine(py::module_& m, const char* name) {
  py::class_<py_engine<T>>(m, name)
      .def(py::init([](carray<T> x1, py::object x2, const fc_params& params) {
             return new py_engine<T>(std::move(x1), std::move(x2), params);
           }),
           py::arg("x1").noconvert(), py::arg("x2"), py::arg("params"))
      .def("rows", &py_engine<T>::rows, py::arg("r0"), py::arg("r1"), py::arg("nngp"), py::arg("ntk"),
           py::arg("ntk_all"), py::arg("threads"))
      .def("diag", &py_engine<T>::diag, py::arg("nngp"), py::arg("ntk"), py::arg("threads"));
}

template <class T>
carray<T> acos_poly_array(const carray<T>& x) {
  carray<T> y(x.size());
  const T* a = x.data();
  T* b = y.mutable_data();
  for (py::ssize_t i = 0; i < x.size(); ++i) b[i] = fm::acos_poly(a[i]);
  return y;
}

}  // namespace

void register_fc_kernel(py::module_& m) {
  // The exact kernel overflows the dtype: FloatingPointError (the Python layer names the public function).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fp_overflow& e) {
      PyErr_SetString(PyExc_FloatingPointError, e.what());
    }
  });
  bind_engine<float>(m, "FcEngineF32");
  bind_engine<double>(m, "FcEngineF64");
  m.attr("fc_tile") = py::int_(fc_engine<double>::tile);
  // Entry points that only the benchmarks use live in the private submodule _core._bench.
  py::module_ bench = m.def_submodule("_bench", "arcflow C++ core: entry points for bench/ (not the product)");
  bench.def(
      "acos_throughput",
      [](bool single, double seconds) {
        py::gil_scoped_release nogil;
        return acos_throughput(single, seconds);
      },
      py::arg("single_precision"), py::arg("seconds") = 0.2,
      "Vectorised arccos throughput of this build on one core (one square root and a polynomial per value, on\n"
      "[-1, 1]), elements per second (for the roofline).");
  // The roofline's arccos, on an array (tests compare it with NumPy and mpmath).
  m.def("_acos_poly", [](carray<double> x) { return acos_poly_array<double>(x); }, py::arg("x"));
  m.def("_acos_poly", [](carray<float> x) { return acos_poly_array<float>(x); }, py::arg("x"));
  m.def("_set_fc_layout", &set_fc_layout, py::arg("layout"),
        "Tests only: the CPU layer loops' layout, -1 by the CPU, 0 three loops, 1 fused; returns the previous.");
  m.def("_isa_levels", &fc_isa_levels, "The instruction-set variants of the fc kernel this CPU runs, lowest first.");
  m.def("_fc_isa", &fc_isa, "The fc kernel's active instruction-set variant.");
  m.def("_set_fc_isa", &set_fc_isa, py::arg("name"),
        "Tests only: force the fc kernel's instruction-set variant ('generic', 'avx2', 'avx512'; 'auto' restores).");
}

}  // namespace arcflow::bind
