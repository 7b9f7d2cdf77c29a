// Input checks of the ops ddk::kd_fwd and ddk::kd_bwd, shared by the CPU binding (kd_loss_cpu.cpp)
// and the CUDA binding (cuda/binding_cuda.cpp), with the rules of the Python boundary (ddk.kd_loss):
//
//   student (N, V) float32/float16/bfloat16/float64, V >= 1 unless N == 0, last dim contiguous
//     (any row stride; copied otherwise);
//   teacher (N, Vt) with Vt >= V, any of those dtypes: only its first V columns are read, in place
//     through its row stride; a teacher of another dtype is converted to the student's (a copy);
//   labels (N,) int64 or int32 (converted to int64); a label outside [0, V) that is not
//     ignore_index is an error of the kernel;
//   temperature finite and > 0; divergence 0 (forward KL), 1 (reverse KL) or 2 (JSD);
//   beta in [0, 1] for JSD, where beta 0 / 1 run as forward / reverse KL exactly;
//   kd_bwd: stats (N, 4) from kd_fwd, grad_ce and grad_kd with N elements.
//
// The device of the tensors is checked by each binding (they register for one dispatch key).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace ddk {

struct KDOptions {
  double temperature;
  double beta;
  int kind;  // the effective divergence: 0 forward KL, 1 reverse KL, 2 JSD with 0 < beta < 1
  int64_t ignore_index;
};

struct KDInputs {
  at::Tensor student, teacher, labels;  // ready for the kernels (see check_logits)
  int64_t n, v;
};

inline KDOptions check_options(const char* op, double temperature, int64_t divergence, double beta,
                               int64_t ignore_index) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0; got ",
              temperature);
  TORCH_CHECK(divergence >= 0 && divergence <= 2, op,
              ": divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD); got ", divergence);
  TORCH_CHECK(divergence != 2 || (beta >= 0 && beta <= 1), op, ": beta must be in [0, 1]; got ", beta);
  int kind = static_cast<int>(divergence);
  if (kind == 2 && beta == 0.0) kind = 0;
  if (kind == 2 && beta == 1.0) kind = 1;
  return KDOptions{temperature, beta, kind, ignore_index};
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A view whose last dimension is contiguous (any row stride), copying only when needed.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

inline KDInputs check_logits(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& labels) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": student and teacher must be 2-D (N, V); got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device() && student.device() == labels.device(), op,
              ": student, teacher and labels must be on the same device");
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(teacher.size(0) == n && teacher.size(1) >= v, op, ": teacher must be (N, Vt) with Vt >= V = ", v,
              " (extra columns are not read); got ", teacher.sizes(), " for student ", student.sizes());
  TORCH_CHECK(v >= 1 || n == 0, op, ": student must have V >= 1 columns; got ", student.sizes());
  TORCH_CHECK(is_float_type(student.scalar_type()) && is_float_type(teacher.scalar_type()), op,
              ": logits must be float32, float16, bfloat16 or float64; got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must be (N,) with N = ", n, "; got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32; got ", labels.scalar_type());
  const at::Tensor t = teacher.scalar_type() == student.scalar_type() ? teacher : teacher.to(student.scalar_type());
  return KDInputs{rows_contiguous(student), rows_contiguous(t), labels.to(at::kLong).contiguous(), n, v};
}

inline void check_backward(const char* op, const at::Tensor& stats, const at::Tensor& grad_ce,
                           const at::Tensor& grad_kd, int64_t n) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 4, op,
              ": stats must be (N, 4) from ddk::kd_fwd; got ", stats.sizes());
  TORCH_CHECK(grad_ce.numel() == n && grad_kd.numel() == n, op, ": grad_ce and grad_kd must have N = ", n,
              " elements; got ", grad_ce.numel(), " and ", grad_kd.numel());
}

}  // namespace ddk
