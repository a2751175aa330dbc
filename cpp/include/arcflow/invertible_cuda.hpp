// The invertible-block ops on a CUDA device: conv2d, channel affine (batch-norm), psi, ActNorm, affine coupling,
// channel copy. The GPU twins of conv2d.hpp, batchnorm.hpp and psi.hpp.
#pragma once
// Contract (declarations only: no CUDA headers, so the bindings compile with the plain C++ compiler; the
// definitions live in cpp/src/cuda/invertible.cu and exist only when ARCFLOW_WITH_CUDA is defined):
// - Every pointer is a C-contiguous array of T in DEVICE memory, with the shapes and semantics of the CPU op
//   named in each comment; optional arrays are nullptr when absent.
// - The work is queued on `stream` (a cudaStream_t as an integer, 0 = the legacy default stream) of `device`
//   (-1 = the current device) and returns without waiting; the caller keeps the arrays alive until the
//   stream has reached the work. No temporaries are allocated.
// - Same numbers as the CPU ops up to rounding (the convolution sums in another order and uses FMA); psi,
//   psi_inverse and channel_copy are exact permutations / copies.
// - Throws std::invalid_argument for inconsistent sizes, std::runtime_error naming the call and
//   cudaGetErrorString when a CUDA call or a launch fails (including "no CUDA device"). Reentrant.
// The per-element and per-tile logic is in cpp/src/cuda/invertible_tile.cuh (host-device, emulated on the
// CPU by tests/invertible/invertible_cuda_emulation.cpp).
#include <cstddef>
#include <cstdint>

#include "arcflow/common.hpp"
#include "arcflow/conv2d.hpp"

namespace arcflow {

// conv2d_cpu's contract (conv2d.hpp): out = [addend +] (alpha * conv2d(act(x), weight) + bias); addend may be
// out itself; out must not alias x.
template <typename T>
void conv2d_cuda(const Conv2dShape& s, const T* x, const T* weight, const T* bias, const T* in_scale, const T* in_shift,
                 bool in_relu, T alpha, const T* addend, T* out, int device, std::uintptr_t stream);

// channel_affine_cpu (batchnorm.hpp): y[n, ci, p] = [relu](x[n, ci, p] * scale[ci] + shift[ci]); y may be x.
template <typename T>
void channel_affine_cuda(const T* x, index_t n, index_t c, index_t hw, const T* scale, const T* shift, bool relu, T* y,
                         int device, std::uintptr_t stream);

// psi_forward_cpu / psi_inverse_cpu (psi.hpp); in and out must not alias.
template <typename T>
void psi_forward_cuda(const T* x, index_t n, index_t c, index_t h, index_t w, index_t b, T* y, int device,
                      std::uintptr_t stream);
template <typename T>
void psi_inverse_cuda(const T* y, index_t n, index_t c, index_t h, index_t w, index_t b, T* x, int device,
                      std::uintptr_t stream);

// ActNorm (python/arcflow/invertible/flows.py): y = (x - loc[c]) / scale[c], or x * scale[c] + loc[c] when
// inverse; (n, c, hw); y may be x.
template <typename T>
void actnorm_cuda(const T* x, index_t n, index_t c, index_t hw, const T* loc, const T* scale, bool inverse, T* y,
                  int device, std::uintptr_t stream);

// Affine coupling (flows.AffineCoupling): x (n, c1 + c2, hw), net = NN(x1) (n, 2*c2, hw) with s_raw the first c2
// channels and t the last c2; y (n, c1 + c2, hw) gets x1 unchanged and y2 = x2 * exp(s) + t (inverse:
// (x2 - t) * exp(-s)), s = clamp * 0.636 * atan(s_raw / clamp) (clamp <= 0: s = s_raw). s_out (n, c2, hw) or
// nullptr receives s. y must not alias net; y may be x.
template <typename T>
void affine_coupling_cuda(const T* x, const T* net, index_t n, index_t c1, index_t c2, index_t hw, double clamp,
                          bool inverse, T* y, T* s_out, int device, std::uintptr_t stream);

// dst (n, cd, hw) channels [d0, d0 + count) = src (n, cs, hw) channels [s0, s0 + count); other channels of dst
// are untouched. src and dst must not overlap.
template <typename T>
void channel_copy_cuda(const T* src, index_t n, index_t cs, index_t s0, T* dst, index_t cd, index_t d0, index_t count,
                       index_t hw, int device, std::uintptr_t stream);

// Plain device buffers for callers without an array library (the tests run the kernels this way where CuPy is
// not installed): cudaMalloc on `device` (-1 = current), cudaFree, and synchronous copies (cudaMemcpy, ordered
// after the work queued on the legacy default stream, stream 0).
std::uintptr_t cuda_buffer_alloc(std::size_t bytes, int device);
void cuda_buffer_free(std::uintptr_t ptr);
void cuda_copy_to_device(std::uintptr_t dst, const void* src, std::size_t bytes);
void cuda_copy_to_host(void* dst, std::uintptr_t src, std::size_t bytes);

}  // namespace arcflow
