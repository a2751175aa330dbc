// conv2d_cpu: implicit-GEMM 2-D convolution over stride phases, with a run-time chosen micro-kernel.
#include "arcflow/conv2d.hpp"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef ARCFLOW_HAVE_OPENMP
#include <omp.h>
#endif

#ifndef ARCFLOW_CONV_KBLOCK_BYTES
// Budget for the B values of one tile and one channel block (counted as taps x tile pixels), so that
// they stay in the 32 KiB L1 data cache next to the weight panel streaming from L2.
#define ARCFLOW_CONV_KBLOCK_BYTES 16384
#endif

namespace arcflow {
namespace {

// What the tile loop needs; the phase buffer and the output image pointers are passed separately.
template <typename T>
struct TileArgs {
  index_t K;           // taps = c * kh * kw
  index_t kc;          // taps per channel block (a multiple of kh * kw)
  index_t n_kblocks;   // ceil(K / kc)
  index_t m;           // output channels
  index_t ho, wo;      // output size
  const T* ap;         // packed weights, panels of MR channels: ap[panel][k][MR]
  const index_t* off;  // tap k -> offset in the phase buffer
  const T* bias;       // (m) or nullptr
  T alpha;
  index_t nslots;           // vector slots: VW consecutive output pixels of one row
  const index_t* slot_q;    // slot -> offset of its first pixel in the phase-buffer grid
  const index_t* slot_pos;  // slot -> offset of its first pixel in an output channel plane
  const int* slot_len;      // slot -> valid pixels (VW, or fewer at the end of a row)
};

// Geometry of the phase buffer: for stride s the zero-padded input (hp x wp) is split into s*s phases
// (py, px) of hph x wph values, phase[r][col] = padded[r*s + py][col*s + px]. Tap (ky, kx) of output
// pixel (oy, ox) then reads phase (ky%s, kx%s) at (oy + ky/s, ox + kx/s): with the output laid on a
// grid of row width wph, every tap is one constant offset. Output row oy is cut into slots of VW
// pixels (the last one shorter when VW does not divide wo); a slot reads VW consecutive grid values,
// the ones past wo are computed and dropped.
struct Geometry {
  index_t s, pad, hp, wp, hph, wph, phase_size, chan_size, ho, wo, K, kc, n_kblocks, buf_size, nslots;
  std::vector<index_t> off, slot_q, slot_pos;
  std::vector<int> slot_len;
  Geometry(const Conv2dShape& sh, index_t vw, index_t nv, index_t elem_bytes) {
    s = sh.stride;
    pad = sh.pad;
    hp = sh.h + 2 * pad;
    wp = sh.w + 2 * pad;
    hph = (hp + s - 1) / s;
    wph = (wp + s - 1) / s;
    phase_size = hph * wph;
    chan_size = s * s * phase_size;
    ho = sh.ho();
    wo = sh.wo();
    K = sh.c * sh.kh * sh.kw;
    // channel blocks of about ARCFLOW_CONV_KBLOCK_BYTES of B values per tile, balanced
    const index_t per_chan = sh.kh * sh.kw * nv * vw * elem_bytes;
    const index_t cb_max = std::max<index_t>(1, ARCFLOW_CONV_KBLOCK_BYTES / per_chan);
    n_kblocks = (sh.c + cb_max - 1) / cb_max;
    kc = (sh.c + n_kblocks - 1) / n_kblocks * sh.kh * sh.kw;
    n_kblocks = (K + kc - 1) / kc;
    // slack past the last channel: a slot may read up to vw - 1 values past the grid
    buf_size = sh.c * chan_size + vw + sh.kw + 64;
    off.resize(static_cast<std::size_t>(K));
    index_t k = 0;
    for (index_t ci = 0; ci < sh.c; ++ci)
      for (index_t ky = 0; ky < sh.kh; ++ky)
        for (index_t kx = 0; kx < sh.kw; ++kx)
          off[static_cast<std::size_t>(k++)] =
              ci * chan_size + ((ky % s) * s + (kx % s)) * phase_size + (ky / s) * wph + kx / s;
    const index_t spr = (wo + vw - 1) / vw;
    nslots = ho * spr;
    slot_q.resize(static_cast<std::size_t>(nslots));
    slot_pos.resize(static_cast<std::size_t>(nslots));
    slot_len.resize(static_cast<std::size_t>(nslots));
    for (index_t sl = 0; sl < nslots; ++sl) {
      const index_t oy = sl / spr, ox0 = sl % spr * vw;
      slot_q[static_cast<std::size_t>(sl)] = oy * wph + ox0;
      slot_pos[static_cast<std::size_t>(sl)] = oy * wo + ox0;
      slot_len[static_cast<std::size_t>(sl)] = static_cast<int>(std::min(vw, wo - ox0));
    }
  }
};

namespace isa_generic {
#define ARCFLOW_CONV_VB 16
#include "conv2d_kernel.inc"
#undef ARCFLOW_CONV_VB
}  // namespace isa_generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ARCFLOW_CONV_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define ARCFLOW_CONV_VB 32
#include "conv2d_kernel.inc"
#undef ARCFLOW_CONV_VB
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// Register blocking: MR output channels x NV vectors of pixels. Both shapes fit the 16 vector
// registers of x86-64 without AVX-512: 4 x 3 (12 accumulators, 3 B vectors, a broadcast) and 6 x 2
// (12 accumulators, 2 B vectors, a broadcast). The driver picks the one that wastes less work on
// padding (channels rounded up to MR, slots rounded up to NV).
template <typename T>
struct Kernel {
  bool (*tiles)(const TileArgs<T>&, const T*, T*, const T*, T*, index_t, index_t, bool);
  bool (*build)(const Conv2dShape&, const Geometry&, const T*, const T*, const T*, bool, bool, index_t, index_t, T*);
  index_t mr;  // output channels per panel
  index_t nv;  // vectors (slots) per tile
  index_t vw;  // pixels per vector
  const char* name;
};

bool cpu_has_avx2() {
#ifdef ARCFLOW_CONV_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef ARCFLOW_CONV_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// Micro-kernel levels: 0 generic, 1 avx2 (conv2d has nothing wider: "avx512" selects avx2).
constexpr int kLevelGeneric = 0, kLevelAvx2 = 1;

int best_level() { return cpu_has_avx2() ? kLevelAvx2 : kLevelGeneric; }

// The level a name asks for, capped at what the CPU runs (the cap semantics of ARCFLOW_ISA); -1 unknown.
int capped_level(const std::string& name) {
  if (name.empty() || name == "auto" || name == "avx512") return best_level();
  if (name == "avx2") return std::min(kLevelAvx2, best_level());
  if (name == "generic") return kLevelGeneric;
  return -1;
}

// ARCFLOW_ISA, read once at the first convolution: a cap on the level, shared with the fused kernel.
int env_level() {
  static const int level = [] {
    const char* v = std::getenv("ARCFLOW_ISA");
    const int l = capped_level(v ? v : "");
    if (l < 0)
      throw std::invalid_argument(std::string("arcflow: ARCFLOW_ISA must be auto, generic, avx2 or avx512, got '") + v +
                                  "'");
    return l;
  }();
  return level;
}

// _set_conv2d_isa's choice: -1 none (ARCFLOW_ISA / the best level decide). Process-wide, for tests and
// benchmarks; a convolution reads it once, at its start.
std::atomic<int> forced_level{-1};

int active_level() {
  const int f = forced_level.load(std::memory_order_relaxed);
  return f >= 0 ? f : env_level();
}

template <typename T>
Kernel<T> pick_kernel(index_t m, index_t ho, index_t wo) {
  Kernel<T> a, b;
#ifdef ARCFLOW_CONV_HAVE_AVX2
  if (active_level() >= kLevelAvx2) {
    a = {&isa_avx2::compute_tiles<T, 4, 3>, &isa_avx2::build_phases<T>, 4, 3, index_t(32 / sizeof(T)), "avx2"};
    b = {&isa_avx2::compute_tiles<T, 6, 2>, &isa_avx2::build_phases<T>, 6, 2, index_t(32 / sizeof(T)), "avx2"};
  } else
#endif
  {
    a = {&isa_generic::compute_tiles<T, 4, 3>, &isa_generic::build_phases<T>, 4, 3, index_t(16 / sizeof(T)), "generic"};
    b = {&isa_generic::compute_tiles<T, 6, 2>, &isa_generic::build_phases<T>, 6, 2, index_t(16 / sizeof(T)), "generic"};
  }
  const index_t nslots = ho * ((wo + a.vw - 1) / a.vw);
  auto work = [&](const Kernel<T>& k) {
    // padded multiply-adds, plus a small penalty for b's extra broadcast per FMA pair
    return static_cast<double>((m + k.mr - 1) / k.mr * k.mr) * ((nslots + k.nv - 1) / k.nv * k.nv);
  };
  return work(b) * 1.05 < work(a) ? b : a;
}

// A buffer aligned to 64 bytes, zero-initialised.
template <typename T>
struct AlignedBuf {
  std::vector<T> store;
  T* ptr = nullptr;
  explicit AlignedBuf(index_t count) : store(static_cast<std::size_t>(count) + 64 / sizeof(T), T(0)) {
    auto addr = reinterpret_cast<std::uintptr_t>(store.data());
    ptr = store.data() + ((64 - addr % 64) % 64) / sizeof(T);
  }
};

int max_threads() {
#ifdef ARCFLOW_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

index_t thread_id() {
#ifdef ARCFLOW_HAVE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace

const char* conv2d_cpu_isa() { return active_level() >= kLevelAvx2 ? "avx2" : "generic"; }

void conv2d_set_isa(const std::string& name) {
  if (name == "auto") {
    forced_level.store(-1);
    return;
  }
  int level;
  bool runs;
  if (name == "generic") {
    level = kLevelGeneric, runs = true;
  } else if (name == "avx2") {
    level = kLevelAvx2, runs = cpu_has_avx2();
  } else if (name == "avx512") {
    level = kLevelAvx2, runs = cpu_has_avx512();
  } else {
    throw std::invalid_argument("_set_conv2d_isa: expected auto, generic, avx2 or avx512, got '" + name + "'");
  }
  if (!runs) throw std::invalid_argument("_set_conv2d_isa: this CPU cannot run " + name);
  forced_level.store(level);
}

std::vector<std::string> conv2d_isa_levels() {
  std::vector<std::string> out{"generic"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

template <typename T>
void conv2d_cpu(const Conv2dShape& sh, const T* x, const T* weight, const T* bias, const T* in_scale, const T* in_shift,
                bool in_relu, T alpha, const T* addend, T* out, int threads, Conv2dFinite* finite) {
  ARCFLOW_CHECK(sh.n >= 0 && sh.c > 0 && sh.h > 0 && sh.w > 0, "conv2d: bad input shape");
  ARCFLOW_CHECK(sh.m > 0 && sh.kh > 0 && sh.kw > 0, "conv2d: bad weight shape");
  ARCFLOW_CHECK(sh.stride >= 1 && sh.pad >= 0, "conv2d: stride must be >= 1 and padding >= 0");
  ARCFLOW_CHECK(sh.h + 2 * sh.pad >= sh.kh && sh.w + 2 * sh.pad >= sh.kw,
                "conv2d: kernel larger than the padded input");
  ARCFLOW_CHECK((in_scale == nullptr) == (in_shift == nullptr), "conv2d: in_scale and in_shift go together");
  if (finite) finite->x_bad = finite->addend_bad = false;
  if (sh.n == 0) return;

  const Kernel<T> kern = pick_kernel<T>(sh.m, sh.ho(), sh.wo());
  const Geometry g(sh, kern.vw, kern.nv, static_cast<index_t>(sizeof(T)));
  const index_t mr = kern.mr;
  const index_t n_panels = (sh.m + mr - 1) / mr;

  // Pack the weights: panel p holds channels [p*MR, p*MR + MR) tap by tap (zeros past m).
  AlignedBuf<T> ap(n_panels * mr * g.K);
  for (index_t co = 0; co < sh.m; ++co) {
    const index_t p = co / mr, i = co % mr;
    for (index_t k = 0; k < g.K; ++k) ap.ptr[(p * g.K + k) * mr + i] = weight[co * g.K + k];
  }

  const TileArgs<T> args{g.K,
                         g.kc,
                         g.n_kblocks,
                         sh.m,
                         g.ho,
                         g.wo,
                         ap.ptr,
                         g.off.data(),
                         bias,
                         alpha,
                         g.nslots,
                         g.slot_q.data(),
                         g.slot_pos.data(),
                         g.slot_len.data()};
  const index_t ntiles = (g.nslots + kern.nv - 1) / kern.nv;
  // buffer strides rounded up to 64 bytes
  const index_t line = 64 / static_cast<index_t>(sizeof(T));
  const index_t buf_stride = (g.buf_size + line - 1) / line * line;
  const index_t part_stride = (n_panels * mr * kern.nv * kern.vw + line - 1) / line * line;
  const index_t in_img = sh.c * sh.h * sh.w;
  const index_t out_img = sh.m * g.ho * g.wo;
  // Below a few million multiply-adds a parallel region costs more than it saves (and much more
  // on an oversubscribed machine, where the team's threads wait for a core).
  const bool par = static_cast<double>(sh.n) * sh.m * g.K * g.ho * g.wo > 4e6;
  const int nthreads = par ? (threads > 0 ? threads : max_threads()) : 1;
  const bool check_x = finite && finite->check_x;
  const bool check_add = finite && finite->check_addend && addend;
  int x_bad = 0, add_bad = 0;  // OpenMP | reductions over the tasks

  if (nthreads == 1 || sh.n % nthreads == 0 || sh.n >= 4 * nthreads) {
    // Enough images: one image per task, each thread with its own phase buffer (stays in L2).
    // Every thread's buffers in one allocation (and one zero-fill) by the calling thread, none inside
    // the parallel region.
    AlignedBuf<T> bufs(nthreads * (buf_stride + part_stride));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
      T* buf = bufs.ptr + thread_id() * (buf_stride + part_stride);
      T* part = buf + buf_stride;
#pragma omp for schedule(dynamic, 1) reduction(| : x_bad, add_bad)
      for (index_t img = 0; img < sh.n; ++img) {
        x_bad |= kern.build(sh, g, x + img * in_img, in_scale, in_shift, in_relu, check_x, 0, sh.c, buf);
        add_bad |= kern.tiles(args, buf, out + img * out_img, addend ? addend + img * out_img : nullptr, part, 0,
                              ntiles, check_add);
      }
    }
  } else {
    // Few images: share one phase buffer, split channels and then pixel tiles over the threads.
    AlignedBuf<T> bufs(buf_stride + nthreads * part_stride);
    T* buf = bufs.ptr;
    for (index_t img = 0; img < sh.n; ++img) {
#pragma omp parallel num_threads(nthreads)
      {
        T* part = buf + buf_stride + thread_id() * part_stride;
#pragma omp for schedule(static) reduction(| : x_bad)
        for (index_t ci = 0; ci < sh.c; ++ci)
          x_bad |= kern.build(sh, g, x + img * in_img, in_scale, in_shift, in_relu, check_x, ci, ci + 1, buf);
        // implicit barrier
        const index_t chunk = 4;
        const index_t nchunks = (ntiles + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1) reduction(| : add_bad)
        for (index_t ch = 0; ch < nchunks; ++ch)
          add_bad |= kern.tiles(args, buf, out + img * out_img, addend ? addend + img * out_img : nullptr, part,
                                ch * chunk, std::min(ntiles, ch * chunk + chunk), check_add);
      }
    }
  }
  if (finite) {
    finite->x_bad = x_bad != 0;
    finite->addend_bad = add_bad != 0;
  }
}

template void conv2d_cpu<float>(const Conv2dShape&, const float*, const float*, const float*, const float*,
                                const float*, bool, float, const float*, float*, int, Conv2dFinite*);
template void conv2d_cpu<double>(const Conv2dShape&, const double*, const double*, const double*, const double*,
                                 const double*, bool, double, const double*, double*, int, Conv2dFinite*);

}  // namespace arcflow
