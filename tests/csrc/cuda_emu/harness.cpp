// Runs ddk_cuda::kd_forward_cuda + kd_backward_cuda (host-emulated, see emu.h) on raw files.
// usage: harness f32|f64|f16|bf16 N V stride_s stride_t T divergence beta ignore_index DIR
// reads DIR/{zs,zt,lab,gce,gkd}.bin, writes DIR/{ce,kd,stats,grad}.out
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "kd_loss_cuda.cuh"

template <class T>
static std::vector<T> read_file(const std::string& path, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  return v;
}

template <class T>
static void write_file(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

template <class S>
static int run(const ddk_cuda::KDRowArgs& a, const std::string& dir) {
  using A = typename ddk_cuda::AccType<S>::type;
  const size_t n = static_cast<size_t>(a.n);
  auto zs = read_file<S>(dir + "/zs.bin", n * a.stride_s);
  auto zt = read_file<S>(dir + "/zt.bin", n * a.stride_t);
  auto lab = read_file<int64_t>(dir + "/lab.bin", n);
  auto gce = read_file<A>(dir + "/gce.bin", n);
  auto gkd = read_file<A>(dir + "/gkd.bin", n);
  std::vector<A> ce(n), kd(n);
  std::vector<double> stats(n * 4);
  std::vector<S> grad(n * a.v);
  cudaError_t e = ddk_cuda::kd_forward_cuda<S>(zs.data(), zt.data(), lab.data(), ce.data(), kd.data(),
                                               stats.data(), a, nullptr);
  if (e != cudaSuccess) return std::printf("kd_forward_cuda returned %d\n", static_cast<int>(e)), 1;
  e = ddk_cuda::kd_backward_cuda<S>(zs.data(), zt.data(), lab.data(), stats.data(), gce.data(), gkd.data(),
                                    grad.data(), a.v, a, nullptr);
  if (e != cudaSuccess) return std::printf("kd_backward_cuda returned %d\n", static_cast<int>(e)), 1;
  write_file(dir + "/ce.out", ce);
  write_file(dir + "/kd.out", kd);
  write_file(dir + "/stats.out", stats);
  write_file(dir + "/grad.out", grad);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 11) return std::printf("usage: harness dtype N V stride_s stride_t T div beta ignore DIR\n"), 2;
  const std::string dtype = argv[1];
  ddk_cuda::KDRowArgs a{};
  a.n = std::atoll(argv[2]);
  a.v = std::atoll(argv[3]);
  a.stride_s = std::atoll(argv[4]);
  a.stride_t = std::atoll(argv[5]);
  a.temperature = std::atof(argv[6]);
  a.divergence = std::atoi(argv[7]);
  a.beta = std::atof(argv[8]);
  a.ignore_index = std::atoll(argv[9]);
  const std::string dir = argv[10];
  if (dtype == "f32") return run<float>(a, dir);
  if (dtype == "f64") return run<double>(a, dir);
  if (dtype == "f16") return run<__half>(a, dir);
  if (dtype == "bf16") return run<__nv_bfloat16>(a, dir);
  return std::printf("unknown dtype %s\n", dtype.c_str()), 2;
}
