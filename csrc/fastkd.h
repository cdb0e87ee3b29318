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
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Divergence codes: `enum Divergence` in csrc/distill.cu, its only user (launch_distill takes the code as an
// int), so that a new divergence touches one C++ file.

// Hyperparameter slots of DistillArgs::hyper, in fastkd/core/divergences.py HYPER_NAMES order (tested).
enum Hyper : int { kBeta = 0, kAlpha = 1, kMu = 2, kT = 3, kNumHyper = 4 };

// One divergence loss on logits: see csrc/distill.cu for the per-row contract.
struct DistillArgs {
  const void* student;    // (n_rows, vocab), row stride stride_s, column stride 1
  const void* teacher;    // (n_rows, vocab), row stride stride_t, column stride 1
  void* grad;             // (n_rows, vocab) or nullptr, row stride stride_g; may alias student
  const int64_t* labels;  // (n_rows,) or nullptr (needed when ce_weight > 0)
  const float* weight;    // (n_rows,) fp32, 0 = excluded row
  float* loss;            // (n_rows,) fp32 out
  int64_t n_rows, vocab, stride_s, stride_t, stride_g;
  float inv_t, kd_scale, ce_weight;
  float hyper[kNumHyper];  // beta, alpha, mu, t (enum Hyper)
  float* stats;            // (n_rows, 4) fp32 out or nullptr, row stride stride_st (fastkd/core/stats.py)
  int64_t stride_st;
};

cudaError_t launch_distill(const DistillArgs& args, int dtype, int divergence, cudaStream_t stream);

// Sparse (top-k / tail / sampled) losses: the two vocabulary-wide passes (csrc/sparse.cu). The K-level
// terms between them (fastkd.backends.torch_sparse.sparse_terms) are O(N·K) and run in PyTorch.
struct SparseStatsArgs {
  const void* student;   // (n_rows, vocab), row stride stride_s
  const int64_t* ids;    // (n_rows, k), row stride stride_ids; −1 = padding
  const float* weight;   // (n_rows,), 0 = excluded row
  float* lse;            // (n_rows,) out: logsumexp_v s_v − sh (s = z / T; sh: the row's shift, sparse.cu)
  float* lse_tail;       // (n_rows,) out or nullptr: logsumexp over v not in ids, − sh
  float* s_ids;          // (n_rows, k) out, contiguous: s − sh at the ids, −inf at padding, NaN at bad ids
  int64_t n_rows, vocab, k, stride_s, stride_ids;
  float inv_t;
  float* h_s = nullptr;      // (n_rows,) out or nullptr (no stats): entropy of softmax(s) over the row
  int64_t* arg_s = nullptr;  // (n_rows,) out (with h_s): first argmax of s
};

struct SparseGradArgs {
  const void* student;   // (n_rows, vocab), row stride stride_s
  void* grad;            // (n_rows, vocab), row stride stride_g (may alias the student)
  const int64_t* ids;    // (n_rows, k), row stride stride_ids
  const float* weight;   // (n_rows,)
  const float* s_ids;    // (n_rows, k) contiguous, from the stats pass (s − sh)
  const float* lse;      // (n_rows,) from the stats pass (relative to sh)
  const float* lse_base; // (n_rows,) normaliser of the off-id term (lse_tail for topk_tail, else lse)
  const float* a;        // (n_rows,)  grad_v = a·e^(s_v − sh − lse) + Σ_k c_k·[v = id_k] at the ids,
  const float* b;        // (n_rows,)  grad_v = b·e^(s_v − sh − lse_base) off the ids
  const float* c;        // (n_rows, k) contiguous
  int64_t n_rows, vocab, k, stride_s, stride_g, stride_ids;
  float inv_t;
  int zero_base;         // 1: the q-term is absent (top-k rkl/jsd): grad = Σ_k c_k·[v = id_k]
};

cudaError_t launch_sparse_stats(const SparseStatsArgs& args, int dtype, cudaStream_t stream);
cudaError_t launch_sparse_grad(const SparseGradArgs& args, int dtype, cudaStream_t stream);
// Largest vocabulary the tail pass supports (its id bitmap lives in shared memory).
int64_t sparse_max_tail_vocab();

// Batched log-domain Sinkhorn on a stored cost, one block per problem (csrc/sinkhorn.cu).
struct SinkhornArgs {
  const void* a;         // (batch, n) marginal, contiguous
  const void* b;         // (batch, m) marginal, contiguous
  const void* cost;      // (batch, n, m) contiguous
  void* f;               // (batch, n) in/out potentials
  void* g;               // (batch, m) in/out potentials
  void* f_next;          // (batch, n) out: the f half-step after the last g (for the error)
  void* err;             // (batch,) out: ‖P1 − a‖₁ after the last iteration
  const void* eps;       // (n_iters,) ε of each iteration
  int64_t batch, n, m;
  int n_iters;
  double err_eps;        // ε of the error half-step
};

// dtype: kFloat32 or kFloat64.
cudaError_t launch_sinkhorn(const SinkhornArgs& args, int dtype, cudaStream_t stream);
int64_t sinkhorn_max_points(int dtype);  // largest n + m one block's shared memory holds

}  // namespace fastkd
