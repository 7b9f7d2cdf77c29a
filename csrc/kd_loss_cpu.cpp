// CPU kernels of the KD loss on given logits: ops ddk::kd_fwd and ddk::kd_bwd.
//
// One row of N is one task (at::parallel_for, i.e. OpenMP in the standard torch build, so
// torch.set_num_threads applies). Inside a row the vocabulary is walked in blocks of kBlock
// elements; each inner loop is a `#pragma omp simd` loop over contiguous memory that the compiler
// vectorises (fast_exp / fast_log in kd_vec_math.h are branch-free). bfloat16/float16 blocks are
// widened into a float buffer first; float32 is read in place; float64 uses double throughout.
//
// Notation of one row: s = zS/T, t = zT/T, q = softmax(s), p = softmax(t).
//
// Forward, forward/reverse KL: ONE sweep over the row. Per block: block max of zS and zT, rescale
// the running (double) row sums if the max grew, then one vector loop accumulating
//   Ss = sum exp(s - Ms/T), St = sum exp(t - Mt/T), Sz = sum exp(zS - Ms)   (Sz only if T != 1)
//   D  = sum e_t * ((zT - Mt) - (zS - Ms))   (forward KL)
// so that KL(p||q) = D/(T St) - log St + log Ss. Keeping the differences relative to the running
// maxima avoids the cancellation of sum p t - lse(t) with |t| ~ 100. Reverse KL sums
// U = sum e_s u and Su = sum e_s in double (u = (zS - zT)/T) for E_q[s - t] = U/Su, and
// KL(q||p) = E_q[s - t] - (lse(s) - lse(t)) in double.
// Block sums are float lanes over <= kBlock elements, folded into double row sums per block.
// JSD: the same sweep for the three lse's, then one more sweep with log m = mx + log(1 + e^(mn-mx)).
//
// Backward: one sweep writing the gradient row (see reference.kd_logits_grad_reference):
//   d zS = g_ce (softmax(zS) - onehot) + (g_kd / T) * dD/ds, with
//   forward KL: q - p;  reverse KL: q ((s - t) - E_q[s - t]) = q (log q - log p - KL(q||p));
//   JSD: q (g - (1-beta) KL(q||m)), g = (1 - beta) (log q - log m). The row sums these need are in
//   stats (N, 4), float64: [lse(s), lse(t), lse(zS), extra]. Each lse is split into a float pair
//   hi + lo so that log q = (s - hi) - lo is as exact as a log_softmax (one float lse near 100 is
//   off by ~ulp(100) = 8e-6, an error every probability of the row would inherit).
//
// Ignored rows (label == ignore_index) get ce = kd = 0, stats = 0 and a zero gradient, no work.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "kd_checks.h"
#include "kd_vec_math.h"

namespace ddk {
namespace {

constexpr int64_t kBlock = 2048;
enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)n;
    (void)buf;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
    return buf;
  }
}

struct RowOut {
  double lse_s, lse_t, lse_z, kd, extra;
};

struct Params {
  double T, inv_T, beta;
  int kind;
};

// The one-sweep pass over one row: maxima, the three sums and (KL kinds) D. Returns the lse's and,
// for the KL kinds, the divergence; JSD fills kd/extra in jsd_sweep.
template <typename scalar_t, typename acc_t, int KIND, bool T1>
RowOut online_sweep(const scalar_t* zs, const scalar_t* zt, int64_t V, double inv_T, acc_t* bs, acc_t* bt) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t invT = static_cast<acc_t>(inv_T);
  double Ms = 0, Mt = 0, Ss = 0, St = 0, Sz = 0, D = 0;
  double U = 0, Su = 0;  // reverse KL: sum e_s u and sum e_s in double, u = (zS - zT)/T as backward forms it
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const acc_t* xs = widen<scalar_t, acc_t>(zs + j0, n, bs);
    const acc_t* xt = widen<scalar_t, acc_t>(zt + j0, n, bt);
    acc_t bms = ninf, bmt = ninf;
#pragma omp simd reduction(max : bms, bmt)
    for (int64_t j = 0; j < n; ++j) {
      bms = std::max(bms, xs[j]);
      bmt = std::max(bmt, xt[j]);
    }
    if (j0 == 0) {
      Ms = bms;
      Mt = bmt;
    } else if (bms > Ms || bmt > Mt) {
      const double nMs = std::max(Ms, static_cast<double>(bms));
      const double nMt = std::max(Mt, static_cast<double>(bmt));
      const double dMs = nMs - Ms, dMt = nMt - Mt;
      const double cs = std::exp(-dMs * inv_T), ct = std::exp(-dMt * inv_T);
      if constexpr (KIND == kForwardKL) D = ct * (D + St * (dMs - dMt));
      if constexpr (KIND == kReverseKL) {
        U *= cs;
        Su *= cs;
      }
      Ss *= cs;
      St *= ct;
      if constexpr (!T1) Sz *= std::exp(-dMs);
      Ms = nMs;
      Mt = nMt;
    }
    const acc_t ms = static_cast<acc_t>(Ms), mt = static_cast<acc_t>(Mt);
    acc_t ss = 0, st = 0, sz = 0, d = 0;
#pragma omp simd reduction(+ : ss, st, sz, d)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = xs[j] - ms;
      const acc_t b = xt[j] - mt;
      const acc_t es = fast_exp(a * invT);
      const acc_t et = fast_exp(b * invT);
      ss += es;
      st += et;
      if constexpr (KIND == kForwardKL) d += et * (b - a);
      if constexpr (!T1) sz += fast_exp(a);
    }
    Ss += ss;
    St += st;
    Sz += sz;
    D += d;
    if constexpr (KIND == kReverseKL) {
      // E_q[u] over the very float values u the backward forms: at a peaked row's top entry the
      // backward's u - E then cancels u's rounding. Summed in double lanes (a float sum of ~50 *
      // e_s would put ~1e-7 * 50 into E, which the gradient at the top entry multiplies by g_kd/T).
      double ub = 0, sb = 0;
#pragma omp simd reduction(+ : ub, sb)
      for (int64_t j = 0; j < n; ++j) {
        const double es = static_cast<double>(fast_exp((xs[j] - ms) * invT));
        ub += es * static_cast<double>((xs[j] - xt[j]) * invT);
        sb += es;
      }
      U += ub;
      Su += sb;
    }
  }
  RowOut r{};
  const double log_ss = std::log(Ss), log_st = std::log(St);
  r.lse_s = Ms * inv_T + log_ss;
  r.lse_t = Mt * inv_T + log_st;
  r.lse_z = T1 ? r.lse_s : Ms + std::log(Sz);
  if constexpr (KIND == kForwardKL) {
    r.kd = inv_T * D / St - log_st + log_ss;
    r.extra = 0.0;
  } else if constexpr (KIND == kReverseKL) {
    r.extra = U / Su;  // E_q[s - t]
    r.kd = r.extra - ((Ms - Mt) * inv_T + (log_ss - log_st));  // E_q[s - t] - (lse(s) - lse(t)), double
  }
  return r;
}

// log m with m = beta p + (1 - beta) q, from log p + log(beta) and log q + log(1 - beta).
template <typename acc_t>
inline acc_t log_mix(acc_t x, acc_t y) {
  const acc_t mx = std::max(x, y), mn = std::min(x, y);
  return mx + fast_log(acc_t(1) + fast_exp(mn - mx));
}

// Second sweep of JSD: KL(p||m) and KL(q||m) given the lse's.
template <typename scalar_t, typename acc_t>
void jsd_sweep(const scalar_t* zs, const scalar_t* zt, int64_t V, const Params& P, RowOut& r, acc_t* bs, acc_t* bt) {
  const acc_t invT = static_cast<acc_t>(P.inv_T);
  const acc_t ls = static_cast<acc_t>(r.lse_s), lt = static_cast<acc_t>(r.lse_t);
  const acc_t ls_lo = static_cast<acc_t>(r.lse_s - static_cast<double>(ls));
  const acc_t lt_lo = static_cast<acc_t>(r.lse_t - static_cast<double>(lt));
  const acc_t logb = static_cast<acc_t>(std::log(P.beta)), log1mb = static_cast<acc_t>(std::log1p(-P.beta));
  double KP = 0, KQ = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const acc_t* xs = widen<scalar_t, acc_t>(zs + j0, n, bs);
    const acc_t* xt = widen<scalar_t, acc_t>(zt + j0, n, bt);
    acc_t kp = 0, kq = 0;
#pragma omp simd reduction(+ : kp, kq)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t lq = (xs[j] * invT - ls) - ls_lo;
      const acc_t lp = (xt[j] * invT - lt) - lt_lo;
      const acc_t lm = log_mix(lp + logb, lq + log1mb);
      kp += fast_exp(lp) * (lp - lm);
      kq += fast_exp(lq) * (lq - lm);
    }
    KP += kp;
    KQ += kq;
  }
  r.kd = P.beta * KP + (1.0 - P.beta) * KQ;
  r.extra = KQ;
}

template <typename scalar_t, typename acc_t, int KIND, bool T1>
RowOut forward_row(const scalar_t* zs, const scalar_t* zt, int64_t V, const Params& P, acc_t* bs, acc_t* bt) {
  RowOut r = online_sweep<scalar_t, acc_t, KIND, T1>(zs, zt, V, P.inv_T, bs, bt);
  if constexpr (KIND == kJSD) jsd_sweep<scalar_t, acc_t>(zs, zt, V, P, r, bs, bt);
  return r;
}

template <typename scalar_t, typename acc_t, int KIND, bool T1>
void backward_row(const scalar_t* zs, const scalar_t* zt, scalar_t* out, int64_t V, const Params& P,
                  const double* st, acc_t gce, acc_t gkd, int64_t label, acc_t* bs, acc_t* bt, acc_t* bo) {
  const acc_t invT = static_cast<acc_t>(P.inv_T);
  const acc_t ls = static_cast<acc_t>(st[0]), lt = static_cast<acc_t>(st[1]), lz = static_cast<acc_t>(st[2]);
  const acc_t ls_lo = static_cast<acc_t>(st[0] - static_cast<double>(ls));
  const acc_t lt_lo = static_cast<acc_t>(st[1] - static_cast<double>(lt));
  const acc_t lz_lo = static_cast<acc_t>(st[2] - static_cast<double>(lz));
  const acc_t extra = static_cast<acc_t>(st[3]);
  const acc_t extra_lo = static_cast<acc_t>(st[3] - static_cast<double>(extra));
  const acc_t gk = gkd * invT;
  const acc_t omb = static_cast<acc_t>(1.0 - P.beta);
  const acc_t logb = static_cast<acc_t>(KIND == kJSD ? std::log(P.beta) : 0.0);
  const acc_t log1mb = static_cast<acc_t>(KIND == kJSD ? std::log1p(-P.beta) : 0.0);
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const acc_t* xs = widen<scalar_t, acc_t>(zs + j0, n, bs);
    const acc_t* xt = widen<scalar_t, acc_t>(zt + j0, n, bt);
    acc_t* o;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      o = out + j0;
    } else {
      o = bo;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t s = xs[j] * invT;
      const acc_t lq = (s - ls) - ls_lo;
      const acc_t q = fast_exp(lq);
      const acc_t soft = T1 ? q : fast_exp((xs[j] - lz) - lz_lo);
      acc_t dd;
      if constexpr (KIND == kForwardKL) {
        dd = q - fast_exp((xt[j] * invT - lt) - lt_lo);
      } else if constexpr (KIND == kReverseKL) {
        dd = q * (((xs[j] - xt[j]) * invT - extra) - extra_lo);
      } else {
        const acc_t lp = (xt[j] * invT - lt) - lt_lo;
        dd = q * (omb * (lq - log_mix(lp + logb, lq + log1mb)) - omb * extra);
      }
      o[j] = gce * soft + gk * dd;
    }
    if (label >= j0 && label < j0 + n) o[label - j0] -= gce;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t j = 0; j < n; ++j) out[j0 + j] = static_cast<scalar_t>(o[j]);
    }
  }
}

template <typename F>
void dispatch_kind(int kind, bool t1, F&& f) {
  if (kind == kForwardKL) {
    t1 ? f(std::integral_constant<int, kForwardKL>{}, std::true_type{})
       : f(std::integral_constant<int, kForwardKL>{}, std::false_type{});
  } else if (kind == kReverseKL) {
    t1 ? f(std::integral_constant<int, kReverseKL>{}, std::true_type{})
       : f(std::integral_constant<int, kReverseKL>{}, std::false_type{});
  } else {
    t1 ? f(std::integral_constant<int, kJSD>{}, std::true_type{})
       : f(std::integral_constant<int, kJSD>{}, std::false_type{});
  }
}

Params make_params(const KDOptions& o) { return Params{o.temperature, 1.0 / o.temperature, o.beta, o.kind}; }

// CPU tensors only (the CUDA kernels of the same ops are registered by csrc/cuda/binding_cuda.cpp).
KDInputs check_cpu(const char* op, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && labels.device().is_cpu(), op,
              ": the CPU kernel needs CPU tensors");
  return check_logits(op, student, teacher, labels);
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                         const at::Tensor& labels_in, double temperature,
                                                         int64_t divergence, double beta, int64_t ignore_index) {
  const Params P = make_params(check_options("ddk::kd_fwd", temperature, divergence, beta, ignore_index));
  const KDInputs in = check_cpu("ddk::kd_fwd", student_in, teacher_in, labels_in);
  const at::Tensor &student = in.student, &teacher = in.teacher, &labels = in.labels;
  const int64_t N = in.n, V = in.v;
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = student.options().dtype(acc_type);
  at::Tensor ce = at::zeros({N}, opts), kd = at::zeros({N}, opts);
  at::Tensor stats = at::zeros({N, 4}, student.options().dtype(at::kDouble));
  if (N == 0) return {ce, kd, stats};
  const bool t1 = P.T == 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "ddk_kd_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* zs = student.const_data_ptr<scalar_t>();
    const scalar_t* zt = teacher.const_data_ptr<scalar_t>();
    const int64_t ss = student.stride(0), ts = teacher.stride(0);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    acc_t* ce_p = ce.mutable_data_ptr<acc_t>();
    acc_t* kd_p = kd.mutable_data_ptr<acc_t>();
    double* st_p = stats.mutable_data_ptr<double>();
    dispatch_kind(P.kind, t1, [&](auto kind_c, auto t1_c) {
      constexpr int KIND = decltype(kind_c)::value;
      constexpr bool T1 = decltype(t1_c)::value;
      at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
        alignas(64) acc_t bs[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
        alignas(64) acc_t bt[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
        for (int64_t i = r0; i < r1; ++i) {
          const int64_t y = lab[i];
          if (y == ignore_index) continue;
          TORCH_CHECK(y >= 0 && y < V, "ddk::kd_fwd: label ", y, " of row ", i, " is outside [0, ", V,
                      ") and is not ignore_index=", ignore_index);
          const scalar_t* rs = zs + i * ss;
          RowOut r = forward_row<scalar_t, acc_t, KIND, T1>(rs, zt + i * ts, V, P, bs, bt);
          ce_p[i] = static_cast<acc_t>(r.lse_z - static_cast<double>(static_cast<acc_t>(rs[y])));
          kd_p[i] = static_cast<acc_t>(r.kd);
          double* s = st_p + 4 * i;
          s[0] = r.lse_s;
          s[1] = r.lse_t;
          s[2] = r.lse_z;
          s[3] = r.extra;
        }
      });
    });
  });
  return {ce, kd, stats};
}

at::Tensor kd_bwd_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& labels_in,
                      const at::Tensor& stats_in, const at::Tensor& grad_ce_in, const at::Tensor& grad_kd_in,
                      double temperature, int64_t divergence, double beta, int64_t ignore_index) {
  const Params P = make_params(check_options("ddk::kd_bwd", temperature, divergence, beta, ignore_index));
  const KDInputs in = check_cpu("ddk::kd_bwd", student_in, teacher_in, labels_in);
  const at::Tensor &student = in.student, &teacher = in.teacher, &labels = in.labels;
  const int64_t N = in.n, V = in.v;
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_backward("ddk::kd_bwd", stats_in, grad_ce_in, grad_kd_in, N);
  at::Tensor stats = stats_in.to(at::kDouble).contiguous();
  at::Tensor gce = grad_ce_in.to(acc_type).reshape({N}).contiguous();
  at::Tensor gkd = grad_kd_in.to(acc_type).reshape({N}).contiguous();
  at::Tensor grad = at::empty({N, V}, student.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || V == 0) return grad;
  const bool t1 = P.T == 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "ddk_kd_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* zs = student.const_data_ptr<scalar_t>();
    const scalar_t* zt = teacher.const_data_ptr<scalar_t>();
    const int64_t ss = student.stride(0), ts = teacher.stride(0);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const double* st_p = stats.const_data_ptr<double>();
    const acc_t* gce_p = gce.const_data_ptr<acc_t>();
    const acc_t* gkd_p = gkd.const_data_ptr<acc_t>();
    scalar_t* g_p = grad.mutable_data_ptr<scalar_t>();
    dispatch_kind(P.kind, t1, [&](auto kind_c, auto t1_c) {
      constexpr int KIND = decltype(kind_c)::value;
      constexpr bool T1 = decltype(t1_c)::value;
      at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
        constexpr int64_t kb = std::is_same_v<scalar_t, acc_t> ? 1 : kBlock;
        alignas(64) acc_t bs[kb];
        alignas(64) acc_t bt[kb];
        alignas(64) acc_t bo[kb];
        for (int64_t i = r0; i < r1; ++i) {
          scalar_t* out = g_p + i * V;
          const int64_t y = lab[i];
          if (y == ignore_index || (gce_p[i] == acc_t(0) && gkd_p[i] == acc_t(0))) {
            std::fill(out, out + V, scalar_t(0));
            continue;
          }
          TORCH_CHECK(y >= 0 && y < V, "ddk::kd_bwd: label ", y, " of row ", i, " is outside [0, ", V,
                      ") and is not ignore_index=", ignore_index);
          backward_row<scalar_t, acc_t, KIND, T1>(zs + i * ss, zt + i * ts, out, V, P, st_p + 4 * i, gce_p[i],
                                                  gkd_p[i], y, bs, bt, bo);
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY(ddk, m) {
  m.def(
      "kd_fwd(Tensor student, Tensor teacher, Tensor labels, float temperature, int divergence, float beta, "
      "int ignore_index) -> (Tensor ce, Tensor kd, Tensor stats)");
  m.def(
      "kd_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor stats, Tensor grad_ce, Tensor grad_kd, "
      "float temperature, int divergence, float beta, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddk, CPU, m) {
  m.impl("kd_fwd", &kd_fwd_cpu);
  m.impl("kd_bwd", &kd_bwd_cpu);
}

}  // namespace ddk

// `import ddk_kernels._C` only has to load this library (which registers the ops above); the
// module itself is empty. The CUDA sources (csrc/cuda/) must not define another PyInit__C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ddk_kernels compiled ops (torch.ops.ddk)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
