// Bindings of the invertible-network ops: conv2d, channel affine (inference batch-norm), ReLU, psi.
// Thin: Python (arcflow/invertible/_ops.py) validates, picks the dtype and allocates; here the shapes
// are checked again, the GIL is released and the C++ op runs. One name per op x dtype.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "arcflow/batchnorm.hpp"
#include "arcflow/conv2d.hpp"
#include "arcflow/psi.hpp"
#include "registry.hpp"

namespace py = pybind11;

namespace arcflow::bind {
namespace {

template <typename T>
using carr = py::array_t<T, py::array::c_style>;

template <typename T>
void need_ndim(const carr<T>& a, py::ssize_t nd, const char* what) {
  if (a.ndim() != nd)
    throw std::invalid_argument(std::string("arcflow: ") + what + " must have " + std::to_string(nd) + " dimensions");
}

// The ops read and write whole elements (and vectors of them): an array at an address that is not a
// multiple of its element size (np.ndarray(..., buffer=b, offset=1)) is undefined behaviour there.
// Python (invertible/_ops.py) copies such inputs; here they are refused.
template <typename T>
void need_aligned(const carr<T>& a, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
    throw std::invalid_argument(std::string("arcflow: ") + what +
                                " is not aligned to its element size (copy it: np.require(a, requirements='CA'))");
}

template <typename T>
const T* opt_ptr(const std::optional<carr<T>>& a, index_t size, const char* what) {
  if (!a) return nullptr;
  if (a->size() != size) throw std::invalid_argument(std::string("arcflow: ") + what + " has the wrong size");
  need_aligned(*a, what);
  return a->data();
}

// Returns the fused NaN/Inf test's result (conv2d.hpp, Conv2dFinite): bit 0 x, bit 1 the addend (out's
// old values with accumulate); 0 for an input not asked for.
template <typename T>
int conv2d(const carr<T>& x, const carr<T>& w, const std::optional<carr<T>>& bias, index_t stride, index_t pad,
           const std::optional<carr<T>>& in_scale, const std::optional<carr<T>>& in_shift, bool in_relu, double alpha,
           bool accumulate, const std::optional<carr<T>>& addend, carr<T>& out, int threads, bool check_x,
           bool check_addend) {
  need_ndim(x, 4, "conv2d input");
  need_ndim(w, 4, "conv2d weight");
  need_ndim(out, 4, "conv2d output");
  need_aligned(x, "conv2d input");
  need_aligned(w, "conv2d weight");
  need_aligned(out, "conv2d output");
  Conv2dShape s{x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0), w.shape(2), w.shape(3), stride, pad};
  ARCFLOW_CHECK(w.shape(1) == s.c, "conv2d: weight in-channels differ from the input's channels");
  ARCFLOW_CHECK(stride >= 1 && pad >= 0, "conv2d: stride must be >= 1 and padding >= 0");
  ARCFLOW_CHECK(s.h + 2 * pad >= s.kh && s.w + 2 * pad >= s.kw, "conv2d: kernel larger than the padded input");
  ARCFLOW_CHECK(out.shape(0) == s.n && out.shape(1) == s.m && out.shape(2) == s.ho() && out.shape(3) == s.wo(),
                "conv2d: output has the wrong shape");
  const T* b = opt_ptr(bias, s.m, "conv2d bias");
  const T* sc = opt_ptr(in_scale, s.c, "conv2d in_scale");
  const T* sf = opt_ptr(in_shift, s.c, "conv2d in_shift");
  const T* xp = x.data();
  const T* wp = w.data();
  T* op = out.mutable_data();
  const T* add = opt_ptr(addend, out.size(), "conv2d addend");
  if (accumulate) {
    ARCFLOW_CHECK(add == nullptr, "conv2d: accumulate and addend exclude each other");
    add = op;
  }
  Conv2dFinite finite;
  finite.check_x = check_x;
  finite.check_addend = check_addend;
  {
    py::gil_scoped_release release;
    conv2d_cpu<T>(s, xp, wp, b, sc, sf, in_relu, static_cast<T>(alpha), add, op, threads, &finite);
  }
  return (finite.x_bad ? 1 : 0) | (finite.addend_bad ? 2 : 0);
}

template <typename T>
void channel_affine(const carr<T>& x, const carr<T>& scale, const carr<T>& shift, bool relu, carr<T>& out,
                    int threads) {
  ARCFLOW_CHECK(x.ndim() >= 2, "channel_affine: input must be (n, c, ...)");
  ARCFLOW_CHECK(out.ndim() == x.ndim(), "channel_affine: output has the wrong shape");
  for (py::ssize_t d = 0; d < x.ndim(); ++d)
    ARCFLOW_CHECK(out.shape(d) == x.shape(d), "channel_affine: output has the wrong shape");
  const index_t n = x.shape(0), c = x.shape(1);
  const index_t hw = c > 0 && n > 0 ? x.size() / (n * c) : 0;
  ARCFLOW_CHECK(scale.size() == c && shift.size() == c, "channel_affine: scale/shift need one value per channel");
  need_aligned(x, "channel_affine input");
  need_aligned(scale, "channel_affine scale");
  need_aligned(shift, "channel_affine shift");
  need_aligned(out, "channel_affine output");
  const T* xp = x.data();
  const T* scp = scale.data();
  const T* sfp = shift.data();
  T* op = out.mutable_data();
  py::gil_scoped_release release;
  channel_affine_cpu<T>(xp, n, c, hw, scp, sfp, relu, op, threads);
}

template <typename T>
void relu(const carr<T>& x, carr<T>& out, int threads) {
  ARCFLOW_CHECK(out.size() == x.size(), "relu: output has the wrong size");
  need_aligned(x, "relu input");
  need_aligned(out, "relu output");
  const T* xp = x.data();
  T* op = out.mutable_data();
  const index_t size = x.size();
  py::gil_scoped_release release;
  relu_cpu<T>(xp, size, op, threads);
}

template <typename T>
void psi_fwd(const carr<T>& x, index_t b, carr<T>& out, int threads) {
  need_ndim(x, 4, "psi input");
  need_ndim(out, 4, "psi output");
  need_aligned(x, "psi input");
  need_aligned(out, "psi output");
  const index_t n = x.shape(0), c = x.shape(1), h = x.shape(2), w = x.shape(3);
  ARCFLOW_CHECK(b >= 1 && h % b == 0 && w % b == 0, "psi: h and w must be divisible by the block size");
  ARCFLOW_CHECK(out.shape(0) == n && out.shape(1) == c * b * b && out.shape(2) == h / b && out.shape(3) == w / b,
                "psi: output has the wrong shape");
  const T* xp = x.data();
  T* op = out.mutable_data();
  py::gil_scoped_release release;
  psi_forward_cpu<T>(xp, n, c, h, w, b, op, threads);
}

template <typename T>
void psi_inv(const carr<T>& y, index_t b, carr<T>& out, int threads) {
  need_ndim(y, 4, "psi_inverse input");
  need_ndim(out, 4, "psi_inverse output");
  need_aligned(y, "psi_inverse input");
  need_aligned(out, "psi_inverse output");
  ARCFLOW_CHECK(b >= 1 && y.shape(1) % (b * b) == 0, "psi_inverse: channels must be divisible by block**2");
  const index_t n = y.shape(0), c = y.shape(1) / (b * b), h = y.shape(2) * b, w = y.shape(3) * b;
  ARCFLOW_CHECK(out.shape(0) == n && out.shape(1) == c && out.shape(2) == h && out.shape(3) == w,
                "psi_inverse: output has the wrong shape");
  const T* yp = y.data();
  T* op = out.mutable_data();
  py::gil_scoped_release release;
  psi_inverse_cpu<T>(yp, n, c, h, w, b, op, threads);
}

template <typename T>
void register_dtype(py::module_& m, const std::string& sfx) {
  m.def(("conv2d_cpu_" + sfx).c_str(), &conv2d<T>, py::arg("x").noconvert(), py::arg("w").noconvert(),
        py::arg("bias").noconvert().none(true), py::arg("stride"), py::arg("pad"),
        py::arg("in_scale").noconvert().none(true), py::arg("in_shift").noconvert().none(true), py::arg("in_relu"),
        py::arg("alpha"), py::arg("accumulate"), py::arg("addend").noconvert().none(true), py::arg("out").noconvert(),
        py::arg("threads") = 0, py::arg("check_x") = false, py::arg("check_addend") = false,
        "out = [out or addend +] (alpha * conv2d(act(x), w) + bias); NCHW / OIHW, act = optional per-channel "
        "affine + ReLU. Returns the NaN/Inf flags of the inputs asked for: 1 x (raw values), 2 the addend.");
  m.def(("channel_affine_cpu_" + sfx).c_str(), &channel_affine<T>, py::arg("x").noconvert(),
        py::arg("scale").noconvert(), py::arg("shift").noconvert(), py::arg("relu"), py::arg("out").noconvert(),
        py::arg("threads") = 0, "out = [relu](x * scale[c] + shift[c]) (inference batch-norm); out may be x");
  m.def(("relu_cpu_" + sfx).c_str(), &relu<T>, py::arg("x").noconvert(), py::arg("out").noconvert(),
        py::arg("threads") = 0);
  m.def(("psi_cpu_" + sfx).c_str(), &psi_fwd<T>, py::arg("x").noconvert(), py::arg("block"), py::arg("out").noconvert(),
        py::arg("threads") = 0);
  m.def(("psi_inverse_cpu_" + sfx).c_str(), &psi_inv<T>, py::arg("y").noconvert(), py::arg("block"),
        py::arg("out").noconvert(), py::arg("threads") = 0);
}

}  // namespace

void register_invertible(pybind11::module_& m) {
  register_dtype<float>(m, "f32");
  register_dtype<double>(m, "f64");
  m.def(
      "conv2d_cpu_isa", []() { return std::string(conv2d_cpu_isa()); },
      "the conv2d micro-kernel the next convolution uses (avx2 or generic)");
  m.def(
      "_conv2d_isa", []() { return std::string(conv2d_cpu_isa()); },
      "the active conv2d micro-kernel: 'avx2' or 'generic'");
  m.def("_set_conv2d_isa", &conv2d_set_isa, py::arg("name"),
        "force conv2d's micro-kernel: 'generic', 'avx2', 'avx512' (conv2d's best: avx2) or 'auto' (back to "
        "ARCFLOW_ISA / the best); ValueError for another name or a level this CPU cannot run");
  m.def("_conv2d_isa_levels", &conv2d_isa_levels, "the ISA level names this CPU runs, lowest first");
}

}  // namespace arcflow::bind
