// 2-D convolution (NCHW input, OIHW weights) with an optional fused per-channel affine + ReLU on the input.
#pragma once
// Contract:
//   x      : (n, c, h, w), C-contiguous host memory.
//   weight : (m, c, kh, kw), C-contiguous.
//   bias   : (m) or nullptr.
//   in_scale / in_shift : (c) or nullptr. When given, the convolution reads act(x) with
//            act(v) = max(0, v * in_scale[c] + in_shift[c]) if in_relu, else v * in_scale[c] + in_shift[c];
//            the zero padding is applied AFTER act (it pads the activated tensor), as in
//            Conv2d(ReLU(BatchNorm(x))). in_relu without scale/shift is a plain ReLU on the input.
//   out    : (n, m, ho, wo) with ho = (h + 2*pad - kh)/stride + 1, wo likewise.
//            out = alpha * conv(act(x), weight) + bias                 (addend == nullptr)
//            out = addend + (alpha * conv(act(x), weight) + bias)      (addend: same shape as out)
//   addend may be out itself (in-place accumulation); out must not alias x.
// The i-RevNet coupling y1 = x1 + F(x2) and its inverse x1 = y1 + (-F(x2)) are the addend form, so both
// round the same sum.
// Method: implicit GEMM. The (activated, zero-padded) input is split into stride x stride phases, so
// every kernel tap is a constant offset into the phase buffer and the GEMM's B operand is read straight
// from it (no 9x im2col copy); a register-blocked micro-kernel (AVX2+FMA where the CPU has it, chosen
// at run time) computes blocks of output channels x vectors of pixels of one output row, over blocks
// of input channels sized for L1, and writes the result (alpha, bias, addend) from its registers.
// OpenMP over images, or over pixel tiles when there are fewer images than threads. The summation
// order of an output element depends only on the shapes, never on the batch size or the threads.
// Throws std::invalid_argument (ARCFLOW_CHECK) on inconsistent sizes; std::bad_alloc on memory.
// threads: OpenMP threads to use (<= 0: omp_get_max_threads()); small problems run on one thread.
// finite: nullptr, or the NaN/Inf test of the inputs, fused into the passes that read them anyway: the
//   phase-buffer build reads every raw x value (tested before act, whose ReLU would turn NaN into 0), the
//   epilogue reads every addend value once (with addend == out, out's old values). The convolution runs
//   to the end either way; the caller decides what to do with the flags.
// Thread-safe: no global state.
#include <string>
#include <vector>

#include "arcflow/common.hpp"

namespace arcflow {

struct Conv2dShape {
  index_t n, c, h, w;   // input
  index_t m, kh, kw;    // weight
  index_t stride, pad;  // symmetric zero padding
  index_t ho() const { return (h + 2 * pad - kh) / stride + 1; }
  index_t wo() const { return (w + 2 * pad - kw) / stride + 1; }
};

struct Conv2dFinite {
  bool check_x = false;       // in: test x
  bool check_addend = false;  // in: test addend (ignored without one)
  bool x_bad = false;         // out: x holds a NaN or +-Inf
  bool addend_bad = false;    // out: addend holds a NaN or +-Inf
};

template <typename T>
void conv2d_cpu(const Conv2dShape& s, const T* x, const T* weight, const T* bias, const T* in_scale, const T* in_shift,
                bool in_relu, T alpha, const T* addend, T* out, int threads = 0, Conv2dFinite* finite = nullptr);

// The micro-kernel the next convolution uses ("avx2" or "generic"): the best the CPU runs, capped by the
// environment variable ARCFLOW_ISA (auto, generic, avx2, avx512; read once, at the first convolution;
// another value makes every convolution throw std::invalid_argument), unless conv2d_set_isa chose one.
const char* conv2d_cpu_isa();

// Force the micro-kernel level for the whole process: "generic", "avx2", "avx512" (conv2d's best, avx2),
// or "auto" (back to ARCFLOW_ISA / the best). std::invalid_argument for another name or a level this CPU
// cannot run. For tests and benchmarks; a convolution reads the level once, at its start.
void conv2d_set_isa(const std::string& name);

// The level names this CPU runs, lowest first ("generic", then "avx2", "avx512" where available).
std::vector<std::string> conv2d_isa_levels();

}  // namespace arcflow
