// Divergence losses on logits: one block per row, one kernel template parameterised by the divergence.
// Divergence codes (the Divergence enum below) and hyperparameter slots (fastkd.h Hyper enum) come from the
// table fastkd/core/divergences.py (tested against it); its endpoint rules (jsd at beta = 0 -> fkl, skl at
// alpha = 1 -> kZero, ...) are applied by the Python launcher, so each case sees only the open range.
//
// Per row i with weight w = weight[i] (w == 0: loss 0, gradient 0, logits never read), tempered logits
// s = z_s / T (student), x = z_t / T (teacher; for taid x = (1−t)·s + t·z_t/T), all math in fp32:
//   pass 1  lse_s, lse_x (online max/sum-exp, kept split as (max, log-sum): SplitLse), lse of the raw student
//           when ce_weight > 0 and T != 1,
//           and the teacher's first argmax (akl);
//   akl     head threshold: 16-ary search over the bit patterns of p (p ≥ 0, so bits order like
//           values) for the smallest key k with Σ_{bits(p_j) ≥ k} p_j ≤ mu — about 8 passes, each
//           computing 15 candidate masses with deterministic block sums (no sort, no atomics);
//   pass 2  D = Σ_j d_j and Σ_j qg_j with qg = q·∂D/∂q (fastkd/distill/torch_impl.py TERMS, term by term);
//   pass 3  grad_j = w·[(qg_j − q_j·Σqg)·kd_scale/T + ce_weight·(softmax(z_s)_j − [j == label])].
//   taid    one more pass before pass 1: the row maxima of s and z_t / T, which shift the mixed logits.
// loss[i] = kd_scale·D − ce_weight·log_softmax(z_s)[label]. Grid: (n_rows,), block: 128–512 threads.
// With a stats buffer (STATS template flag: the kernels without it are unchanged), pass 1 also finds the first
// argmax of the raw student and teacher logits (and the teacher's own lse for taid, whose x is the mix) and
// pass 2 sums −p log p, −q log q and p (log p − log q); thread 0 writes [teacher_entropy, student_entropy,
// top1_agree, kl] (fastkd/core/stats.py STATS_KEYS order).
#include "common.cuh"
#include "fastkd.h"

namespace fastkd {
namespace {

// Divergence codes: the table fastkd/core/divergences.py CODES (tests/distill/test_divergences.py and
// tests/tooling/test_cuda_build.py parse this enum and assert equality). kZero is the table's internal target of
// endpoint rules (skl / srkl at alpha = 1).
enum Divergence : int {
  kFKL = 0, kRKL = 1, kJSD = 2, kSymKL = 3, kSKL = 4, kSRKL = 5, kTVD = 6, kAKL = 7, kTAID = 8, kAB = 9, kZero = 10
};

constexpr int kUnroll = 2;
// akl bracket top: just above the bits of 1.0f, so no probability reaches it (kernels/distill.py P_BITS_HI).
constexpr int64_t kProbBitsHi = 0x3F800010LL;

// A log-normaliser kept split as (max m, log Σe^{x−m}): log p = (x − m) − l, the exact difference of two logits
// first, so nothing is rounded at the logits' magnitude (a constant offset leaves the fp32 accuracy unchanged).
struct SplitLse {
  float m = 0.f, l = -INFINITY;  // an empty row: m = 0, l = −inf
  __device__ __forceinline__ float logp(float x) const { return (x - m) - l; }
};

__device__ __forceinline__ SplitLse split_lse(const Lse& st) {
  SplitLse r;
  r.m = st.m == -INFINITY ? 0.f : st.m;
  r.l = logf(st.s);
  return r;
}

struct RowConsts {
  float inv_t, beta, alpha, log_b, log_1mb, log_a, log_1ma;
  SplitLse lse_s, lse_x;
  float t_mix;
  float mx_s, mx_t;   // taid: the rows' maxima of s and z_t / T (0 for an all −inf row), shifts of the mix
  uint32_t head_key;  // akl: p_j with bits ≥ head_key are in the head
  int64_t top;        // akl: the teacher's first argmax (always in the head)
};

// Tempering uses __fmul_rn (never contracted into an FMA) so that a logit is rounded exactly as torch's
// z * (1/T) and p has the same bits in the akl threshold pass and the loss / gradient passes.
__device__ __forceinline__ float temper(float z, float inv_t) { return __fmul_rn(z, inv_t); }

// taid mixes the max-subtracted logits: (1−t)(s − max s) + t(z_t/T − max z_t/T) differs from (1−t)·s + t·z_t/T
// by a per-row constant (the same softmax), and s − max is an exact difference, so the mix is not rounded at the
// logits' magnitude.
template <int DIV>
__device__ __forceinline__ float mixed_logit(const RowConsts& c, float s, float zt) {
  const float tt = temper(zt, c.inv_t);
  if constexpr (DIV == kTAID) {
    if (c.t_mix == 0.f) return s;
    if (c.t_mix == 1.f) return tt;
    return (1.f - c.t_mix) * (s - c.mx_s) + c.t_mix * (tt - c.mx_t);
  } else {
    return tt;
  }
}

// v where x != 0 else 0, for a probability x ≥ 0 or NaN: 0·(−inf) terms are 0 and NaN inputs stay NaN.
__device__ __forceinline__ float pos(float x, float v) { return x != 0.f ? v : 0.f; }

// (e^other − e^base)/c where other = base + c·diff, without cancellation as c·diff → 0: e^base·expm1(c·diff)/c for
// |c·diff| < 1/2, else the direct difference (terms a factor ≥ e^{1/2} apart; 0 for −inf logits, diff ±inf or NaN).
__device__ __forceinline__ float pow_diff(float base, float other, float diff, float c) {
  const float u = c * diff;
  const float eb = expf(base);
  return fabsf(u) < 0.5f ? eb * expm1f(u) / c : (expf(other) - eb) / c;
}

// Per-element terms. d0/qg0 are the divergence (or the fkl part), d1/qg1 the rkl part (symkl, akl),
// err = |p − q| (akl). Returns q.
struct Terms { float q, d0, qg0, d1, qg1, err, p; };

template <int DIV>
__device__ __forceinline__ Terms element_terms(const RowConsts& c, float zs, float zt) {
  Terms e{};
  const float s = temper(zs, c.inv_t);
  const float lq = c.lse_s.logp(s);
  e.q = expf(lq);
  const float lp = c.lse_x.logp(mixed_logit<DIV>(c, s, zt));  // log p (log r for taid)
  const float p = expf(lp);
  e.p = p;
  if constexpr (DIV == kFKL || DIV == kTAID) {
    e.d0 = pos(p, p * (lp - lq));
    e.qg0 = -p;
  } else if constexpr (DIV == kRKL) {
    e.qg0 = pos(e.q, e.q * (lq - lp));
    e.d0 = e.qg0;
  } else if constexpr (DIV == kSymKL || DIV == kAKL) {
    e.d0 = pos(p, p * (lp - lq));
    e.qg0 = -p;
    e.qg1 = pos(e.q, e.q * (lq - lp));
    e.d1 = e.qg1;
    e.err = fabsf(p - e.q);
  } else if constexpr (DIV == kJSD) {
    const float lm = log_mix(lp, c.beta, c.log_b, lq, 1.f - c.beta, c.log_1mb);
    e.qg0 = (1.f - c.beta) * pos(e.q, e.q * (lq - lm));
    e.d0 = c.beta * pos(p, p * (lp - lm)) + e.qg0;
  } else if constexpr (DIV == kSKL) {
    const float lm = log_mix(lp, c.alpha, c.log_a, lq, 1.f - c.alpha, c.log_1ma);
    e.d0 = pos(p, p * (lp - lm));
    e.qg0 = -(1.f - c.alpha) * pos(p, expf(lp + lq - lm));
  } else if constexpr (DIV == kSRKL) {
    const float lm = log_mix(lp, 1.f - c.alpha, c.log_1ma, lq, c.alpha, c.log_a);
    const float kl = pos(e.q, e.q * (lq - lm));
    e.d0 = kl;
    e.qg0 = kl - c.alpha * pos(e.q, expf(2.f * lq - lm));
  } else if constexpr (DIV == kTVD) {
    const float diff = e.q - p;
    e.d0 = 0.5f * fabsf(diff);
    const float sg = diff > 0.f ? 1.f : (diff < 0.f ? -1.f : (diff == 0.f ? 0.f : diff));
    e.qg0 = 0.5f * e.q * sg;
  } else if constexpr (DIV == kAB) {
    // −1/(αβ)·(p^α q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β)); qg = (q^(α+β) − p^α q^β)/α, powers in log domain,
    // as −1/(α+β)·((p^α q^β − p^(α+β))/β + (p^α q^β − q^(α+β))/α): no cancellation as α or β → 0
    const float sab = c.alpha + c.beta;
    const float lpq = c.alpha * lp + c.beta * lq;
    const float t_q = pow_diff(sab * lq, lpq, lp - lq, c.alpha);  // (p^α q^β − q^(α+β)) / α
    e.d0 = -(pow_diff(sab * lp, lpq, lq - lp, c.beta) + t_q) / sab;
    e.qg0 = -t_q;
  }
  return e;
}

__device__ __forceinline__ uint32_t prob_key(float p) { return __float_as_uint(p); }

// Block-wide maxima of two values (fmaxf is exact and commutative: every thread receives the same bits).
__device__ __forceinline__ void block_max2(float& a, float& b) {
  __shared__ float sh[2][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
  if (lane == 0) { sh[0][warp] = a; sh[1][warp] = b; }
  __syncthreads();
  a = sh[0][0];
  b = sh[1][0];
  for (int w = 1; w < nwarps; ++w) { a = fmaxf(a, sh[0][w]); b = fmaxf(b, sh[1][w]); }
  __syncthreads();
}

template <typename T, int DIV, int VEC, bool STATS>
__global__ void __launch_bounds__(512, 1) distill_kernel(DistillArgs a) {
  const int64_t row = blockIdx.x;
  const float w = a.weight[row];
  const int64_t V = a.vocab;
  const T* zs_row = static_cast<const T*>(a.student) + row * a.stride_s;
  const T* zt_row = static_cast<const T*>(a.teacher) + row * a.stride_t;
  T* g_row = a.grad ? static_cast<T*>(a.grad) + row * a.stride_g : nullptr;
  if (w == 0.f) {  // excluded token: never read its logits (they may be anything)
    if (threadIdx.x == 0) a.loss[row] = 0.f;
    if (g_row) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g_row[j] = from_float<T>(0.f);
    }
    return;
  }
  const bool ce = a.ce_weight != 0.f;
  const bool ce_own_lse = ce && a.inv_t != 1.f;

  RowConsts c{};
  c.inv_t = a.inv_t;
  c.beta = a.hyper[kBeta];
  c.alpha = a.hyper[kAlpha];
  c.t_mix = a.hyper[kT];
  c.log_b = c.beta > 0.f ? logf(c.beta) : 0.f;
  c.log_1mb = c.beta < 1.f ? logf(1.f - c.beta) : 0.f;
  c.log_a = c.alpha > 0.f ? logf(c.alpha) : 0.f;
  c.log_1ma = c.alpha < 1.f ? logf(1.f - c.alpha) : 0.f;
  c.mx_s = 0.f;
  c.mx_t = 0.f;
  if constexpr (DIV == kTAID) {  // pass 0 (taid only): the row maxima the mix is shifted by
    if (c.t_mix != 0.f && c.t_mix != 1.f) {
      float ms = -INFINITY, mt = -INFINITY;
      row_foreach2<T, VEC, kUnroll>(zs_row, zt_row, V, [&](int64_t, float zs, float zt) {
        ms = fmaxf(ms, temper(zs, c.inv_t));
        mt = fmaxf(mt, temper(zt, c.inv_t));
      });
      block_max2(ms, mt);
      c.mx_s = fabsf(ms) < INFINITY ? ms : 0.f;
      c.mx_t = fabsf(mt) < INFINITY ? mt : 0.f;
    }
  }

  // ---- pass 1: log-sum-exps (student tempered, teacher/mix tempered, raw student) and teacher argmax
  Lse st[3];
  float tmax = -INFINITY;
  int64_t targ = V;
  // STATS: first argmax of the raw logits (dividing by T could round distinct values into a tie); taid's
  // teacher lse (its x is the mixed logit)
  float rmax_s = -INFINITY, rmax_t = -INFINITY;
  int64_t rarg_s = V, rarg_t = V;
  Lse st_t[1];
  row_foreach2<T, VEC, kUnroll>(zs_row, zt_row, V, [&](int64_t j, float zs, float zt) {
    const float s = temper(zs, c.inv_t);
    st[0].add(s);
    const float x = mixed_logit<DIV>(c, s, zt);
    st[1].add(x);
    if (ce_own_lse) st[2].add(zs);
    if constexpr (DIV == kAKL) {
      if (x > tmax) { tmax = x; targ = j; }
    }
    if constexpr (STATS) {
      if (zs > rmax_s) { rmax_s = zs; rarg_s = j; }
      if (zt > rmax_t) { rmax_t = zt; rarg_t = j; }
      if constexpr (DIV == kTAID) st_t[0].add(temper(zt, c.inv_t));
    }
  });
  block_lse<3>(st);
  c.lse_s = split_lse(st[0]);
  c.lse_x = split_lse(st[1]);
  const SplitLse lse_z = ce_own_lse ? split_lse(st[2]) : c.lse_s;
  SplitLse lse_t = c.lse_x;  // the teacher's own lse (STATS)
  if constexpr (STATS) {
    block_argmax(rmax_s, rarg_s);
    block_argmax(rmax_t, rarg_t);
    if constexpr (DIV == kTAID) {
      block_lse<1>(st_t);
      lse_t = split_lse(st_t[0]);
    }
  }
  if constexpr (DIV == kAKL) {
    block_argmax(tmax, targ);
    c.top = targ;
    // ---- head threshold: invariant M(lo) > mu (or lo = −1), M(hi) ≤ mu, M(k) = Σ_{key ≥ k} p
    int64_t lo = -1, hi = kProbBitsHi;
    const float mu = a.hyper[kMu];
    while (hi - lo > 1) {
      int64_t b[15];
      float m[15];
#pragma unroll
      for (int k = 0; k < 15; ++k) {
        b[k] = lo + 1 + ((hi - lo - 1) * (k + 1)) / 16;
        m[k] = 0.f;
      }
      row_foreach2<T, VEC, kUnroll>(zs_row, zt_row, V, [&](int64_t, float, float zt) {
        const float lp = c.lse_x.logp(temper(zt, c.inv_t));  // = the loss pass's log p (akl is never taid)
        const float p = expf(lp);
        const int64_t key = prob_key(p);
#pragma unroll
        for (int k = 0; k < 15; ++k) m[k] += key >= b[k] ? p : 0.f;
      });
      block_sum<15>(m);
      int64_t nlo = lo, nhi = hi;
#pragma unroll
      for (int k = 14; k >= 0; --k) {  // m is non-increasing in k's threshold
        if (m[k] <= mu) nhi = b[k]; else { nlo = b[k]; break; }
      }
      if (nhi == hi && nlo == lo) nlo = hi - 1;  // degenerate (NaN masses): stop
      lo = nlo;
      hi = nhi;
    }
    c.head_key = static_cast<uint32_t>(hi);
  }

  // ---- pass 2: divergence sums
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // d0, qg0, d1, qg1, err_head, err_total
  float sacc[3] = {0.f, 0.f, 0.f};                 // STATS: −Σ p log p, −Σ q log q, Σ p (log p − log q)
  row_foreach2<T, VEC, kUnroll>(zs_row, zt_row, V, [&](int64_t j, float zs, float zt) {
    const Terms e = element_terms<DIV>(c, zs, zt);
    if constexpr (STATS) {
      const float lq = c.lse_s.logp(temper(zs, c.inv_t));
      const float lp = lse_t.logp(temper(zt, c.inv_t));
      const float p = DIV == kTAID ? expf(lp) : e.p;  // element_terms' p is the teacher's but for taid
      sacc[0] -= pos(p, p * lp);
      sacc[1] -= pos(e.q, e.q * lq);
      sacc[2] += pos(p, p * (lp - lq));
    }
    acc[0] += e.d0;
    acc[1] += e.qg0;
    if constexpr (DIV == kSymKL || DIV == kAKL) {
      acc[2] += e.d1;
      acc[3] += e.qg1;
    }
    if constexpr (DIV == kAKL) {
      const bool head = prob_key(e.p) >= c.head_key || j == c.top;
      acc[4] += head ? e.err : 0.f;
      acc[5] += e.err;
    }
  });
  block_sum<6>(acc);
  if constexpr (STATS) block_sum<3>(sacc);
  float wf = 1.f, wr = 0.f;
  if constexpr (DIV == kSymKL) {
    wf = c.beta;
    wr = 1.f - c.beta;
  } else if constexpr (DIV == kAKL) {
    const float gh = acc[4], gt = acc[5] - acc[4], den = gh + gt;
    wf = den > 0.f ? gh / den : 0.f;
    wr = den > 0.f ? gt / den : 0.f;
  }
  float D = acc[0], sum_qg = acc[1];
  if constexpr (DIV == kSymKL || DIV == kAKL) {
    D = wf * acc[0] + wr * acc[2];
    sum_qg = wf * acc[1] + wr * acc[3];
  }
  if constexpr (DIV == kZero) D = (c.lse_s.l == c.lse_s.l && c.lse_x.l == c.lse_x.l) ? 0.f : NAN;  // NaN in, out
  int64_t label = -1;
  if (threadIdx.x == 0) {
    float loss = D * a.kd_scale;
    if (ce) {
      label = a.labels[row];
      const float zl = (label >= 0 && label < V) ? to_float(zs_row[label]) : NAN;
      loss -= a.ce_weight * lse_z.logp(zl);
    }
    a.loss[row] = loss;
    if constexpr (STATS) {
      float* out = a.stats + row * a.stride_st;
      out[0] = sacc[0];
      out[1] = sacc[1];
      out[2] = rarg_s == rarg_t ? 1.f : 0.f;
      out[3] = sacc[2];
    }
  }
  if (!g_row) return;

  // ---- pass 3: gradient (may overwrite the student row in place)
  if (ce) label = a.labels[row];
  const float gscale = a.kd_scale * a.inv_t;
  row_map2<T, VEC, kUnroll>(zs_row, zt_row, g_row, V, [&](int64_t j, float zs, float zt) {
    const Terms e = element_terms<DIV>(c, zs, zt);
    float qg = e.qg0;
    if constexpr (DIV == kSymKL || DIV == kAKL) qg = wf * e.qg0 + wr * e.qg1;
    float g = (qg - e.q * sum_qg) * gscale;
    if (ce) g += a.ce_weight * (expf(lse_z.logp(zs)) - (j == label ? 1.f : 0.f));
    return g * w;
  });
}

template <typename T, int DIV>
cudaError_t launch_typed(const DistillArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* p, int64_t stride) {
    return p == nullptr ||
           (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  };
  const bool vec = aligned(a.student, a.stride_s) && aligned(a.teacher, a.stride_t) && aligned(a.grad, a.stride_g);
  // ~4 packs per thread per pass, 128..512 threads.
  int threads = 128;
  while (threads < 512 && static_cast<int64_t>(threads) * kVec * 4 < a.vocab) threads *= 2;
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  if (a.stats != nullptr) {
    if (vec) {
      distill_kernel<T, DIV, kVec, true><<<grid, threads, 0, stream>>>(a);
    } else {
      distill_kernel<T, DIV, 1, true><<<grid, threads, 0, stream>>>(a);
    }
  } else if (vec) {
    distill_kernel<T, DIV, kVec, false><<<grid, threads, 0, stream>>>(a);
  } else {
    distill_kernel<T, DIV, 1, false><<<grid, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_div(const DistillArgs& a, int divergence, cudaStream_t stream) {
  switch (divergence) {
    case kFKL: return launch_typed<T, kFKL>(a, stream);
    case kRKL: return launch_typed<T, kRKL>(a, stream);
    case kJSD: return launch_typed<T, kJSD>(a, stream);
    case kSymKL: return launch_typed<T, kSymKL>(a, stream);
    case kSKL: return launch_typed<T, kSKL>(a, stream);
    case kSRKL: return launch_typed<T, kSRKL>(a, stream);
    case kTVD: return launch_typed<T, kTVD>(a, stream);
    case kAKL: return launch_typed<T, kAKL>(a, stream);
    case kTAID: return launch_typed<T, kTAID>(a, stream);
    case kAB: return launch_typed<T, kAB>(a, stream);
    case kZero: return launch_typed<T, kZero>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_distill(const DistillArgs& args, int dtype, int divergence, cudaStream_t stream) {
  if (args.n_rows <= 0 || args.vocab <= 0) return cudaSuccess;
  if (args.n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case kFloat32: return launch_div<float>(args, divergence, stream);
    case kBFloat16: return launch_div<__nv_bfloat16>(args, divergence, stream);
    case kFloat16: return launch_div<__half>(args, divergence, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastkd
