// CPU kernels for the model's f32 hot spots, as XLA FFI custom calls (built and registered by
// llama_jax/cpu_kernels.py, linked against Intel MKL's libmkl_rt):
//
// Gemm: c[i] = op(a[i]) @ op(b[i]) through MKL's sgemm. XLA:CPU's own GEMM runs at 0.7-0.9x of
//   MKL's on this project's layer shapes. a [batch..., p, q], b [batch..., r, s] with the same
//   batch, or one of them without batch dims (shared by the batch); op transposes when asked.
//   One product at a time, with MKL's (GNU OpenMP) threads: XLA runs independent products at
//   once (the q, k and v projections), and two MKL thread teams oversubscribe the cores.
//
// Attention: causal (or not) GQA attention forward in the FlashAttention-2 way, per (batch,
//   kv head, query block) on XLA's intra-op pool: the G query heads of a kv head stacked as rows,
//   S = Q K^T and acc += P V as single-threaded MKL GEMMs over a tile that stays in L2, the mask,
//   max, exp (MKL VML) and sums in one pass over the tile in between. Key blocks every row of the
//   query block has masked are never computed. Returns the output and the log-sum-exp (for the
//   backward, which stays XLA's blocked attention).
#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <vector>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
// MKL's CBLAS, LP64 (no header needed).
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
void vmsExp(int n, const float* a, float* y, long long mode);
int MKL_Set_Num_Threads_Local(int n);
void cblas_sgemv(int layout, int trans, int m, int n, float alpha, const float* a, int lda,
                 const float* x, int incx, float beta, float* y, int incy);
int MKL_Set_Threading_Layer(int code);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// One product at a time: when XLA runs two independent products at once (the q, k and v
// projections), each with MKL's threads, the cores are oversubscribed and both crawl.
std::mutex mkl_mutex;

// Runs f(0..n-1), pieces taken in turn by the calling thread and by the pool's other threads;
// returns when all are done. A helper that starts after every piece is taken does nothing.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(n, pool.num_threads()) - 1;
  if (n <= 1) {
    if (n == 1) f(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto drain = [state, n, &f] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == n) state->cv.notify_all();
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, n, drain] { drain(); });
  drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

struct Matrices {
  int64_t batch, rows, cols;
};

// A buffer's dims as (product of the leading dims, rows, cols).
Matrices Split(ffi::Span<const int64_t> dims) {
  Matrices m{1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 2 < dims.size(); ++i) m.batch *= dims[i];
  return m;
}

// c [m, n] = op(a) op(b), rows [r0, r1) and columns [c0, c1) of c only.
void Block(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, bool ta,
           bool tb, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t lda = ta ? m : k, ldb = tb ? k : n;
  const float* pa = a + (ta ? r0 : r0 * lda);
  const float* pb = b + (tb ? c0 * ldb : c0);
  float* pc = c + r0 * n + c0;
  if (r1 - r0 == 1 && !ta) {  // a row vector: a matrix-vector product reads b once, no packing
    if (tb)
      cblas_sgemv(kRowMajor, kNoTrans, c1 - c0, k, 1.0f, pb, ldb, pa, 1, 0.0f, pc, 1);
    else
      cblas_sgemv(kRowMajor, kTrans, k, c1 - c0, 1.0f, pb, ldb, pa, 1, 0.0f, pc, 1);
    return;
  }
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, r1 - r0, c1 - c0, k, 1.0f,
              pa, lda, pb, ldb, 0.0f, pc, n);
}

ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (a.dimensions().size() < 2 || b.dimensions().size() < 2)
    return ffi::Error::InvalidArgument("cpu_gemm: operands must have rank >= 2");
  const Matrices ma = Split(a.dimensions()), mb = Split(b.dimensions());
  const int64_t m = trans_a ? ma.cols : ma.rows, k = trans_a ? ma.rows : ma.cols;
  const int64_t kb = trans_b ? mb.cols : mb.rows, n = trans_b ? mb.rows : mb.cols;
  if (k != kb) return ffi::Error::InvalidArgument("cpu_gemm: contracting dims differ");
  if (mb.batch != ma.batch && mb.batch != 1 && ma.batch != 1)
    return ffi::Error::InvalidArgument("cpu_gemm: batch dims differ");
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
    return ffi::Error::InvalidArgument("cpu_gemm: a dimension exceeds the LP64 BLAS");
  const int64_t batch = std::max(ma.batch, mb.batch);
  float* pc = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // empty sums
    std::fill(pc, pc + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }
  auto pa = [&](int64_t i) { return a.typed_data() + (ma.batch == 1 ? 0 : i * m * k); };
  auto pb = [&](int64_t i) { return b.typed_data() + (mb.batch == 1 ? 0 : i * k * n); };
  std::lock_guard<std::mutex> lock(mkl_mutex);
  for (int64_t i = 0; i < batch; ++i)
    Block(pa(i), pb(i), pc + i * m * n, m, n, k, trans_a, trans_b, 0, m, 0, n);
  return ffi::Error::Success();
}


// --- Attention ------------------------------------------------------------------------------------

constexpr float kMInit = -1e30f;  // the running max's start: far below any logit, far above -inf

struct AttentionArgs {
  const float *q, *k, *v;          // [B, T, H, E], [B, S, K, E], [B, S, K, E]
  const int32_t *q_off, *kv_len;   // [B]
  const int32_t *q_seg, *kv_seg;   // [B, T], [B, S], or null
  float *out, *lse;                // [B, T, H, E], [B, K, T * G]
  int64_t B, T, S, H, K, E;
  int64_t block_q, block_k;  // query positions per work item (x G rows), keys per tile
  bool causal;
  float scale, lse_empty;
};

// max(init, x[0..n)) and sum(x[0..n)), 8 lanes at a time (AVX2).
float RowMax(const float* x, int64_t n, float init) {
  __m256 acc = _mm256_set1_ps(init);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + c));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float mx = init;
  for (float lane : lanes) mx = std::max(mx, lane);
  for (; c < n; ++c) mx = std::max(mx, x[c]);
  return mx;
}

float RowSum(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + c));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  for (; c < n; ++c) sum += x[c];
  return sum;
}

// Query block qb of kv head kh of sequence b.
void AttentionBlock(const AttentionArgs& x, int64_t b, int64_t kh, int64_t qb) {
  const int64_t G = x.H / x.K, E = x.E, t0 = qb * x.block_q, kBlockK = x.block_k;
  const int64_t tb = std::min(x.block_q, x.T - t0), R = tb * G;
  const int64_t kv_stride = x.K * E;  // between consecutive keys of one head
  thread_local std::vector<float> qs, sc, acc, m, l;
  thread_local std::vector<int64_t> lim;
  qs.resize(R * E), sc.resize(R * kBlockK), acc.assign(R * E, 0.0f);
  m.assign(R, kMInit), l.assign(R, 0.0f), lim.resize(tb);
  // Rows (t, g), queries scaled; lim[i]: position t0 + i sees the keys below it.
  int64_t lo_lim = x.S, hi_lim = 0;
  const int64_t len = std::clamp<int64_t>(x.kv_len[b], 0, x.S);
  for (int64_t i = 0; i < tb; ++i) {
    int64_t li = len;
    if (x.causal) li = std::min<int64_t>(li, std::max<int64_t>(0, x.q_off[b] + t0 + i + 1));
    lim[i] = li, lo_lim = std::min(lo_lim, li), hi_lim = std::max(hi_lim, li);
    for (int64_t g = 0; g < G; ++g) {
      const float* src = x.q + ((b * x.T + t0 + i) * x.H + kh * G + g) * E;
      float* dst = qs.data() + (i * G + g) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = src[e] * x.scale;
    }
  }
  const int32_t* qseg = x.q_seg ? x.q_seg + b * x.T + t0 : nullptr;
  const int32_t* kseg = x.kv_seg ? x.kv_seg + b * x.S : nullptr;
  int32_t seg_lo = 0, seg_hi = 0;
  if (qseg) {
    seg_lo = seg_hi = qseg[0];
    for (int64_t i = 1; i < tb; ++i) seg_lo = std::min(seg_lo, qseg[i]), seg_hi = std::max(seg_hi, qseg[i]);
  }
  for (int64_t start = 0; start < hi_lim; start += kBlockK) {
    const int64_t cols = std::min(kBlockK, hi_lim - start);
    if (kseg) {  // skip a block whose documents the query block does not hold
      int32_t lo = kseg[start], hi = kseg[start];
      for (int64_t c = 1; c < cols; ++c) lo = std::min(lo, kseg[start + c]), hi = std::max(hi, kseg[start + c]);
      if (hi < seg_lo || lo > seg_hi) continue;
    }
    const float* kp = x.k + (b * x.S + start) * kv_stride + kh * E;
    const float* vp = x.v + (b * x.S + start) * kv_stride + kh * E;
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, R, cols, E, 1.0f, qs.data(), E, kp, kv_stride, 0.0f,
                sc.data(), cols);
    const bool masked = start + cols > lo_lim || kseg;
    for (int64_t r = 0; r < R; ++r) {  // mask, and subtract the new running max
      float* row = sc.data() + r * cols;
      if (masked) {
        const int64_t i = r / G, n = std::clamp<int64_t>(lim[i] - start, 0, cols);
        for (int64_t c = n; c < cols; ++c) row[c] = -INFINITY;
        if (kseg)
          for (int64_t c = 0; c < n; ++c)
            if (kseg[start + c] != qseg[i]) row[c] = -INFINITY;
      }
      const float mx = RowMax(row, cols, m[r]);
      const float alpha = std::exp(m[r] - mx);
      m[r] = mx, l[r] *= alpha;
      for (int64_t c = 0; c < cols; ++c) row[c] -= mx;
      if (alpha != 1.0f)
        for (int64_t e = 0; e < E; ++e) acc[r * E + e] *= alpha;
    }
    // exp(-inf) = 0: a masked key adds nothing. VML_LA: low accuracy, 4 ulp at most (of the f32's
    // 24 bits), 1.3x faster than the default (1 ulp).
    vmsExp(R * cols, sc.data(), sc.data(), 0x1 /* VML_LA */);
    for (int64_t r = 0; r < R; ++r) {
      l[r] += RowSum(sc.data() + r * cols, cols);
    }
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, R, E, cols, 1.0f, sc.data(), cols, vp, kv_stride,
                1.0f, acc.data(), E);
  }
  for (int64_t i = 0; i < tb; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const bool empty = l[r] == 0.0f;  // a row that sees no key: output 0, never NaN
      const float inv = empty ? 0.0f : 1.0f / l[r];
      float* dst = x.out + ((b * x.T + t0 + i) * x.H + kh * G + g) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = acc[r * E + e] * inv;
      x.lse[(b * x.K + kh) * x.T * G + t0 * G + r] = empty ? x.lse_empty : m[r] + std::log(l[r]);
    }
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_off,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> q_seg,
                         ffi::Buffer<ffi::S32> kv_seg, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> lse, bool causal, float sm_scale,
                         float lse_empty, int64_t block_q, int64_t block_k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("cpu attention: q, k, v must be [B, T|S, heads, E]");
  AttentionArgs x{q.typed_data(), k.typed_data(), v.typed_data(), q_off.typed_data(),
                  kv_len.typed_data(), nullptr, nullptr, out->typed_data(), lse->typed_data(),
                  qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], block_q, block_k, causal, sm_scale,
                  lse_empty};
  if (block_q < 1 || block_k < 1) return ffi::Error::InvalidArgument("cpu attention: block sizes < 1");
  if (x.H % x.K || kd[3] != x.E || kd[0] != x.B)
    return ffi::Error::InvalidArgument("cpu attention: q and k shapes do not match");
  if (q_seg.element_count() == x.B * x.T && kv_seg.element_count() == x.B * x.S && x.T > 0)
    x.q_seg = q_seg.typed_data(), x.kv_seg = kv_seg.typed_data();
  const int64_t nq = (x.T + block_q - 1) / block_q, items = x.B * x.K * nq;
  // Longest items (the last query blocks, under a causal mask) first.
  ParallelFor(pool, items, [&](int64_t p) {
    const int64_t i = items - 1 - p;
    MKL_Set_Num_Threads_Local(1);  // this item's GEMMs on this thread only
    AttentionBlock(x, i / (x.K * nq), i % x.K, i / x.K % nq);
    MKL_Set_Num_Threads_Local(0);  // back to the global setting
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("lse_empty")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

// MKL single-threaded, before its first call: the pieces above are the parallelism.
extern "C" int llama_jax_gemm_init() { return MKL_Set_Threading_Layer(3 /* MKL_THREADING_GNU */); }
