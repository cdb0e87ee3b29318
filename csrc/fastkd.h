// fastkd CUDA extension: launcher declarations shared by the kernels (*.cu) and the bindings.
//
// Launchers take raw device pointers, sizes, strides (in elements) and a cudaStream_t; they never
// synchronise. Each returns the cudaError_t of its launch (cudaSuccess or the launch error), which the
// pybind11 layer turns into a Python RuntimeError carrying cudaGetErrorString.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastkd {

// Element type of a floating-point tensor (matches fastkd/_cpp_lib.py DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Divergence codes (matches fastkd/params.py DIVERGENCE_CODES).
enum Divergence : int { kFKL = 0, kRKL = 1, kJSD = 2, kSymKL = 3, kSKL = 4, kSRKL = 5, kTVD = 6, kAKL = 7, kTAID = 8 };

// One divergence loss on logits: see csrc/distill.cu for the per-row contract.
struct DistillArgs {
  const void* student;    // (n_rows, vocab), row stride stride_s, column stride 1
  const void* teacher;    // (n_rows, vocab), row stride stride_t, column stride 1
  void* grad;             // (n_rows, vocab) or nullptr, row stride stride_g; may alias student
  const int64_t* labels;  // (n_rows,) or nullptr (needed when ce_weight > 0)
  const float* weight;    // (n_rows,) fp32, 0 = excluded row
  float* loss;            // (n_rows,) fp32 out
  int64_t n_rows, vocab, stride_s, stride_t, stride_g;
  float inv_t, kd_scale, beta, alpha, mu, t, ce_weight;
};

cudaError_t launch_distill(const DistillArgs& args, int dtype, int divergence, cudaStream_t stream);

}  // namespace fastkd
