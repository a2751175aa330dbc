// Bindings of the convolutional kernel engine (CNN-GP, CNTK): ConvOp and one engine class per dtype.
// The layer order and the inputs are checked in python/arcflow/stax.py; here only shapes and pointers. The CUDA
// engine (host arrays in and out, same methods) exists only in a CUDA build.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "arcflow/conv_kernel.hpp"
#ifdef ARCFLOW_WITH_CUDA
#include "arcflow/conv_kernel_cuda.hpp"
#endif
#include "engine_util.hpp"
#include "registry.hpp"

namespace py = pybind11;

namespace arcflow::bind {
namespace {

// The images' shapes, checked as the CPU engine's constructor does.
template <class T>
carray<T> checked_x2(const carray<T>& x1, const py::object& b) {
  if (x1.ndim() != 4) throw std::invalid_argument("arcflow: x1 must be 4-D (n, H, W, C)");
  carray<T> x2 = b.is_none() ? x1 : py::cast<carray<T>>(b);
  if (x2.ndim() != 4 || x2.shape(1) != x1.shape(1) || x2.shape(2) != x1.shape(2) || x2.shape(3) != x1.shape(3))
    throw std::invalid_argument("arcflow: x2 must be 4-D with the image shape of x1");
  return x2;
}

template <class T>
struct py_conv_engine {
  carray<T> x1, x2;
  bool symmetric;
  std::unique_ptr<conv_engine<T>> eng;

  py_conv_engine(carray<T> a, py::object b, const std::vector<conv_op>& ops, bool want_ntk, int threads)
      : x1(std::move(a)), symmetric(b.is_none()) {
    x2 = checked_x2(x1, b);
    check_aligned<T>(x1.data(), "x1");
    check_aligned<T>(x2.data(), "x2");
    const T *p1 = x1.data(), *p2 = x2.data();
    const py::ssize_t n1 = x1.shape(0), n2 = x2.shape(0), h = x1.shape(1), w = x1.shape(2), c = x1.shape(3);
    const bool sym = symmetric;
    run_interruptible([&](const interrupt_fn& interrupt) {
      eng = std::make_unique<conv_engine<T>>(p1, n1, p2, n2, h, w, c, sym, ops, want_ntk, threads, interrupt);
    });
  }

  void rows(py::ssize_t r0, py::ssize_t r1, py::object nngp, py::object ntk, int threads) {
    const py::ssize_t n1 = x1.shape(0), n2 = x2.shape(0);
    T* a = out_ptr<T>(nngp, n1, n2, "nngp output");
    T* b = out_ptr<T>(ntk, n1, n2, "ntk output");
    run_interruptible([&](const interrupt_fn& interrupt) { eng->rows(r0, r1, a, b, threads, interrupt); });
  }

  void diag(py::object nngp, py::object ntk) {
    const py::ssize_t n1 = x1.shape(0);
    eng->diag(out_ptr<T>(nngp, n1, 1, "nngp output"), out_ptr<T>(ntk, n1, 1, "ntk output"));
  }
};

#ifdef ARCFLOW_WITH_CUDA
template <class T>
struct py_conv_engine_cuda {
  py::ssize_t n1, n2;
  std::unique_ptr<conv_engine_cuda<T>> eng;

  py_conv_engine_cuda(const carray<T>& x1, const py::object& b, const std::vector<conv_op>& ops, bool want_ntk,
                      int device) {
    const carray<T> x2 = checked_x2(x1, b);
    const bool sym = b.is_none();
    n1 = x1.shape(0);
    n2 = x2.shape(0);
    const py::ssize_t h = x1.shape(1), w = x1.shape(2), c = x1.shape(3);
    py::gil_scoped_release nogil;
    eng = std::make_unique<conv_engine_cuda<T>>(x1.data(), n1, x2.data(), n2, h, w, c, sym, ops, want_ntk, device);
  }

  void rows(py::ssize_t r0, py::ssize_t r1, py::object nngp, py::object ntk) {
    T* a = out_ptr<T>(nngp, n1, n2, "nngp output");
    T* b = out_ptr<T>(ntk, n1, n2, "ntk output");
    py::gil_scoped_release nogil;
    eng->rows(r0, r1, a, b);
  }

  void diag(py::object nngp, py::object ntk) {
    eng->diag(out_ptr<T>(nngp, n1, 1, "nngp output"), out_ptr<T>(ntk, n1, 1, "ntk output"));
  }
};

template <class T>
void bind_conv_engine_cuda(py::module_& m, const char* name) {
  py::class_<py_conv_engine_cuda<T>>(m, name)
      .def(py::init([](carray<T> x1, py::object x2, const std::vector<conv_op>& ops, bool want_ntk, int device) {
             return new py_conv_engine_cuda<T>(x1, x2, ops, want_ntk, device);
           }),
           py::arg("x1").noconvert(), py::arg("x2"), py::arg("ops"), py::arg("want_ntk"), py::arg("device") = -1)
      .def("rows", &py_conv_engine_cuda<T>::rows, py::arg("r0"), py::arg("r1"), py::arg("nngp"), py::arg("ntk"))
      .def("diag", &py_conv_engine_cuda<T>::diag, py::arg("nngp"), py::arg("ntk"))
      .def_property_readonly("blocks", [](const py_conv_engine_cuda<T>& e) { return e.eng->blocks(); });
}
#endif

template <class T>
void bind_conv_engine(py::module_& m, const char* name) {
  py::class_<py_conv_engine<T>>(m, name)
      .def(py::init([](carray<T> x1, py::object x2, const std::vector<conv_op>& ops, bool want_ntk, int threads) {
             return new py_conv_engine<T>(std::move(x1), std::move(x2), ops, want_ntk, threads);
           }),
           py::arg("x1").noconvert(), py::arg("x2"), py::arg("ops"), py::arg("want_ntk"), py::arg("threads"))
      .def("rows", &py_conv_engine<T>::rows, py::arg("r0"), py::arg("r1"), py::arg("nngp"), py::arg("ntk"),
           py::arg("threads"))
      .def("diag", &py_conv_engine<T>::diag, py::arg("nngp"), py::arg("ntk"))
      .def_static(
          "scratch_bytes",
          [](index_t h, index_t w, index_t c, const std::vector<conv_op>& ops) {
            return conv_engine<T>::scratch_bytes(h, w, c, ops);
          },
          py::arg("h"), py::arg("w"), py::arg("c"), py::arg("ops"))
      .def_static(
          "table_bytes",
          [](index_t n, index_t h, index_t w, const std::vector<conv_op>& ops) {
            return conv_engine<T>::table_bytes(n, h, w, ops);
          },
          py::arg("n"), py::arg("h"), py::arg("w"), py::arg("ops"))
      .def_static(
          "pair_work",
          [](index_t h, index_t w, index_t c, const std::vector<conv_op>& ops) {
            return conv_engine<T>::pair_work(h, w, c, ops);
          },
          py::arg("h"), py::arg("w"), py::arg("c"), py::arg("ops"));
}

}  // namespace

void register_conv_kernel(py::module_& m) {
  py::enum_<conv_op_kind>(m, "ConvOpKind", "The ops of the convolutional engine (conv_kernel.hpp).")
      .value("dense", conv_op_kind::dense)
      .value("conv", conv_op_kind::conv)
      .value("pool", conv_op_kind::pool)
      .value("act", conv_op_kind::act)
      .value("flatten", conv_op_kind::flatten)
      .value("gap", conv_op_kind::gap);
  py::enum_<conv_padding>(m, "ConvPadding")
      .value("valid", conv_padding::valid)
      .value("same", conv_padding::same)
      .value("circular", conv_padding::circular);
  const conv_op d;
  py::class_<conv_op>(m, "ConvOp", "One op of a serial network as the convolutional engine takes it.")
      .def(py::init([](conv_op_kind kind, int fh, int fw, int sh, int sw, conv_padding padding, double w_var,
                       double b_var, const act_params& act) {
             conv_op o;
             o.kind = kind;
             o.fh = fh;
             o.fw = fw;
             o.sh = sh;
             o.sw = sw;
             o.padding = padding;
             o.w_var = w_var;
             o.b_var = b_var;
             o.act = act;
             return o;
           }),
           py::kw_only(), py::arg("kind"), py::arg("fh") = d.fh, py::arg("fw") = d.fw, py::arg("sh") = d.sh,
           py::arg("sw") = d.sw, py::arg("padding") = d.padding, py::arg("w_var") = d.w_var, py::arg("b_var") = d.b_var,
           py::arg("act") = d.act)
      .def_readonly("kind", &conv_op::kind);
  bind_conv_engine<float>(m, "ConvEngineF32");
  bind_conv_engine<double>(m, "ConvEngineF64");
#ifdef ARCFLOW_WITH_CUDA
  bind_conv_engine_cuda<float>(m, "ConvEngineCudaF32");
  bind_conv_engine_cuda<double>(m, "ConvEngineCudaF64");
#endif
}

}  // namespace arcflow::bind
