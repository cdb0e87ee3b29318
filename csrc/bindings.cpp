// pybind11 bindings of fastkd._C. Tensors travel as raw device pointers (Python ints), sizes and strides
// in elements, and the CUDA stream as an int (torch.cuda.current_stream().cuda_stream), so the module
// has no libtorch dependency. Every launch checks its error and raises RuntimeError with CUDA's string.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastkd.h"

#ifndef FASTKD_BUILD_ARCHS
#define FASTKD_BUILD_ARCHS "unknown"
#endif
#ifndef FASTKD_NVCC_VERSION
#define FASTKD_NVCC_VERSION "unknown"
#endif
#ifndef FASTKD_BUILD_TIME
#define FASTKD_BUILD_TIME "unknown"
#endif

namespace py = pybind11;

namespace {

template <typename P> P ptr(std::uintptr_t v) { return reinterpret_cast<P>(v); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastkd._C.") + what + ": CUDA error " + std::to_string(err) + " (" +
                             cudaGetErrorName(err) + "): " + cudaGetErrorString(err));
  }
}

void distill(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t grad, std::uintptr_t labels,
             std::uintptr_t weight, std::uintptr_t loss, int64_t n_rows, int64_t vocab, int64_t stride_s,
             int64_t stride_t, int64_t stride_g, int dtype, int divergence, float inv_t, float kd_scale,
             const std::vector<float>& hyper, float ce_weight, std::uintptr_t stream, std::uintptr_t stats,
             int64_t stride_st) {
  if (student == 0 || teacher == 0 || weight == 0 || loss == 0) throw std::invalid_argument("distill: null pointer");
  if (ce_weight != 0.f && labels == 0) throw std::invalid_argument("distill: ce_weight > 0 needs labels");
  if (n_rows < 0 || vocab < 0) throw std::invalid_argument("distill: negative size");
  if (hyper.size() != fastkd::kNumHyper)
    throw std::invalid_argument("distill: hyper must hold " + std::to_string(fastkd::kNumHyper) + " values");
  fastkd::DistillArgs a{};
  a.student = ptr<const void*>(student);
  a.teacher = ptr<const void*>(teacher);
  a.grad = ptr<void*>(grad);
  a.labels = ptr<const int64_t*>(labels);
  a.weight = ptr<const float*>(weight);
  a.loss = ptr<float*>(loss);
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.stride_s = stride_s;
  a.stride_t = stride_t;
  a.stride_g = stride_g;
  a.inv_t = inv_t;
  a.kd_scale = kd_scale;
  for (int k = 0; k < fastkd::kNumHyper; ++k) a.hyper[k] = hyper[k];
  a.ce_weight = ce_weight;
  a.stats = ptr<float*>(stats);
  a.stride_st = stride_st;
  py::gil_scoped_release nogil;
  check(fastkd::launch_distill(a, dtype, divergence, ptr<cudaStream_t>(stream)), "distill");
}

void sparse_stats(std::uintptr_t student, std::uintptr_t ids, std::uintptr_t weight, std::uintptr_t lse,
                  std::uintptr_t lse_tail, std::uintptr_t s_ids, int64_t n_rows, int64_t vocab, int64_t k,
                  int64_t stride_s, int64_t stride_ids, int dtype, float inv_t, std::uintptr_t stream,
                  std::uintptr_t h_s, std::uintptr_t arg_s) {
  if (student == 0 || ids == 0 || weight == 0 || lse == 0 || s_ids == 0)
    throw std::invalid_argument("sparse_stats: null pointer");
  if ((h_s == 0) != (arg_s == 0)) throw std::invalid_argument("sparse_stats: h_s and arg_s go together");
  if (lse_tail != 0 && vocab > fastkd::sparse_max_tail_vocab())
    throw std::invalid_argument("sparse_stats: vocabulary too large for the tail bitmap");
  fastkd::SparseStatsArgs a{};
  a.student = ptr<const void*>(student);
  a.ids = ptr<const int64_t*>(ids);
  a.weight = ptr<const float*>(weight);
  a.lse = ptr<float*>(lse);
  a.lse_tail = ptr<float*>(lse_tail);
  a.s_ids = ptr<float*>(s_ids);
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.k = k;
  a.stride_s = stride_s;
  a.stride_ids = stride_ids;
  a.inv_t = inv_t;
  a.h_s = ptr<float*>(h_s);
  a.arg_s = ptr<int64_t*>(arg_s);
  py::gil_scoped_release nogil;
  check(fastkd::launch_sparse_stats(a, dtype, ptr<cudaStream_t>(stream)), "sparse_stats");
}

void sparse_grad(std::uintptr_t student, std::uintptr_t grad, std::uintptr_t ids, std::uintptr_t weight,
                 std::uintptr_t s_ids, std::uintptr_t lse, std::uintptr_t lse_base, std::uintptr_t a_coef,
                 std::uintptr_t b_coef, std::uintptr_t c_coef, int64_t n_rows, int64_t vocab, int64_t k,
                 int64_t stride_s, int64_t stride_g, int64_t stride_ids, int dtype, float inv_t, bool zero_base,
                 std::uintptr_t stream) {
  if (student == 0 || grad == 0 || ids == 0 || weight == 0 || s_ids == 0 || lse == 0 || lse_base == 0 ||
      a_coef == 0 || b_coef == 0 || c_coef == 0)
    throw std::invalid_argument("sparse_grad: null pointer");
  fastkd::SparseGradArgs a{};
  a.student = ptr<const void*>(student);
  a.grad = ptr<void*>(grad);
  a.ids = ptr<const int64_t*>(ids);
  a.weight = ptr<const float*>(weight);
  a.s_ids = ptr<const float*>(s_ids);
  a.lse = ptr<const float*>(lse);
  a.lse_base = ptr<const float*>(lse_base);
  a.a = ptr<const float*>(a_coef);
  a.b = ptr<const float*>(b_coef);
  a.c = ptr<const float*>(c_coef);
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.k = k;
  a.stride_s = stride_s;
  a.stride_g = stride_g;
  a.stride_ids = stride_ids;
  a.inv_t = inv_t;
  a.zero_base = zero_base ? 1 : 0;
  py::gil_scoped_release nogil;
  check(fastkd::launch_sparse_grad(a, dtype, ptr<cudaStream_t>(stream)), "sparse_grad");
}

void sinkhorn(std::uintptr_t a_ptr, std::uintptr_t b_ptr, std::uintptr_t cost, std::uintptr_t f, std::uintptr_t g,
              std::uintptr_t f_next, std::uintptr_t err, std::uintptr_t eps, int64_t batch, int64_t n, int64_t m,
              int n_iters, double err_eps, int dtype, std::uintptr_t stream) {
  if (a_ptr == 0 || b_ptr == 0 || cost == 0 || f == 0 || g == 0 || f_next == 0 || err == 0 || (n_iters > 0 && eps == 0))
    throw std::invalid_argument("sinkhorn: null pointer");
  if (n + m > fastkd::sinkhorn_max_points(dtype))
    throw std::invalid_argument("sinkhorn: n + m exceeds the one-block shared-memory limit");
  fastkd::SinkhornArgs a{};
  a.a = ptr<const void*>(a_ptr);
  a.b = ptr<const void*>(b_ptr);
  a.cost = ptr<const void*>(cost);
  a.f = ptr<void*>(f);
  a.g = ptr<void*>(g);
  a.f_next = ptr<void*>(f_next);
  a.err = ptr<void*>(err);
  a.eps = ptr<const void*>(eps);
  a.batch = batch;
  a.n = n;
  a.m = m;
  a.n_iters = n_iters;
  a.err_eps = err_eps;
  py::gil_scoped_release nogil;
  check(fastkd::launch_sinkhorn(a, dtype, ptr<cudaStream_t>(stream)), "sinkhorn");
}

py::dict build_info() {
  py::dict d;
  d["archs"] = FASTKD_BUILD_ARCHS;
  d["nvcc_version"] = FASTKD_NVCC_VERSION;
  d["build_time"] = FASTKD_BUILD_TIME;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cuda_runtime"] = rt;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd CUDA kernels (raw-pointer API; see fastkd/_cpp_lib.py)";
  m.def("distill", &distill, "Divergence loss + gradient on logits (csrc/distill.cu)", py::arg("student"),
        py::arg("teacher"), py::arg("grad"), py::arg("labels"), py::arg("weight"), py::arg("loss"),
        py::arg("n_rows"), py::arg("vocab"), py::arg("stride_s"), py::arg("stride_t"), py::arg("stride_g"),
        py::arg("dtype"), py::arg("divergence"), py::arg("inv_t"), py::arg("kd_scale"), py::arg("hyper"),
        py::arg("ce_weight"), py::arg("stream"), py::arg("stats") = 0, py::arg("stride_st") = 0);
  m.def("sparse_stats", &sparse_stats, "Sparse losses: lse, tail lse and s at the ids (csrc/sparse.cu)",
        py::arg("student"), py::arg("ids"), py::arg("weight"), py::arg("lse"), py::arg("lse_tail"),
        py::arg("s_ids"), py::arg("n_rows"), py::arg("vocab"), py::arg("k"), py::arg("stride_s"),
        py::arg("stride_ids"), py::arg("dtype"), py::arg("inv_t"), py::arg("stream"), py::arg("h_s") = 0,
        py::arg("arg_s") = 0);
  m.def("sparse_grad", &sparse_grad, "Sparse losses: gradient from (a, b, c) coefficients (csrc/sparse.cu)",
        py::arg("student"), py::arg("grad"), py::arg("ids"), py::arg("weight"), py::arg("s_ids"), py::arg("lse"),
        py::arg("lse_base"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("n_rows"), py::arg("vocab"),
        py::arg("k"), py::arg("stride_s"), py::arg("stride_g"), py::arg("stride_ids"), py::arg("dtype"),
        py::arg("inv_t"), py::arg("zero_base"), py::arg("stream"));
  m.attr("SPARSE_MAX_TAIL_VOCAB") = fastkd::sparse_max_tail_vocab();
  m.def("sinkhorn", &sinkhorn, "Batched log-domain Sinkhorn iterations, one block per problem (csrc/sinkhorn.cu)",
        py::arg("a"), py::arg("b"), py::arg("cost"), py::arg("f"), py::arg("g"), py::arg("f_next"), py::arg("err"),
        py::arg("eps"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("n_iters"), py::arg("err_eps"),
        py::arg("dtype"), py::arg("stream"));
  m.def("sinkhorn_max_points", &fastkd::sinkhorn_max_points, py::arg("dtype"));
  m.def("build_info", &build_info, "Build metadata: archs, nvcc version, build time, CUDA runtime version");
}
