// The CUDA built-ins mapped to plain C++, for the host emulations of the CUDA kernels (cuda_emulation.cpp,
// conv_cuda_emulation.cpp): each CUDA thread of a block runs as an OS thread (emu_run_block), __syncthreads is a
// std::barrier and __shared__ arrays are function statics. Blocks of a grid run one after another.
#pragma once
#include <barrier>
#include <thread>
#include <vector>

struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local emu_dim3 threadIdx;
emu_dim3 blockIdx, blockDim{256, 1, 1}, gridDim{1, 1, 1};
std::barrier<>* emu_barrier = nullptr;
#define __global__
#define __device__
#define __host__
#define __noinline__
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() emu_barrier->arrive_and_wait()
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

// Runs fn() as every thread of block `block` of a grid `grid` of blocks of `threads` threads.
template <class F>
void emu_run_block(emu_dim3 block, emu_dim3 grid, unsigned threads, F&& fn) {
  blockIdx = block;
  gridDim = grid;
  blockDim = emu_dim3{threads, 1, 1};
  std::barrier<> bar(threads);
  emu_barrier = &bar;
  std::vector<std::thread> th;
  th.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    th.emplace_back([&fn, t] {
      threadIdx.x = t;
      fn();
    });
  for (auto& x : th) x.join();
}
