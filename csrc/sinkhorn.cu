// Batched small-problem log-domain Sinkhorn: one block per problem, potentials in shared memory, one
// block barrier per half-iteration. Iterates (f first, from the caller's g):
//   f_i = −ε log Σ_j b_j exp((g_j − C_ij)/ε)     one warp per row i (lanes over j: coalesced C reads)
//   g_j = −ε log Σ_i a_i exp((f_i − C_ij)/ε)     one thread per column j (warp lanes over j: coalesced)
// with zero-mass points contributing log 0 = −inf. After n_iters iterations the block computes one more
// f half-step (f_next, with err_eps) and the row-marginal error Σ_i |a_i·expm1((f_i − f_next_i)/ε)| over
// a_i > 0. The host runs segments of iterations between tolerance checks (fastkd/backends/cuda_sinkhorn.py)
// so n_iter and the stopping rule equal the torch backend's. Grid: (batch,), block: 256 threads.
#include "common.cuh"
#include "fastkd.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSmem = 200 * 1024;

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }
__device__ __forceinline__ float em1(float x) { return expm1f(x); }
__device__ __forceinline__ double em1(double x) { return expm1(x); }

template <typename T>
struct LseT {
  T m = -INFINITY;
  T s = 0;
  __device__ __forceinline__ void add(T x) {
    if (x > m) {
      s = s * ex(m - x) + T(1);
      m = x;
    } else if (x != T(-INFINITY)) {
      s += ex(x - m);
    }
  }
  __device__ __forceinline__ void merge(T om, T os) {
    const T nm = m > om ? m : om;
    if (nm == T(-INFINITY)) {
      s += os;
    } else {
      s = s * ex(m - nm) + os * ex(om - nm);
    }
    m = nm;
  }
  __device__ __forceinline__ T value() const { return m + lg(s); }
};

template <typename T>
__device__ __forceinline__ LseT<T> warp_lse(LseT<T> st) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T om = __shfl_xor_sync(0xffffffffu, st.m, o);
    const T os = __shfl_xor_sync(0xffffffffu, st.s, o);
    LseT<T> lo, hi;
    if ((lane & o) == 0) { lo = st; hi.m = om; hi.s = os; } else { lo.m = om; lo.s = os; hi = st; }
    lo.merge(hi.m, hi.s);
    st = lo;
  }
  return st;
}

// f_i = −ε·lse_j(lb_j + (g_j − C_ij)/ε) for every row i; one warp per row.
template <typename T>
__device__ __forceinline__ void f_half_step(const T* __restrict__ c, const T* g, const T* lb, T* f_out,
                                            int64_t n, int64_t m, T eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {
    const T* ci = c + i * m;
    LseT<T> st;
    for (int64_t j = lane; j < m; j += 32) st.add(lb[j] + (g[j] - ci[j]) / eps);
    st = warp_lse(st);
    if (lane == 0) f_out[i] = -eps * st.value();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sinkhorn_kernel(SinkhornArgs a) {
  extern __shared__ unsigned char smem_raw[];
  T* f = reinterpret_cast<T*>(smem_raw);
  const int64_t n = a.n, m = a.m, bi = blockIdx.x;
  T* g = f + n;
  T* la = g + m;
  T* lb = la + n;
  const T* av = static_cast<const T*>(a.a) + bi * n;
  const T* bv = static_cast<const T*>(a.b) + bi * m;
  const T* c = static_cast<const T*>(a.cost) + bi * n * m;
  T* f_io = static_cast<T*>(a.f) + bi * n;
  T* g_io = static_cast<T*>(a.g) + bi * m;
  const T* eps_list = static_cast<const T*>(a.eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) { la[i] = lg(av[i]); f[i] = f_io[i]; }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) { lb[j] = lg(bv[j]); g[j] = g_io[j]; }
  __syncthreads();
  for (int it = 0; it < a.n_iters; ++it) {
    const T eps = eps_list[it];
    f_half_step(c, g, lb, f, n, m, eps);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      LseT<T> st;
      for (int64_t i = 0; i < n; ++i) st.add(la[i] + (f[i] - c[i * m + j]) / eps);
      g[j] = -eps * st.value();
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f_io[i] = f[i];
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) g_io[j] = g[j];
  // Error half-step: f_next into global memory, then a deterministic block sum.
  T* fn = static_cast<T*>(a.f_next) + bi * n;
  const T eps = static_cast<T>(a.err_eps);
  f_half_step(c, g, lb, fn, n, m, eps);
  __syncthreads();  // makes the global f_next writes visible to the whole block
  T part = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T r = av[i] * em1((f[i] - fn[i]) / eps);
    part += av[i] > T(0) ? fabs(r) : T(0);
  }
  __shared__ T red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if (lane == 0) red[warp] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = 0;
    for (int w = 0; w < nwarps; ++w) total += red[w];
    static_cast<T*>(a.err)[bi] = total;
  }
}

template <typename T>
cudaError_t launch_typed(const SinkhornArgs& a, cudaStream_t stream) {
  const int64_t smem = 2 * (a.n + a.m) * static_cast<int64_t>(sizeof(T));
  if (smem > kMaxSmem) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(sinkhorn_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  sinkhorn_kernel<T><<<static_cast<unsigned>(a.batch), kThreads, static_cast<size_t>(smem), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int64_t sinkhorn_max_points(int dtype) { return kMaxSmem / (2 * (dtype == kFloat64 ? 8 : 4)); }

cudaError_t launch_sinkhorn(const SinkhornArgs& args, int dtype, cudaStream_t stream) {
  if (args.batch <= 0) return cudaSuccess;
  if (args.batch > 0x7fffffffLL || args.n <= 0 || args.m <= 0 || args.n_iters < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return launch_typed<float>(args, stream);
    case kFloat64: return launch_typed<double>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastkd
