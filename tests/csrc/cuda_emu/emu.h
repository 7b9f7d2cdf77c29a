// Host emulation of the CUDA features csrc/cuda/kd_loss_cuda.cu uses, so that its kernels run on
// a machine without a GPU (tests/csrc/test_cuda_emulated.py): every CUDA thread of a block is a
// std::thread, __syncthreads is a block-wide std::barrier, __shfl_xor_sync exchanges through a
// per-warp buffer and barrier, blocks run one after another. Force-included (g++ -include) before
// the CUDA source, which is compiled as C++20. Checks the math and the reductions, not speed, and
// not the device's fast-math intrinsics.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#define DDK_CUDA_HOST_EMULATION 1
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static  // one instance shared by the block's threads (blocks run in turn)
#undef __launch_bounds__
#define __launch_bounds__(x)
#undef __restrict__
#define __restrict__

struct EmuIdx {
  unsigned x, y, z;
};
inline thread_local EmuIdx threadIdx{0, 0, 0};
inline thread_local EmuIdx blockIdx{0, 0, 0};

struct EmuWarp {
  std::barrier<> bar{32};
  double buf[32];
};
inline std::unique_ptr<std::barrier<>> g_emu_block_bar;
inline std::vector<std::unique_ptr<EmuWarp>> g_emu_warps;

inline void __syncthreads() { g_emu_block_bar->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  EmuWarp& w = *g_emu_warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  w.buf[lane] = static_cast<double>(v);  // float and double both round-trip exactly
  w.bar.arrive_and_wait();
  const T r = static_cast<T>(w.buf[lane ^ static_cast<unsigned>(offset)]);
  w.bar.arrive_and_wait();
  return r;
}

template <class K, class... A>
void emu_launch(unsigned grid, unsigned block, K kernel, A... args) {
  for (unsigned b = 0; b < grid; ++b) {
    g_emu_block_bar = std::make_unique<std::barrier<>>(block);
    g_emu_warps.clear();
    for (unsigned w = 0; w < block / 32; ++w) g_emu_warps.push_back(std::make_unique<EmuWarp>());
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel(args...);
      });
    for (auto& th : threads) th.join();
  }
}

#define DDK_LAUNCH(kernel, grid, block, stream, ...) emu_launch((grid), (block), kernel, __VA_ARGS__)
#define cudaGetLastError() cudaSuccess
