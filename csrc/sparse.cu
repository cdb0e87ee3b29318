// Sparse distillation losses (top-k / top-k + tail / sampled): the two vocabulary-wide passes.
//
// stats (grid (n_rows,)): lse = logsumexp_v s_v with s = z / T, and for topk_tail lse_tail =
//   logsumexp over the columns that are not among the row's ids — exact, using a bitmap of the ids in
//   shared memory (V/8 bytes) instead of subtracting the head mass (which cancels catastrophically) —
//   plus s at the ids (−inf at padding slots, NaN for an id outside [−1, V)).
// grad (grid (n_rows,)): grad_v = b·exp((s_v − sh) − lse_base), written for every column (lse_base = lse_tail
//   for topk_tail, so that a tail mass underflowing in fp32 still gives a finite off-id gradient), then,
//   after a block barrier, the id columns are rewritten as exp(s_id − lse)·a + Σ_{k: id_k = id} c_k (the
//   sum makes duplicated ids add up, as scatter_add does). Rows with weight 0 get zeros. Ids are untrusted:
//   an id outside [0, V) is never dereferenced (the stats pass stores NaN for it, which poisons the row).
// Split log-normalisers: both kernels shift the row by sh = the largest finite s at a valid id (0 if none),
//   computed by each kernel from the same loads in the same order (the same bits in both). The stats pass
//   stores s − sh at the ids, lse − sh = (m − sh) + log Σe^{s−m} and likewise the tail's; the K-level terms
//   are shift-invariant, and the gradient exponentiates (s_v − sh) − lse_base. s − sh and m − sh are exact
//   differences of logits near the row's top, so nothing is rounded at the logits' magnitude: a constant
//   offset of the logits leaves the fp32 accuracy unchanged (a row without a finite logit at its ids keeps
//   the unshifted form).
// STATS (a template flag: the kernels without it are unchanged): the stats pass also accumulates the
//   student's entropy over the whole row, per thread (m, d = Σ e^{s−m}, c = Σ e^{s−m}(s − m)) merged across
//   the block (H = log d − c/d), and its first-index argmax; the teacher side is O(K) in PyTorch
//   (fastkd/sparse/torch_impl.py sparse_stats).
#include "common.cuh"
#include "fastkd.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBitmapBytes = 160 * 1024;

// Tempering with __fmul_rn (never contracted into an FMA): the shift and every s − sh see the same rounded s.
__device__ __forceinline__ float temper(float z, float inv_t) { return __fmul_rn(z, inv_t); }

// Block-wide max (fmaxf is exact and commutative: every thread receives the same bits).
__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = sh[0];
  for (int w = 1; w < nwarps; ++w) v = fmaxf(v, sh[w]);
  __syncthreads();
  return v;
}

// The row's shift (see the top comment): the largest finite tempered logit at a valid id, 0 when there is none.
// Called by every thread of the block (it synchronises), before the gradient kernel writes the row.
template <typename T>
__device__ __forceinline__ float id_shift(const T* z, const int64_t* ids, int64_t k, int64_t V, float inv_t) {
  float mx = -INFINITY;
  for (int64_t e = threadIdx.x; e < k; e += blockDim.x) {
    const int64_t id = ids[e];
    if (id >= 0 && id < V) {
      const float s = temper(to_float(z[id]), inv_t);
      if (fabsf(s) < INFINITY) mx = fmaxf(mx, s);
    }
  }
  mx = block_max(mx);
  return mx == -INFINITY ? 0.f : mx;
}

// Running entropy state of softmax(s): max m, d = Σ e^{s−m}, c = Σ e^{s−m}(s − m); H = log d − c/d. A −inf
// element adds nothing (never 0·(−inf)); a NaN element makes d and c NaN.
struct EntAcc {
  float m = -INFINITY;
  float d = 0.f;
  float c = 0.f;
  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      if (m == -INFINITY) {  // nothing finite yet: d, c are 0, or NaN after a NaN element (kept)
        d = d * 0.f + 1.f;
        c = c * 0.f;
      } else {
        const float f = expf(m - x);
        c = (c + d * (m - x)) * f;
        d = d * f + 1.f;
      }
      m = x;
    } else if (x != -INFINITY) {
      const float e = expf(x - m);
      d += e;
      c += e * (x - m);
    }
  }
  __device__ __forceinline__ void merge(float om, float od, float oc) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) {
      d += od;  // both empty (0), or NaN carried in d / c
      c += oc;
    } else {
      const float ta = m == -INFINITY ? 0.f : (c + d * (m - nm)) * expf(m - nm);
      const float tb = om == -INFINITY ? 0.f : (oc + od * (om - nm)) * expf(om - nm);
      const float da = m == -INFINITY ? 0.f : d * expf(m - nm);
      const float db = om == -INFINITY ? 0.f : od * expf(om - nm);
      c = ta + tb;
      d = da + db;
    }
    m = nm;
  }
};

// Block-wide merge of EntAcc states in a lane-independent order; every thread receives the merged state.
__device__ __forceinline__ void block_ent(EntAcc& e) {
  __shared__ float sh[3][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, e.m, o);
    const float od = __shfl_xor_sync(0xffffffffu, e.d, o);
    const float oc = __shfl_xor_sync(0xffffffffu, e.c, o);
    EntAcc lo;
    if ((lane & o) == 0) {
      lo = e;
      lo.merge(om, od, oc);
    } else {
      lo.m = om;
      lo.d = od;
      lo.c = oc;
      lo.merge(e.m, e.d, e.c);
    }
    e = lo;
  }
  if (lane == 0) {
    sh[0][warp] = e.m;
    sh[1][warp] = e.d;
    sh[2][warp] = e.c;
  }
  __syncthreads();
  EntAcc acc;
  for (int w = 0; w < nwarps; ++w) acc.merge(sh[0][w], sh[1][w], sh[2][w]);
  e = acc;
  __syncthreads();
}

template <typename T, int VEC, bool TAIL, bool STATS>
__global__ void __launch_bounds__(kThreads) sparse_stats_kernel(SparseStatsArgs a) {
  extern __shared__ uint32_t bitmap[];
  const int64_t row = blockIdx.x;
  const int64_t V = a.vocab;
  const int64_t* ids = a.ids + row * a.stride_ids;
  float* s_ids = a.s_ids + row * a.k;
  if (a.weight[row] == 0.f) {
    if (threadIdx.x == 0) {
      a.lse[row] = 0.f;
      if (TAIL) a.lse_tail[row] = 0.f;
    }
    for (int64_t k = threadIdx.x; k < a.k; k += blockDim.x) s_ids[k] = -INFINITY;
    return;
  }
  const T* z = static_cast<const T*>(a.student) + row * a.stride_s;
  const int64_t words = (V + 31) / 32;
  if (TAIL) {
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bitmap[w] = 0u;
    __syncthreads();
  }
  const float sh = id_shift(z, ids, a.k, V, a.inv_t);
  for (int64_t k = threadIdx.x; k < a.k; k += blockDim.x) {
    const int64_t id = ids[k];
    if (id >= 0 && id < V) {
      s_ids[k] = temper(to_float(z[id]), a.inv_t) - sh;
      if (TAIL) atomicOr(&bitmap[id >> 5], 1u << (id & 31));
    } else {
      s_ids[k] = id == -1 ? -INFINITY : NAN;
    }
  }
  if (TAIL) __syncthreads();
  Lse st[2];
  EntAcc ent;            // STATS: the row's entropy state
  float bv = -INFINITY;  // STATS: first argmax (each thread visits its columns in increasing order)
  int64_t bi = 0;
  // Single-row scan: reuse row_foreach2 with the same row on both sides (the second load hits L1).
  row_foreach2<T, VEC, 2>(z, z, V, [&](int64_t j, float zv, float) {
    const float s = temper(zv, a.inv_t);
    st[0].add(s);
    if (TAIL && !((bitmap[j >> 5] >> (j & 31)) & 1u)) st[1].add(s);
    if constexpr (STATS) {
      ent.add(s);
      if (s > bv) {
        bv = s;
        bi = j;
      }
    }
  });
  block_lse<2>(st);
  if constexpr (STATS) {
    block_ent(ent);
    block_argmax(bv, bi);
  }
  if (threadIdx.x == 0) {
    // relative to the shift: (m − sh) is exact (−inf − sh + log 0 = −inf for an empty sum)
    a.lse[row] = (st[0].m - sh) + logf(st[0].s);
    if (TAIL) a.lse_tail[row] = (st[1].m - sh) + logf(st[1].s);
    if constexpr (STATS) {
      a.h_s[row] = logf(ent.d) - ent.c / ent.d;
      a.arg_s[row] = bi;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sparse_grad_kernel(SparseGradArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t V = a.vocab;
  const T* z = static_cast<const T*>(a.student) + row * a.stride_s;
  T* g = static_cast<T*>(a.grad) + row * a.stride_g;
  const float w = a.weight[row];
  const int64_t* ids = a.ids + row * a.stride_ids;
  // before any store: the gradient may alias the logits (a block-uniform condition: id_shift synchronises)
  const float sh = (w == 0.f || a.zero_base) ? 0.f : id_shift(z, ids, a.k, V, a.inv_t);
  if (w == 0.f || a.zero_base) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = from_float<T>(0.f);
    if (w == 0.f) return;
  } else {
    const float lse_base = a.lse_base[row], coef = a.b[row], inv_t = a.inv_t;
    // Reads z_v and writes g_v from the same thread, so g may alias z.
    row_map2<T, VEC, 2>(z, z, g, V, [&](int64_t, float zv, float) {
      return expf((temper(zv, inv_t) - sh) - lse_base) * coef;
    });
  }
  __syncthreads();  // the base term is written before the id columns are rewritten
  const float* s_ids = a.s_ids + row * a.k;
  const float* c = a.c + row * a.k;
  const float lse = a.lse[row], ca = a.a[row];
  for (int64_t k = threadIdx.x; k < a.k; k += blockDim.x) {
    const int64_t id = ids[k];
    if (id < 0 || id >= V) continue;
    bool first = true;
    for (int64_t e = 0; e < k && first; ++e) first = ids[e] != id;
    if (!first) continue;  // the first slot holding this id writes it
    float val = a.zero_base ? 0.f : expf(s_ids[k] - lse) * ca;
    for (int64_t e = k; e < a.k; ++e) {
      if (ids[e] == id) val += c[e];
    }
    g[id] = from_float<T>(val);
  }
}

template <typename T>
bool aligned16(const void* p, int64_t stride) {
  return p == nullptr ||
         (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

template <typename T>
cudaError_t stats_typed(const SparseStatsArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned16<T>(a.student, a.stride_s);
  const bool tail = a.lse_tail != nullptr;
  const size_t smem = tail ? static_cast<size_t>((a.vocab + 31) / 32) * 4 : 0;
  if (static_cast<int64_t>(smem) > kMaxBitmapBytes) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  auto go = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, kThreads, smem, stream>>>(a);
    return cudaGetLastError();
  };
  if (a.h_s != nullptr) {
    if (tail) return vec ? go(sparse_stats_kernel<T, kVec, true, true>) : go(sparse_stats_kernel<T, 1, true, true>);
    return vec ? go(sparse_stats_kernel<T, kVec, false, true>) : go(sparse_stats_kernel<T, 1, false, true>);
  }
  if (tail) return vec ? go(sparse_stats_kernel<T, kVec, true, false>) : go(sparse_stats_kernel<T, 1, true, false>);
  return vec ? go(sparse_stats_kernel<T, kVec, false, false>) : go(sparse_stats_kernel<T, 1, false, false>);
}

template <typename T>
cudaError_t grad_typed(const SparseGradArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned16<T>(a.student, a.stride_s) && aligned16<T>(a.grad, a.stride_g);
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  if (vec) {
    sparse_grad_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a);
  } else {
    sparse_grad_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t sparse_max_tail_vocab() { return kMaxBitmapBytes * 8; }

cudaError_t launch_sparse_stats(const SparseStatsArgs& args, int dtype, cudaStream_t stream) {
  if (args.n_rows <= 0) return cudaSuccess;
  if (args.n_rows > 0x7fffffffLL || args.vocab <= 0) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case kFloat32: return stats_typed<float>(args, stream);
    case kBFloat16: return stats_typed<__nv_bfloat16>(args, stream);
    case kFloat16: return stats_typed<__half>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_sparse_grad(const SparseGradArgs& args, int dtype, cudaStream_t stream) {
  if (args.n_rows <= 0 || args.vocab <= 0) return cudaSuccess;
  if (args.n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case kFloat32: return grad_typed<float>(args, stream);
    case kBFloat16: return grad_typed<__nv_bfloat16>(args, stream);
    case kFloat16: return grad_typed<__half>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastkd
