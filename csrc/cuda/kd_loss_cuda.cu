// Vocab-tiled KD loss on given logits: CUDA kernels (see kd_loss_cuda.cuh for the math).
//
// Layout of the work: one block of kThreads threads per row. Each thread walks the row with a
// stride of kThreads * VEC elements, loading VEC contiguous elements at a time (16-byte loads
// when the row pointers and strides allow it, else VEC = 1), and keeps its own online state
// (running max m, sum of e^(x - m), and a rescaled accumulator); the states are merged once per
// row, with warp shuffles and one shared-memory step.

#include "kd_loss_cuda.cuh"

#include <cmath>
#include <cstdint>

// Kernel launch. tests/csrc/cuda_emu/ compiles this file as plain C++ with a host emulation of
// threads, barriers and warp shuffles (DDK_CUDA_HOST_EMULATION), which defines its own.
#ifndef DDK_LAUNCH
#define DDK_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace ddk_cuda {
namespace {

#ifndef DDK_KD_THREADS
#define DDK_KD_THREADS 512  // threads per row (a multiple of 32, at most 1024)
#endif
constexpr int kThreads = DDK_KD_THREADS;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "DDK_KD_THREADS must be a multiple of 32, <= 1024");
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- conversions and math in the accumulation type ------------------------------------------

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(typename AccType<scalar_t>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// log(e^a + e^b), finite inputs.
template <typename acc_t>
__device__ __forceinline__ acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t mx = a > b ? a : b;
  return mx + acc_log(acc_exp(a - mx) + acc_exp(b - mx));
}

// ---- vector loads --------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T x[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// Calls f(col, zs, zt) for every column of this thread's share of the row, in the accumulation
// type. The first v - v % VEC columns go VEC at a time, the rest one at a time.
template <int VEC, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_column(const scalar_t* s_row, const scalar_t* t_row, int64_t v,
                                                F&& f) {
  const int64_t v_vec = (v / VEC) * VEC;
  for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < v_vec;
       base += static_cast<int64_t>(kThreads) * VEC) {
    const Pack<scalar_t, VEC> ps = load_pack<scalar_t, VEC>(s_row + base);
    const Pack<scalar_t, VEC> pt = load_pack<scalar_t, VEC>(t_row + base);
#pragma unroll
    for (int k = 0; k < VEC; ++k) f(base + k, to_acc(ps.x[k]), to_acc(pt.x[k]));
  }
  if (VEC > 1) {
    for (int64_t col = v_vec + threadIdx.x; col < v; col += kThreads) f(col, to_acc(s_row[col]), to_acc(t_row[col]));
  }
}

// ---- online log-sum-exp state and its block reduction ---------------------------------------

// Running max m, l = sum e^(x - m), a = sum e^(x - m) w (a weighted sum under the same scale).
template <typename acc_t>
struct Online {
  acc_t m;
  acc_t l;
  acc_t a;
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_init() {
  return Online<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ void online_add(Online<acc_t>& o, acc_t x, acc_t w) {
  if (x > o.m) {
    const acc_t r = acc_exp(o.m - x);  // 0 when o.m = -inf
    o.l = o.l * r + acc_t(1);
    o.a = o.a * r + w;
    o.m = x;
  } else {
    const acc_t e = acc_exp(x - o.m);
    o.l += e;
    o.a += e * w;
  }
}

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_merge(Online<acc_t> x, Online<acc_t> y) {
  const acc_t m = x.m > y.m ? x.m : y.m;
  if (m == neg_inf<acc_t>()) return x;  // both empty
  const acc_t fx = x.m == neg_inf<acc_t>() ? acc_t(0) : acc_exp(x.m - m);
  const acc_t fy = y.m == neg_inf<acc_t>() ? acc_t(0) : acc_exp(y.m - m);
  return Online<acc_t>{m, x.l * fx + y.l * fy, x.a * fx + y.a * fy};
}

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> warp_reduce(Online<acc_t> x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Online<acc_t> y;
    y.m = __shfl_xor_sync(kFullMask, x.m, offset);
    y.l = __shfl_xor_sync(kFullMask, x.l, offset);
    y.a = __shfl_xor_sync(kFullMask, x.a, offset);
    x = online_merge(x, y);
  }
  return x;
}

// Every thread gets the merged state of the block. smem: kWarps entries.
template <typename acc_t>
__device__ __forceinline__ Online<acc_t> block_reduce(Online<acc_t> x, Online<acc_t>* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_reduce(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? smem[lane] : online_init<acc_t>();
    x = warp_reduce(x);
    if (lane == 0) smem[0] = x;
  }
  __syncthreads();
  const Online<acc_t> r = smem[0];
  __syncthreads();  // smem may be reused right after
  return r;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? smem[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    if (lane == 0) smem[0] = x;
  }
  __syncthreads();
  const acc_t r = smem[0];
  __syncthreads();
  return r;
}

// ---- forward --------------------------------------------------------------------------------

template <typename scalar_t, int DIV, int VEC>
__global__ void __launch_bounds__(kThreads)
    kd_fwd_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                  const int64_t* __restrict__ labels, typename AccType<scalar_t>::type* __restrict__ ce_out,
                  typename AccType<scalar_t>::type* __restrict__ kd_out,
                  double* __restrict__ stats, int64_t v, int64_t stride_s,
                  int64_t stride_t, typename AccType<scalar_t>::type inv_t, bool t_is_one,
                  typename AccType<scalar_t>::type beta, typename AccType<scalar_t>::type log_beta,
                  typename AccType<scalar_t>::type log_1m_beta, int64_t ignore_index) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ Online<acc_t> red[kWarps];
  __shared__ acc_t red_sum[kWarps];
  __shared__ double red_sum64[kWarps];

  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  double* row_stats = stats + row * 4;
  if (label == ignore_index) {  // uniform over the block
    if (threadIdx.x == 0) {
      ce_out[row] = acc_t(0);
      kd_out[row] = acc_t(0);
      for (int k = 0; k < 4; ++k) row_stats[k] = 0.0;
    }
    return;
  }
  const scalar_t* s_row = student + row * stride_s;
  const scalar_t* t_row = teacher + row * stride_t;

  // Sweep 1: lse(s), lse(t), lse(zS) and the divergence accumulator.
  Online<acc_t> os = online_init<acc_t>();
  Online<acc_t> ot = online_init<acc_t>();
  Online<acc_t> oz = online_init<acc_t>();
  for_each_column<VEC>(s_row, t_row, v, [&](int64_t, acc_t zs, acc_t zt) {
    const acc_t s = t_is_one ? zs : zs * inv_t;
    const acc_t t = t_is_one ? zt : zt * inv_t;
    online_add(os, s, acc_t(0));
    online_add(ot, t, DIV == 0 ? t - s : acc_t(0));  // forward KL: sum e^(t - m_t) (t - s)
    if (!t_is_one) online_add(oz, zs, acc_t(0));
  });
  os = block_reduce(os, red);
  ot = block_reduce(ot, red);
  // lse = max + log(sum) in double; hi + lo of the accumulation type for the sweeps below
  const acc_t log_ls = acc_log(os.l), log_lt = acc_log(ot.l);
  const double lse_s = static_cast<double>(os.m) + static_cast<double>(log_ls);
  const double lse_t = static_cast<double>(ot.m) + static_cast<double>(log_lt);
  double lse_z = lse_s;
  if (!t_is_one) {
    oz = block_reduce(oz, red);
    lse_z = static_cast<double>(oz.m) + static_cast<double>(acc_log(oz.l));
  }
  const acc_t d_lse = (os.m - ot.m) + (log_ls - log_lt);  // lse(s) - lse(t) without lse rounding

  acc_t kd;
  double extra = 0.0;
  if (DIV == 0) {
    kd = ot.a / ot.l + d_lse;
  } else if (DIV == 1) {
    // Sweep 2 (reverse KL): extra = E_q[u], u = (zS - zT)/T as the backward forms it, with double
    // sums: a float E off by 1e-7 * |E| (|E| ~ 50 on peaked rows) would reach the gradient at the
    // top entry, where the backward's u - E otherwise cancels u's own rounding. KL(q || p) =
    // E_q[s - t] - (lse(s) - lse(t)), in double.
    const acc_t ls_hi = static_cast<acc_t>(lse_s), ls_lo = static_cast<acc_t>(lse_s - static_cast<double>(ls_hi));
    double eu = 0.0, eq = 0.0;
    for_each_column<VEC>(s_row, t_row, v, [&](int64_t, acc_t zs, acc_t zt) {
      const double q = static_cast<double>(acc_exp((zs * inv_t - ls_hi) - ls_lo));
      eu += q * static_cast<double>((zs - zt) * inv_t);
      eq += q;
    });
    eu = block_sum(eu, red_sum64);
    eq = block_sum(eq, red_sum64);
    extra = eu / eq;
    kd = static_cast<acc_t>(extra - (lse_s - lse_t));
  } else {
    const acc_t ls_hi = static_cast<acc_t>(lse_s), ls_lo = static_cast<acc_t>(lse_s - static_cast<double>(ls_hi));
    const acc_t lt_hi = static_cast<acc_t>(lse_t), lt_lo = static_cast<acc_t>(lse_t - static_cast<double>(lt_hi));
    // Sweep 2 (JSD): KL(p || m) and KL(q || m) with the final lse values.
    acc_t kl_pm = acc_t(0);
    acc_t kl_qm = acc_t(0);
    for_each_column<VEC>(s_row, t_row, v, [&](int64_t, acc_t zs, acc_t zt) {
      const acc_t log_q = (zs * inv_t - ls_hi) - ls_lo;
      const acc_t log_p = (zt * inv_t - lt_hi) - lt_lo;
      const acc_t log_m = log_add_exp(log_p + log_beta, log_q + log_1m_beta);
      kl_pm += acc_exp(log_p) * (log_p - log_m);
      kl_qm += acc_exp(log_q) * (log_q - log_m);
    });
    kl_pm = block_sum(kl_pm, red_sum);
    kl_qm = block_sum(kl_qm, red_sum);
    kd = beta * kl_pm + (acc_t(1) - beta) * kl_qm;
    extra = static_cast<double>(kl_qm);
  }

  if (threadIdx.x == 0) {
    const acc_t z_label = (label >= 0 && label < v) ? to_acc(s_row[label]) : acc_t(NAN);
    ce_out[row] = static_cast<acc_t>(lse_z - static_cast<double>(z_label));
    kd_out[row] = kd;
    row_stats[0] = lse_s;
    row_stats[1] = lse_t;
    row_stats[2] = lse_z;
    row_stats[3] = extra;
  }
}

// ---- backward -------------------------------------------------------------------------------

template <typename scalar_t, int DIV, int VEC>
__global__ void __launch_bounds__(kThreads)
    kd_bwd_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                  const int64_t* __restrict__ labels, const double* __restrict__ stats,
                  const typename AccType<scalar_t>::type* __restrict__ grad_ce,
                  const typename AccType<scalar_t>::type* __restrict__ grad_kd, scalar_t* __restrict__ grad,
                  int64_t v, int64_t stride_s, int64_t stride_t, int64_t stride_g,
                  typename AccType<scalar_t>::type inv_t, bool t_is_one, typename AccType<scalar_t>::type one_m_beta,
                  typename AccType<scalar_t>::type log_beta, typename AccType<scalar_t>::type log_1m_beta,
                  int64_t ignore_index) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  scalar_t* g_row = grad + row * stride_g;
  const int64_t v_vec = (v / VEC) * VEC;

  if (label == ignore_index) {
    Pack<scalar_t, VEC> zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.x[k] = from_acc<scalar_t>(acc_t(0));
    for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < v_vec;
         base += static_cast<int64_t>(kThreads) * VEC)
      *reinterpret_cast<Pack<scalar_t, VEC>*>(g_row + base) = zero;
    for (int64_t col = v_vec + threadIdx.x; col < v; col += kThreads) g_row[col] = from_acc<scalar_t>(acc_t(0));
    return;
  }

  const scalar_t* s_row = student + row * stride_s;
  const scalar_t* t_row = teacher + row * stride_t;
  const double* row_stats = stats + row * 4;
  const acc_t lse_s = static_cast<acc_t>(row_stats[0]);
  const acc_t lse_t = static_cast<acc_t>(row_stats[1]);
  const acc_t lse_z = static_cast<acc_t>(row_stats[2]);
  const acc_t lo_s = static_cast<acc_t>(row_stats[0] - static_cast<double>(lse_s));
  const acc_t lo_t = static_cast<acc_t>(row_stats[1] - static_cast<double>(lse_t));
  const acc_t lo_z = static_cast<acc_t>(row_stats[2] - static_cast<double>(lse_z));
  const acc_t extra = static_cast<acc_t>(row_stats[3]);
  const acc_t extra_lo = static_cast<acc_t>(row_stats[3] - static_cast<double>(extra));
  const acc_t g_ce = grad_ce[row];
  const acc_t g_kd = grad_kd[row] * inv_t;

  auto grad_of = [&](int64_t col, acc_t zs, acc_t zt) -> acc_t {
    const acc_t log_q = (zs * inv_t - lse_s) - lo_s;
    const acc_t q = acc_exp(log_q);
    // softmax(zS) is q itself at T = 1 (lse_z = lse_s there): one exponential saved.
    const acc_t d_ce = (t_is_one ? q : acc_exp((zs - lse_z) - lo_z)) - (col == label ? acc_t(1) : acc_t(0));
    const acc_t log_p = (zt * inv_t - lse_t) - lo_t;
    acc_t d_kd;
    if (DIV == 0) {
      d_kd = q - acc_exp(log_p);
    } else if (DIV == 1) {
      d_kd = q * (((zs - zt) * inv_t - extra) - extra_lo);  // (s - t) - E_q[s - t] = log q - log p - KL(q || p)
    } else {
      const acc_t log_m = log_add_exp(log_p + log_beta, log_q + log_1m_beta);
      d_kd = q * (one_m_beta * (log_q - log_m - extra));
    }
    return g_ce * d_ce + g_kd * d_kd;
  };

  for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < v_vec;
       base += static_cast<int64_t>(kThreads) * VEC) {
    const Pack<scalar_t, VEC> ps = load_pack<scalar_t, VEC>(s_row + base);
    const Pack<scalar_t, VEC> pt = load_pack<scalar_t, VEC>(t_row + base);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.x[k] = from_acc<scalar_t>(grad_of(base + k, to_acc(ps.x[k]), to_acc(pt.x[k])));
    *reinterpret_cast<Pack<scalar_t, VEC>*>(g_row + base) = out;
  }
  for (int64_t col = v_vec + threadIdx.x; col < v; col += kThreads)
    g_row[col] = from_acc<scalar_t>(grad_of(col, to_acc(s_row[col]), to_acc(t_row[col])));
}

// ---- launch helpers -------------------------------------------------------------------------

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// 16-byte vector access is legal when every row starts on a 16-byte boundary.
template <typename scalar_t>
bool rows_aligned(const void* ptr, int64_t stride) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && stride % vec_width<scalar_t>() == 0;
}

int effective_divergence(const KDRowArgs& a) {
  if (a.divergence == 2 && a.beta == 0.0) return 0;
  if (a.divergence == 2 && a.beta == 1.0) return 1;
  return a.divergence;
}

template <typename scalar_t, int DIV, int VEC>
void launch_fwd(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                typename AccType<scalar_t>::type* ce, typename AccType<scalar_t>::type* kd,
                double* stats, const KDRowArgs& a, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  const bool jsd = DIV == 2;
  auto* kernel = &kd_fwd_kernel<scalar_t, DIV, VEC>;
  DDK_LAUNCH(kernel, static_cast<unsigned>(a.n), kThreads, stream,
      student, teacher, labels, ce, kd, stats, a.v, a.stride_s, a.stride_t, static_cast<acc_t>(1.0 / a.temperature),
      a.temperature == 1.0, static_cast<acc_t>(a.beta), static_cast<acc_t>(jsd ? std::log(a.beta) : 0.0),
      static_cast<acc_t>(jsd ? std::log1p(-a.beta) : 0.0), a.ignore_index);
}

template <typename scalar_t, int DIV, int VEC>
void launch_bwd(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                const double* stats, const typename AccType<scalar_t>::type* grad_ce,
                const typename AccType<scalar_t>::type* grad_kd, scalar_t* grad, int64_t stride_g,
                const KDRowArgs& a, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  const bool jsd = DIV == 2;
  auto* kernel = &kd_bwd_kernel<scalar_t, DIV, VEC>;
  DDK_LAUNCH(kernel, static_cast<unsigned>(a.n), kThreads, stream,
      student, teacher, labels, stats, grad_ce, grad_kd, grad, a.v, a.stride_s, a.stride_t, stride_g,
      static_cast<acc_t>(1.0 / a.temperature), a.temperature == 1.0, static_cast<acc_t>(1.0 - a.beta),
      static_cast<acc_t>(jsd ? std::log(a.beta) : 0.0), static_cast<acc_t>(jsd ? std::log1p(-a.beta) : 0.0),
      a.ignore_index);
}

}  // namespace

template <typename scalar_t>
cudaError_t kd_forward_cuda(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                            typename AccType<scalar_t>::type* ce, typename AccType<scalar_t>::type* kd,
                            double* stats, const KDRowArgs& args, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (args.n > 0x7fffffffLL || args.v < 1 || !(args.temperature > 0.0)) return cudaErrorInvalidValue;
  const int div = effective_divergence(args);
  const bool vec = rows_aligned<scalar_t>(student, args.stride_s) && rows_aligned<scalar_t>(teacher, args.stride_t);
  constexpr int W = vec_width<scalar_t>();
#define DDK_FWD(D)                                                                                 \
  (vec ? launch_fwd<scalar_t, D, W>(student, teacher, labels, ce, kd, stats, args, stream)        \
       : launch_fwd<scalar_t, D, 1>(student, teacher, labels, ce, kd, stats, args, stream))
  switch (div) {
    case 0: DDK_FWD(0); break;
    case 1: DDK_FWD(1); break;
    case 2: DDK_FWD(2); break;
    default: return cudaErrorInvalidValue;
  }
#undef DDK_FWD
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t kd_backward_cuda(const scalar_t* student, const scalar_t* teacher, const int64_t* labels,
                             const double* stats,
                             const typename AccType<scalar_t>::type* grad_ce,
                             const typename AccType<scalar_t>::type* grad_kd, scalar_t* grad, int64_t stride_g,
                             const KDRowArgs& args, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (args.n > 0x7fffffffLL || args.v < 1 || !(args.temperature > 0.0)) return cudaErrorInvalidValue;
  const int div = effective_divergence(args);
  const bool vec = rows_aligned<scalar_t>(student, args.stride_s) && rows_aligned<scalar_t>(teacher, args.stride_t) &&
                   rows_aligned<scalar_t>(grad, stride_g);
  constexpr int W = vec_width<scalar_t>();
#define DDK_BWD(D)                                                                                          \
  (vec ? launch_bwd<scalar_t, D, W>(student, teacher, labels, stats, grad_ce, grad_kd, grad, stride_g, args, \
                                    stream)                                                                 \
       : launch_bwd<scalar_t, D, 1>(student, teacher, labels, stats, grad_ce, grad_kd, grad, stride_g, args, \
                                    stream))
  switch (div) {
    case 0: DDK_BWD(0); break;
    case 1: DDK_BWD(1); break;
    case 2: DDK_BWD(2); break;
    default: return cudaErrorInvalidValue;
  }
#undef DDK_BWD
  return cudaGetLastError();
}

#define DDK_INSTANTIATE_KD_CUDA(T)                                                                          \
  template cudaError_t kd_forward_cuda<T>(const T*, const T*, const int64_t*, AccType<T>::type*,          \
                                          AccType<T>::type*, double*, const KDRowArgs&,                    \
                                          cudaStream_t);                                                   \
  template cudaError_t kd_backward_cuda<T>(const T*, const T*, const int64_t*, const double*,             \
                                           const AccType<T>::type*, const AccType<T>::type*, T*, int64_t,  \
                                           const KDRowArgs&, cudaStream_t);

DDK_INSTANTIATE_KD_CUDA(float)
DDK_INSTANTIATE_KD_CUDA(__half)
DDK_INSTANTIATE_KD_CUDA(__nv_bfloat16)
DDK_INSTANTIATE_KD_CUDA(double)

#undef DDK_INSTANTIATE_KD_CUDA

}  // namespace ddk_cuda
