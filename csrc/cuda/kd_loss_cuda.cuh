// Vocab-tiled KD loss on given logits: CUDA kernels, free of torch headers.
//
// One thread block per row loops over the vocabulary with an online max / sum-of-exponentials
// (float32 accumulation for float, __half and __nv_bfloat16 inputs; double for double inputs),
// merging per-thread states with warp shuffles and one shared-memory step.
//
// Notation of one row: s = zS / T, t = zT / T, q = softmax(s) (student), p = softmax(t)
// (teacher), m = beta p + (1 - beta) q.
//   divergence 0: forward KL  KL(p || q)
//   divergence 1: reverse KL  KL(q || p)
//   divergence 2: JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), 0 < beta < 1
// CE always uses temperature 1. Rows whose label equals ignore_index give 0 everywhere.
//
// Forward writes ce (N,), kd (N,) and stats (N, 4), double, = [lse(s), lse(t), lse(zS), extra] with
// extra = E_q[s - t] (reverse KL), KL(q || m) (JSD) or 0 (forward KL). Each lse is max + log(sum)
// added in double; backward splits it into a hi + lo pair of the accumulation type so that
// log q = (s - hi) - lo is as exact as a log_softmax (a float lse near 100 is off by 8e-6).
// Backward writes d zS = g_ce (softmax(zS) - onehot) + g_kd dD/dzS for per-row g_ce, g_kd:
//   forward KL: (q - p) / T
//   reverse KL: q ((s - t) - E_q[s - t]) / T = q (log q - log p - KL(q || p)) / T
//   JSD:        q (1 - beta) (log q - log m - KL(q || m)) / T
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ddk_cuda {

// Accumulation type of an input type: float, except double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Shapes and options of one call. Rows are read through their strides (in elements; the last
// dimension must be contiguous), so a teacher that is a column slice of a wider tensor
// (stride_t > v) is read in place.
struct KDRowArgs {
  int64_t n;             // rows
  int64_t v;             // vocabulary (columns read from both inputs)
  int64_t stride_s;      // row stride of the student logits
  int64_t stride_t;      // row stride of the teacher logits
  double temperature;    // T > 0 of the divergence
  int divergence;        // 0 forward KL, 1 reverse KL, 2 JSD
  double beta;           // JSD weight, 0 < beta < 1 (unused otherwise)
  int64_t ignore_index;  // label of rows that contribute nothing
};

// ce, kd: (n,) of the accumulation type; stats: (n, 4) row-major, double.
template <typename scalar_t>
cudaError_t kd_forward_cuda(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                            typename AccType<scalar_t>::type* ce, typename AccType<scalar_t>::type* kd,
                            double* stats, const KDRowArgs& args,
                            cudaStream_t stream);

// stats: (n, 4) from kd_forward_cuda; grad_ce, grad_kd: (n,); grad: (n, v) with row stride
// stride_g (last dimension contiguous), in the input type.
template <typename scalar_t>
cudaError_t kd_backward_cuda(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                             const double* stats,
                             const typename AccType<scalar_t>::type* grad_ce,
                             const typename AccType<scalar_t>::type* grad_kd, scalar_t* grad,
                             int64_t stride_g, const KDRowArgs& args, cudaStream_t stream);

#define DDK_DECLARE_KD_CUDA(T)                                                                     \
  extern template cudaError_t kd_forward_cuda<T>(const T*, const T*, const int64_t*,               \
                                                 AccType<T>::type*, AccType<T>::type*,              \
                                                 double*, const KDRowArgs&, cudaStream_t);          \
  extern template cudaError_t kd_backward_cuda<T>(                                                 \
      const T*, const T*, const int64_t*, const double*, const AccType<T>::type*,                  \
      const AccType<T>::type*, T*, int64_t, const KDRowArgs&, cudaStream_t);

DDK_DECLARE_KD_CUDA(float)
DDK_DECLARE_KD_CUDA(__half)
DDK_DECLARE_KD_CUDA(__nv_bfloat16)
DDK_DECLARE_KD_CUDA(double)

#undef DDK_DECLARE_KD_CUDA

}  // namespace ddk_cuda
