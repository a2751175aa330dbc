// What the engine bindings share: output checks, and running an engine without the GIL with Ctrl-C polled.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "arcflow/fc_kernel.hpp"

namespace arcflow::bind {
namespace py = pybind11;

template <class T>
using carray = py::array_t<T, py::array::c_style>;

// The kernels load and store whole values (and vectors) of T: an array at an address that is not a multiple
// of alignof(T) is undefined behaviour there, so it is refused here (the Python layer copies such inputs).
template <class T>
inline void check_aligned(const void* p, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0)
    throw std::invalid_argument(std::string("arcflow: ") + name + " is not aligned to its " +
                                std::to_string(alignof(T)) + "-byte items");
}

template <class T>
T* out_ptr(const py::object& o, py::ssize_t rows_needed, py::ssize_t cols, const char* name) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<py::array>(o))
    throw std::invalid_argument(std::string("arcflow: ") + name + " must be a NumPy array");
  auto a = py::cast<carray<T>>(o);  // no conversion: the Python layer passes exact arrays
  // A cast that had to convert (another dtype, not C-contiguous) made a copy: the results would be lost in it.
  if (a.data() != py::reinterpret_borrow<py::array>(o).data())
    throw std::invalid_argument(std::string("arcflow: ") + name + " must be a C-contiguous array of the inputs' dtype");
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string("arcflow: ") + name + " must be a writeable C-contiguous array");
  if (a.size() != rows_needed * cols)
    throw std::invalid_argument(std::string("arcflow: ") + name + " has the wrong size");
  check_aligned<T>(a.data(), name);
  return a.mutable_data();
}

// The engine's interrupt callback: at most every 50 ms, take the GIL and let Python run its signal handlers
// (Ctrl-C raises KeyboardInterrupt there); true stops the engine, and the pending exception is raised by
// run_interruptible. Called only from the thread that called into the engine.
class signal_poll {
 public:
  bool operator()() {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ < std::chrono::milliseconds(50)) return false;
    last_ = now;
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

// Runs f (which gets the interrupt callback) without the GIL; an interrupt re-raises the Python exception
// that the signal handler set.
template <class F>
void run_interruptible(F&& f) {
  bool stopped = false;
  {
    py::gil_scoped_release nogil;
    signal_poll poll;
    const interrupt_fn interrupt = [&poll] { return poll(); };
    try {
      f(interrupt);
    } catch (const interrupted&) {
      stopped = true;
    }
  }
  if (stopped) {
    if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
    throw py::error_already_set();
  }
}

}  // namespace arcflow::bind
