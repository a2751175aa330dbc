// Bindings of the recursion's parameters: ActKind (the single source of the activation codes), ActParams and
// FcParams, built by keyword. Plain data: the Python layer validates the values before it builds them.
#include <pybind11/pybind11.h>

#include <cstdio>
#include <string>

#include "arcflow/fc_kernel.hpp"
#include "registry.hpp"

namespace py = pybind11;

namespace arcflow::bind {
namespace {

const char* kind_name(act_kind k) {
  switch (k) {
    case act_kind::abrelu:
      return "abrelu";
    case act_kind::monomial:
      return "monomial";
    case act_kind::sign:
      return "sign";
    case act_kind::erf:
      return "erf";
  }
  return "?";
}

std::string repr(const act_params& a) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "ActParams(kind=ActKind.%s, a=%.17g, b=%.17g, n=%d)", kind_name(a.kind), a.a, a.b,
                a.n);
  return buf;
}

std::string repr(const fc_params& p) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "FcParams(act=%s, depth=%d, w_var=%.17g, b_var=%.17g, gram_scale=%.17g, fix_dep=%d)",
                repr(p.act).c_str(), p.depth, p.w_var, p.b_var, p.gram_scale, p.fix_dep);
  return buf;
}

}  // namespace

void register_fc_params(py::module_& m) {
  py::enum_<act_kind>(m, "ActKind", "The activation families of the C++ recursion (activations.hpp).")
      .value("abrelu", act_kind::abrelu)
      .value("monomial", act_kind::monomial)
      .value("sign", act_kind::sign)
      .value("erf", act_kind::erf);

  const act_params da;
  py::class_<act_params>(m, "ActParams", "An activation as the recursion takes it: its kind and numbers.")
      .def(py::init([](act_kind kind, double a, double b, int n) {
             act_params p;
             p.kind = kind;
             p.a = a;
             p.b = b;
             p.n = n;
             return p;
           }),
           py::kw_only(), py::arg("kind"), py::arg("a") = da.a, py::arg("b") = da.b, py::arg("n") = da.n)
      .def_readwrite("kind", &act_params::kind)
      .def_readwrite("a", &act_params::a, "ABReLU's slope for x < 0")
      .def_readwrite("b", &act_params::b, "ABReLU's slope for x > 0")
      .def_readwrite("n", &act_params::n, "the RectifiedMonomial's order")
      .def("__repr__", [](const act_params& a) { return repr(a); });

  const fc_params dp;
  py::class_<fc_params>(m, "FcParams", "The parameters of the fully-connected recursion (fc_kernel.hpp).")
      .def(py::init([](const act_params& act, int depth, double w_var, double b_var, double gram_scale, int fix_dep) {
             fc_params p;
             p.act = act;
             p.depth = depth;
             p.w_var = w_var;
             p.b_var = b_var;
             p.gram_scale = gram_scale;
             p.fix_dep = fix_dep;
             return p;
           }),
           py::kw_only(), py::arg("act"), py::arg("depth") = dp.depth, py::arg("w_var") = dp.w_var,
           py::arg("b_var") = dp.b_var, py::arg("gram_scale") = dp.gram_scale, py::arg("fix_dep") = dp.fix_dep)
      .def_readwrite("act", &fc_params::act)
      .def_readwrite("depth", &fc_params::depth, "hidden activations")
      .def_readwrite("w_var", &fc_params::w_var, "w_std**2")
      .def_readwrite("b_var", &fc_params::b_var, "b_std**2")
      .def_readwrite("gram_scale", &fc_params::gram_scale, "Sigma^1 = gram_scale <x, y> + b_var")
      .def_readwrite("fix_dep", &fc_params::fix_dep, "Sigma^l enters Theta only for l > fix_dep")
      .def("__repr__", [](const fc_params& p) { return repr(p); });
}

}  // namespace arcflow::bind
