// CUDA implementations of the ops ddk::kd_fwd and ddk::kd_bwd (schemas defined with the CPU
// sources by TORCH_LIBRARY(ddk, ...)); the kernels are in kd_loss_cuda.cu, free of torch headers.
//
//   ddk::kd_fwd(Tensor student, Tensor teacher, Tensor labels, float temperature, int divergence,
//               float beta, int ignore_index) -> (Tensor ce, Tensor kd, Tensor stats)
//   ddk::kd_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor stats, Tensor grad_ce,
//               Tensor grad_kd, float temperature, int divergence, float beta, int ignore_index)
//               -> Tensor
//
// Inputs are checked by csrc/kd_checks.h, as in the CPU binding (the rules of the Python boundary).
// ce, kd (N,) are float32 (float64 for float64 students); stats (N, 4) = [lse(zS/T), lse(zT/T),
// lse(zS), extra] are float64 (see kd_loss_cuda.cuh); the gradient (N, V) has the student's
// dtype.
#ifdef DDK_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../kd_checks.h"
#include "kd_loss_cuda.cuh"

namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor student, teacher, labels;
  ddk_cuda::KDRowArgs args;
};

Inputs check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                    double temperature, int64_t divergence, double beta, int64_t ignore_index) {
  const ddk::KDOptions o = ddk::check_options(op, temperature, divergence, beta, ignore_index);
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && labels.is_cuda(), op,
              ": student, teacher and labels must be CUDA tensors");
  const ddk::KDInputs in = ddk::check_logits(op, student, teacher, labels);
  Inputs out;
  out.student = in.student;
  out.teacher = in.teacher;
  out.labels = in.labels;
  out.args.n = in.n;
  out.args.v = in.v;
  out.args.stride_s = in.student.stride(0);
  out.args.stride_t = in.teacher.stride(0);
  out.args.temperature = o.temperature;
  out.args.divergence = o.kind;
  out.args.beta = o.beta;
  out.args.ignore_index = o.ignore_index;
  return out;
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
  ddk::check_backward("ddk::kd_bwd", stats, grad_ce, grad_kd, n);
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
