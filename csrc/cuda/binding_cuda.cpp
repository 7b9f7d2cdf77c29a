// CUDA implementations of the ops ddk::kd_fwd and ddk::kd_bwd (schemas defined with the CPU
// sources by TORCH_LIBRARY(ddk, ...)); the kernels are in kd_loss_cuda.cu, free of torch headers.
//
//   ddk::kd_fwd(Tensor student, Tensor teacher, Tensor labels, float temperature, int divergence,
//               float beta, int ignore_index) -> (Tensor ce, Tensor kd, Tensor stats)
//   ddk::kd_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor stats, Tensor grad_ce,
//               Tensor grad_kd, float temperature, int divergence, float beta, int ignore_index)
//               -> Tensor
//
// divergence: 0 forward KL, 1 reverse KL, 2 JSD (beta 0 / 1 run as forward / reverse KL).
// ce, kd (N,) are float32 (float64 for float64 students); stats (N, 4) = [lse(zS/T), lse(zT/T),
// lse(zS), extra] are float64 (see kd_loss_cuda.cuh); the gradient (N, V) has the student's
// dtype. The teacher may be wider than the student (a column slice, or padded rows): only its
// first V columns are read, in place through its row stride.
#ifdef DDK_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "kd_loss_cuda.cuh"

namespace {

// A view with a contiguous last dimension (any row stride), copying only when needed.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor student, teacher, labels;
  ddk_cuda::KDRowArgs args;
};

Inputs check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                    double temperature, int64_t divergence, double beta, int64_t ignore_index) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && labels.is_cuda(), op,
              ": student, teacher and labels must be CUDA tensors");
  TORCH_CHECK(student.device() == teacher.device() && student.device() == labels.device(), op,
              ": student, teacher and labels must be on the same device");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": logits must be 2-D (N, V); got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == student.size(0), op, ": labels must be (N,) with N = ",
              student.size(0), "; got ", labels.sizes());
  TORCH_CHECK(teacher.size(0) == student.size(0) && teacher.size(1) >= student.size(1), op,
              ": teacher must be (N, Vt) with Vt >= V; got ", teacher.sizes(), " for student ", student.sizes());
  const auto st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": logits must be float32, float16, bfloat16 or float64; got ", st);
  TORCH_CHECK(divergence >= 0 && divergence <= 2, op, ": divergence must be 0, 1 or 2; got ", divergence);
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be > 0; got ", temperature);
  TORCH_CHECK(divergence != 2 || (beta >= 0.0 && beta <= 1.0), op, ": beta must be in [0, 1]; got ", beta);
  TORCH_CHECK(student.size(1) >= 1 || student.size(0) == 0, op, ": vocabulary must not be empty");
  Inputs in;
  in.student = rows_contiguous(student);
  // One input type per kernel: a teacher of another dtype is converted (a copy).
  in.teacher = rows_contiguous(teacher.scalar_type() == st ? teacher : teacher.to(st));
  in.labels = labels.to(at::kLong).contiguous();
  in.args.n = student.size(0);
  in.args.v = student.size(1);
  in.args.stride_s = in.student.stride(0);
  in.args.stride_t = in.teacher.stride(0);
  in.args.temperature = temperature;
  in.args.divergence = static_cast<int>(divergence);
  in.args.beta = beta;
  in.args.ignore_index = ignore_index;
  return in;
}

template <typename scalar_t, typename torch_t>
const scalar_t* ptr(const at::Tensor& t) {
  return reinterpret_cast<const scalar_t*>(t.data_ptr<torch_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& labels, double temperature,
                                                           int64_t divergence, double beta, int64_t ignore_index) {
  Inputs in = check_inputs("ddk::kd_fwd", student, teacher, labels, temperature, divergence, beta, ignore_index);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(acc_type(student.scalar_type()));
  at::Tensor ce = at::empty({in.args.n}, opts);
  at::Tensor kd = at::empty({in.args.n}, opts);
  at::Tensor stats = at::empty({in.args.n, 4}, opts.dtype(at::kDouble));
  if (in.args.n == 0) return {ce, kd, stats};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  cudaError_t err = cudaSuccess;
  switch (student.scalar_type()) {
    case at::kFloat:
      err = ddk_cuda::kd_forward_cuda<float>(ptr<float, float>(in.student), ptr<float, float>(in.teacher), lab,
                                             ce.data_ptr<float>(), kd.data_ptr<float>(), stats.data_ptr<double>(),
                                             in.args, stream);
      break;
    case at::kHalf:
      err = ddk_cuda::kd_forward_cuda<__half>(ptr<__half, at::Half>(in.student), ptr<__half, at::Half>(in.teacher),
                                              lab, ce.data_ptr<float>(), kd.data_ptr<float>(),
                                              stats.data_ptr<double>(), in.args, stream);
      break;
    case at::kBFloat16:
      err = ddk_cuda::kd_forward_cuda<__nv_bfloat16>(
          ptr<__nv_bfloat16, at::BFloat16>(in.student), ptr<__nv_bfloat16, at::BFloat16>(in.teacher), lab,
          ce.data_ptr<float>(), kd.data_ptr<float>(), stats.data_ptr<double>(), in.args, stream);
      break;
    case at::kDouble:
      err = ddk_cuda::kd_forward_cuda<double>(ptr<double, double>(in.student), ptr<double, double>(in.teacher), lab,
                                              ce.data_ptr<double>(), kd.data_ptr<double>(),
                                              stats.data_ptr<double>(), in.args, stream);
      break;
    default:
      TORCH_CHECK(false, "ddk::kd_fwd: unsupported dtype ", student.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "ddk::kd_fwd: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {ce, kd, stats};
}

at::Tensor kd_bwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                       const at::Tensor& stats, const at::Tensor& grad_ce, const at::Tensor& grad_kd,
                       double temperature, int64_t divergence, double beta, int64_t ignore_index) {
  Inputs in = check_inputs("ddk::kd_bwd", student, teacher, labels, temperature, divergence, beta, ignore_index);
  const int64_t n = in.args.n;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 4,
              "ddk::kd_bwd: stats must be (N, 4) from ddk::kd_fwd; got ", stats.sizes());
  TORCH_CHECK(grad_ce.numel() == n && grad_kd.numel() == n, "ddk::kd_bwd: grad_ce and grad_kd must have N = ", n,
              " elements; got ", grad_ce.numel(), " and ", grad_kd.numel());
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_type(student.scalar_type());
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const at::Tensor gce = grad_ce.reshape({n}).to(acc).contiguous();
  const at::Tensor gkd = grad_kd.reshape({n}).to(acc).contiguous();
  at::Tensor grad = at::empty({n, in.args.v}, student.options());  // contiguous
  if (n == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const int64_t stride_g = grad.stride(0);
  cudaError_t err = cudaSuccess;
  switch (student.scalar_type()) {
    case at::kFloat:
      err = ddk_cuda::kd_backward_cuda<float>(ptr<float, float>(in.student), ptr<float, float>(in.teacher), lab,
                                              st.data_ptr<double>(), gce.data_ptr<float>(), gkd.data_ptr<float>(),
                                              grad.data_ptr<float>(), stride_g, in.args, stream);
      break;
    case at::kHalf:
      err = ddk_cuda::kd_backward_cuda<__half>(
          ptr<__half, at::Half>(in.student), ptr<__half, at::Half>(in.teacher), lab, st.data_ptr<double>(),
          gce.data_ptr<float>(), gkd.data_ptr<float>(), reinterpret_cast<__half*>(grad.data_ptr<at::Half>()),
          stride_g, in.args, stream);
      break;
    case at::kBFloat16:
      err = ddk_cuda::kd_backward_cuda<__nv_bfloat16>(
          ptr<__nv_bfloat16, at::BFloat16>(in.student), ptr<__nv_bfloat16, at::BFloat16>(in.teacher), lab,
          st.data_ptr<double>(), gce.data_ptr<float>(), gkd.data_ptr<float>(),
          reinterpret_cast<__nv_bfloat16*>(grad.data_ptr<at::BFloat16>()), stride_g, in.args, stream);
      break;
    case at::kDouble:
      err = ddk_cuda::kd_backward_cuda<double>(ptr<double, double>(in.student), ptr<double, double>(in.teacher),
                                               lab, st.data_ptr<double>(), gce.data_ptr<double>(),
                                               gkd.data_ptr<double>(), grad.data_ptr<double>(), stride_g, in.args,
                                               stream);
      break;
    default:
      TORCH_CHECK(false, "ddk::kd_bwd: unsupported dtype ", student.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "ddk::kd_bwd: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddk, CUDA, m) {
  m.impl("kd_fwd", &kd_fwd_cuda);
  m.impl("kd_bwd", &kd_bwd_cuda);
}

#endif  // DDK_WITH_CUDA
