// Device helpers shared by the fastkd kernels: dtype conversion, 16-byte vector loads, deterministic
// warp/block reductions and the online (max, sum-exp) log-sum-exp accumulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fastkd {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// VEC elements of T packed in 16 bytes (or one element when VEC == 1).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) { return *reinterpret_cast<const Pack<T, VEC>*>(p); }

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& x) { *reinterpret_cast<Pack<T, VEC>*>(p) = x; }

// Butterfly warp sum: every lane ends with the same bits (a + b == b + a exactly), so reductions are
// deterministic for a fixed block size.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums K values over the block; every thread receives the totals. blockDim.x must be a multiple of 32.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float sh[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nwarps ? sh[k][lane] : 0.f);
  __syncthreads();  // sh may be reused by the next call
}

// Online log-sum-exp state: max m and Σ exp(x − m). -inf entries contribute nothing; NaN propagates
// into s (so the lse is NaN, as torch.logsumexp gives).
struct Lse {
  float m = -INFINITY;
  float s = 0.f;
  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {
      s += expf(x - m);
    }
  }
  __device__ __forceinline__ void merge(float om, float os) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) {
      s += os;  // both empty (0), or NaN carried in s
    } else {
      s = s * expf(m - nm) + os * expf(om - nm);
    }
    m = nm;
  }
  __device__ __forceinline__ float value() const { return m + logf(s); }
};

// Block-wide merge of K Lse states; every thread receives the merged states.
template <int K>
__device__ __forceinline__ void block_lse(Lse (&st)[K]) {
  __shared__ float shm[K][32], shs[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, st[k].m, o);
      const float os = __shfl_xor_sync(0xffffffffu, st[k].s, o);
      // Merge in a lane-independent order (lower lane first) so all lanes agree bitwise.
      Lse a, b;
      if ((lane & o) == 0) { a = st[k]; b.m = om; b.s = os; } else { a.m = om; a.s = os; b = st[k]; }
      a.merge(b.m, b.s);
      st[k] = a;
    }
    if (lane == 0) { shm[k][warp] = st[k].m; shs[k][warp] = st[k].s; }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    Lse acc;
    for (int w = 0; w < nwarps; ++w) acc.merge(shm[k][w], shs[k][w]);
    st[k] = acc;
  }
  __syncthreads();
}

// Block-wide (max value, first index) — ties keep the smaller index.
__device__ __forceinline__ void block_argmax(float& v, int64_t& idx) {
  __shared__ float shv[32];
  __shared__ int64_t shi[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
  }
  if (lane == 0) { shv[warp] = v; shi[warp] = idx; }
  __syncthreads();
  v = shv[0];
  idx = shi[0];
  for (int w = 1; w < nwarps; ++w) {
    if (shv[w] > v || (shv[w] == v && shi[w] < idx)) { v = shv[w]; idx = shi[w]; }
  }
  __syncthreads();
}

// log(exp(a) + exp(b)) with torch.logaddexp's conventions (-inf + -inf = -inf, NaN propagates).
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float m = fmaxf(a, b);
  if (m == -INFINITY) return (a != a || b != b) ? NAN : -INFINITY;
  if (a != a || b != b) return NAN;
  return m + log1pf(expf(-fabsf(a - b)));
}

// log(wa·e^la + wb·e^lb) for weights in [0, 1] (a zero weight drops its term, as the torch backend).
__device__ __forceinline__ float log_mix(float la, float wa, float log_wa, float lb, float wb, float log_wb) {
  if (wa <= 0.f) return lb + log_wb;
  if (wb <= 0.f) return la + log_wa;
  return logaddexp(la + log_wa, lb + log_wb);
}

// Applies f(j, a_j, b_j) to every column j of two rows, 16-byte loads with UNROLL packs in flight per
// thread. Each thread visits its columns in increasing order (used by first-index argmax).
template <typename T, int VEC, int UNROLL, typename F>
__device__ __forceinline__ void row_foreach2(const T* __restrict__ a, const T* __restrict__ b, int64_t n, F&& f) {
  const int64_t npack = n / VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * UNROLL;
  for (int64_t base = threadIdx.x; base < npack; base += step) {
    Pack<T, VEC> pa[UNROLL], pb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) { pa[u] = load_pack<T, VEC>(a + i * VEC); pb[u] = load_pack<T, VEC>(b + i * VEC); }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) f(i * VEC + k, to_float(pa[u].v[k]), to_float(pb[u].v[k]));
      }
    }
  }
  for (int64_t j = npack * VEC + threadIdx.x; j < n; j += blockDim.x) f(j, to_float(a[j]), to_float(b[j]));
}

// Like row_foreach2, and writes out[j] = f(j, a_j, b_j) (out may alias a: each element is read and
// written by the same thread).
template <typename T, int VEC, int UNROLL, typename F>
__device__ __forceinline__ void row_map2(const T* a, const T* __restrict__ b, T* out, int64_t n, F&& f) {
  const int64_t npack = n / VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * UNROLL;
  for (int64_t base = threadIdx.x; base < npack; base += step) {
    Pack<T, VEC> pa[UNROLL], pb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) { pa[u] = load_pack<T, VEC>(a + i * VEC); pb[u] = load_pack<T, VEC>(b + i * VEC); }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) {
        Pack<T, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(f(i * VEC + k, to_float(pa[u].v[k]), to_float(pb[u].v[k])));
        store_pack<T, VEC>(out + i * VEC, o);
      }
    }
  }
  for (int64_t j = npack * VEC + threadIdx.x; j < n; j += blockDim.x) out[j] = from_float<T>(f(j, to_float(a[j]), to_float(b[j])));
}

}  // namespace fastkd
