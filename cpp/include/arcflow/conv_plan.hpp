// The sizes of a convolutional network's ops on given images (the plan that the CPU engine, conv_kernel.cpp,
// and the CUDA engine, conv_kernel_cuda.cu, both run).
#pragma once
// Contract: header-only declarations plus two small host/device helpers; the definitions live in
// cpp/src/cpu/conv_kernel.cpp. conv_layout throws std::invalid_argument for images too small for an op (VALID),
// a Dense on images, a bad window or stride, or a network without a readout.
#include <string>
#include <vector>

#include "arcflow/activations.hpp"
#include "arcflow/common.hpp"
#include "arcflow/conv_kernel.hpp"

// Always inlined on the host too: the CPU engine's activation loops vectorise only with the pair formula inline.
#if defined(__CUDACC__)
#define ARCFLOW_CONV_HD __host__ __device__ __forceinline__
#else
#define ARCFLOW_CONV_HD inline __attribute__((always_inline))
#endif

namespace arcflow {

// One op with its sizes. After the readout (or for rows) the positions are 1 x 1.
struct conv_stage {
  conv_op op;
  index_t h, w;    // input positions
  index_t ho, wo;  // output positions
  index_t lh, lw;  // padding before (conv and pool, SAME / CIRCULAR)
  index_t hp, wp;  // padded input (conv)
  index_t tab;     // act: offset of its values in an image's table row (variances, then 4 factor arrays)
};

struct conv_layout {
  std::vector<conv_stage> st;
  bool diag_mode = false;  // no AvgPool, no GlobalAvgPool: only the same-position pairs (p, p) are needed
  index_t tab_len = 0;     // table values per image (5 per position of every activation)
  index_t buf_len = 1;     // values per pixel-pair scratch array (the largest array of any op, padded copies included)
  index_t max_pos = 1;     // largest number of positions
  index_t acc_len = 1;     // a conv's accumulator plane (hp wp)
  index_t max_taps = 1;    // the largest filter (fh fw)
};

conv_layout make_conv_layout(index_t h, index_t w, const std::vector<conv_op>& ops);

// The message of fp_overflow when an image's own recursion left T's range at op bad_op - 1 (0: the input).
std::string conv_overflow_message(const std::vector<conv_op>& ops, int bad_op, bool single_precision);

// Source index of a padded coordinate: wrapped (CIRCULAR), or -1 outside the image (SAME zeros). I: index_t on
// the CPU, int in the CUDA kernel (32-bit division is several times cheaper there).
template <class I>
ARCFLOW_HD I conv_src_index(I i, I size, conv_padding pad) {
  if (i >= 0 && i < size) return i;
  if (pad == conv_padding::circular) return ((i % size) + size) % size;
  return -1;
}

// T and Tdot at one position pair from the two variances and the covariance, for both engines. P = sqrt(s1 s2) is
// s1 itself when the variances are equal (exact), r1 r2 otherwise; the gaps P -/+ s12 then vanish exactly for
// equal patches.
template <class T, class Act>
ARCFLOW_CONV_HD pair_out<T> conv_act_pair(const Act& act, T s12, T s1, T r1, T ir1, T pa1, T pb1, T s2, T r2, T ir2,
                                          T pa2, T pb2) {
  const T P = s1 == s2 ? s1 : r1 * r2;
  const T h = T(0.5) * (ir1 * ir2);
  const T dm = P - s12, dp = P + s12;
  const T gm = dm > T(0) ? dm : T(0), gp = dp > T(0) ? dp : T(0);
  return act.pair(s12, gm, gp, P, h, pa1, pb1, T(0), pa2, pb2, T(0));
}

}  // namespace arcflow
