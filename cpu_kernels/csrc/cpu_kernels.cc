// CPU kernels for the model's f32 hot spots, as XLA FFI custom calls (built and registered by
// llama_jax/cpu_kernels.py, linked against Intel MKL's libmkl_rt):
//
// Gemm: c[i] = op(a[i]) @ op(b[i]) through MKL's sgemm. XLA:CPU's own GEMM runs at 0.7-0.9x of
//   MKL's on this project's layer shapes. a [batch..., p, q], b [batch..., r, s] with the same
//   batch, or one of them without batch dims (shared by the batch); op transposes when asked.
//   One product at a time, with MKL's (GNU OpenMP) threads: XLA runs independent products at
//   once (the q, k and v projections), and two MKL thread teams oversubscribe the cores.
//
// Matvec: y = x @ op(w) for a decode step's few rows, split over threads of our own that spin
//   between products (SpinPool), AVX2 with software prefetch.
//
// DecodeAttention: one query per head over a paged KV cache (a contiguous one is one page per
//   sequence), flash-decoding: chunks of each sequence's keys over the same threads, merged by
//   their log-sum-exps.
//
// Attention: causal (or not) GQA attention in the FlashAttention-2 way, per (sequence, kv head,
//   block) on XLA's intra-op pool: the G query heads of a kv head stacked as rows, MKL GEMMs
//   (single-threaded) over a tile that stays in L2, and the mask, max and exp (MKL VML) over the
//   tile between them. Key blocks every row of a query block has masked are never computed. The
//   forward returns the log-sum-exp; the backward recomputes the probabilities from it, in a pass
//   over key blocks (dk, dv) and one over query blocks (dq), so no two work items write the same
//   gradient.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common.h"

namespace {

using namespace llama_jax_cpu;

// MKL VML's mode for exp: low accuracy (VML_LA, 4 ulp at most), errors ignored
// (VML_ERRMODE_IGNORE): an underflow to 0 is what the softmax wants, and reporting it went through
// VML's error handler once per tile (a third of a short decode attention's time).
constexpr long long kVmlLA = 0x1 | 0x100;

// One product at a time: when XLA runs two independent products at once (the q, k and v
// projections), each with MKL's threads, the cores are oversubscribed and both crawl.
std::mutex mkl_mutex;

struct Matrices {
  int64_t batch, rows, cols;
};

// A buffer's dims as (product of the leading dims, rows, cols).
Matrices Split(ffi::Span<const int64_t> dims) {
  Matrices m{1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 2 < dims.size(); ++i) m.batch *= dims[i];
  return m;
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
  std::lock_guard<std::mutex> lock(mkl_mutex);
  for (int64_t i = 0; i < batch; ++i)
    cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
                a.typed_data() + (ma.batch == 1 ? 0 : i * m * k), ma.cols,
                b.typed_data() + (mb.batch == 1 ? 0 : i * k * n), mb.cols, 0.0f, pc + i * m * n, n);
  return ffi::Error::Success();
}


// --- Matvec: the products of a decode step --------------------------------------------------------

// y[m, n] = x[m, :] . w[n, :] for n in [n0, n1): w [N, K], one row of w at a time, dotted with
// every row of x while it sits in L1, so that each thread reads one sequential stream, which the
// hardware prefetcher follows. Eight rows at a time with software prefetch (eight streams a thread)
// read SmolLM2's float32 decode at 41.5 tokens/s here against 62.4 for this.
void MatvecRows(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = Dot(x + m * K, w + n * K, K);
}

// y[m, n] = sum_k x[m, k] w[k, n] for n in [n0, n1): w [K, N], read row by row in slices of
// kCols columns whose sums stay in L1.
void MatvecCols(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                int64_t n1) {
  constexpr int64_t kCols = 512;
  alignas(32) float acc[kCols];
  for (int64_t c = n0; c < n1; c += kCols) {
    const int64_t width = std::min(kCols, n1 - c), vec = width / 8 * 8;
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc, acc + width, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float xk = x[m * K + k];
        const __m256 xv = _mm256_set1_ps(xk);
        const float* r = w + k * N + c;
        for (int64_t j = 0; j < vec; j += 8)
          _mm256_store_ps(acc + j, _mm256_fmadd_ps(_mm256_loadu_ps(r + j), xv, _mm256_load_ps(acc + j)));
        for (int64_t j = vec; j < width; ++j) acc[j] += xk * r[j];
      }
      std::copy(acc, acc + width, y + m * N + c);
    }
  }
}

// y = x @ w^T (w [N, K], trans) or x @ w (w [K, N]) for a few rows x [M, K]: the output columns
// split over the spinning pool's threads.
ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                      bool trans) {
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("cpu_matvec: operands must be 2-D");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t N = trans ? w.dimensions()[0] : w.dimensions()[1];
  if ((trans ? w.dimensions()[1] : w.dimensions()[0]) != K)
    return ffi::Error::InvalidArgument("cpu_matvec: contracting dims differ");
  const float *px = x.typed_data(), *pw = w.typed_data();
  float* py = y->typed_data();
  SpinPool& pool = SpinPool::Get();
  // Small products are not worth a second thread.
  const int pieces = N * K < (1 << 16) ? 1 : kPiecesPerThread * pool.threads();
  const int64_t step = (N + pieces - 1) / pieces;
  pool.Run(pieces, [&](int p) {
    const int64_t n0 = std::min(N, p * step), n1 = std::min(N, n0 + step);
    (trans ? MatvecRows : MatvecCols)(px, pw, py, M, N, K, n0, n1);
  });
  return ffi::Error::Success();
}

// --- Attention ------------------------------------------------------------------------------------

constexpr float kMInit = -1e30f;  // the running max's start: far below any logit, far above -inf

struct AttentionArgs {
  const float *q, *k, *v;          // [B, T, H, E], [B, S, K, E], [B, S, K, E]
  const int32_t *q_off, *kv_len;   // [B]
  const int32_t *q_seg, *kv_seg;   // [B, T], [B, S], or null
  float *out, *lse;                // forward: [B, T, H, E], [B, K, T * G]
  int64_t B, T, S, H, K, E;
  int64_t block_q, block_k;  // query positions per work item (x G rows), keys per tile
  bool causal;
  float scale, lse_empty;
  // Backward: the output's cotangent [B, T, H, E]; the forward's lse and rowsum(o * do), each
  // [B, K, T * G]; the gradients [B, T, H, E], [B, S, K, E], [B, S, K, E].
  const float *dout = nullptr, *lse_in = nullptr, *delta = nullptr;
  float *dq = nullptr, *dk = nullptr, *dv = nullptr;
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
  float sum = HorizontalSum(acc);
  for (; c < n; ++c) sum += x[c];
  return sum;
}

// The rows of query block qb of a sequence: positions [t0, t0 + tb), each with its G heads.
struct QueryRows {
  int64_t t0, tb, R;
  std::vector<int64_t> lim;  // position t0 + i sees the keys below lim[i]
  int64_t lo_lim, hi_lim;    // their min and max
  const int32_t* qseg;       // the positions' segment ids, or null
  int32_t seg_lo = 0, seg_hi = 0;
};

QueryRows Rows(const AttentionArgs& x, int64_t b, int64_t qb) {
  QueryRows q;
  q.t0 = qb * x.block_q, q.tb = std::min(x.block_q, x.T - q.t0), q.R = q.tb * (x.H / x.K);
  q.lim.resize(q.tb), q.lo_lim = x.S, q.hi_lim = 0;
  const int64_t len = std::clamp<int64_t>(x.kv_len[b], 0, x.S);
  for (int64_t i = 0; i < q.tb; ++i) {
    int64_t li = len;
    if (x.causal) li = std::min<int64_t>(li, std::max<int64_t>(0, x.q_off[b] + q.t0 + i + 1));
    q.lim[i] = li, q.lo_lim = std::min(q.lo_lim, li), q.hi_lim = std::max(q.hi_lim, li);
  }
  q.qseg = x.q_seg ? x.q_seg + b * x.T + q.t0 : nullptr;
  if (q.qseg) {
    q.seg_lo = q.seg_hi = q.qseg[0];
    for (int64_t i = 1; i < q.tb; ++i)
      q.seg_lo = std::min(q.seg_lo, q.qseg[i]), q.seg_hi = std::max(q.seg_hi, q.qseg[i]);
  }
  return q;
}

// dst [R, E]: the rows (t, g) of kv head kh in src [B, T, H, E], times scale.
void Gather(const AttentionArgs& x, const float* src, int64_t b, int64_t kh, const QueryRows& q,
            float scale, float* dst) {
  const int64_t G = x.H / x.K, E = x.E;
  for (int64_t i = 0; i < q.tb; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const float* from = src + ((b * x.T + q.t0 + i) * x.H + kh * G + g) * E;
      float* to = dst + (i * G + g) * E;
      for (int64_t e = 0; e < E; ++e) to[e] = from[e] * scale;
    }
}

// How many keys of the block at `start` a row of q may see (0: skip the block): none past the
// block's latest limit, and none of a block whose documents the query block does not hold.
int64_t BlockKeys(const AttentionArgs& x, int64_t b, const QueryRows& q, int64_t start) {
  const int64_t cols = std::min(x.block_k, q.hi_lim - start);
  if (cols <= 0) return 0;
  if (x.kv_seg) {
    const int32_t* kseg = x.kv_seg + b * x.S + start;
    int32_t lo = kseg[0], hi = kseg[0];
    for (int64_t c = 1; c < cols; ++c) lo = std::min(lo, kseg[c]), hi = std::max(hi, kseg[c]);
    if (hi < q.seg_lo || lo > q.seg_hi) return 0;
  }
  return cols;
}

// sc [R, cols] = qs K^T over keys [start, start + cols) of kv head kh, -inf where masked.
void Scores(const AttentionArgs& x, int64_t b, int64_t kh, const QueryRows& q, const float* qs,
            int64_t start, int64_t cols, float* sc) {
  const int64_t G = x.H / x.K, E = x.E, kv_stride = x.K * E;
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, q.R, cols, E, 1.0f, qs, E,
              x.k + (b * x.S + start) * kv_stride + kh * E, kv_stride, 0.0f, sc, cols);
  const int32_t* kseg = x.kv_seg ? x.kv_seg + b * x.S + start : nullptr;
  if (start + cols <= q.lo_lim && !kseg) return;  // every row sees every key
  for (int64_t r = 0; r < q.R; ++r) {
    float* row = sc + r * cols;
    const int64_t i = r / G, n = std::clamp<int64_t>(q.lim[i] - start, 0, cols);
    for (int64_t c = n; c < cols; ++c) row[c] = -INFINITY;
    if (kseg)
      for (int64_t c = 0; c < n; ++c)
        if (kseg[c] != q.qseg[i]) row[c] = -INFINITY;
  }
}

// The forward of query block qb of kv head kh of sequence b.
void AttentionBlock(const AttentionArgs& x, int64_t b, int64_t kh, int64_t qb) {
  const int64_t G = x.H / x.K, E = x.E, kv_stride = x.K * E;
  const QueryRows q = Rows(x, b, qb);
  const int64_t R = q.R;
  thread_local std::vector<float> qs, sc, acc, m, l;
  qs.resize(R * E), sc.resize(R * x.block_k), acc.assign(R * E, 0.0f);
  m.assign(R, kMInit), l.assign(R, 0.0f);
  Gather(x, x.q, b, kh, q, x.scale, qs.data());
  for (int64_t start = 0; start < q.hi_lim; start += x.block_k) {
    const int64_t cols = BlockKeys(x, b, q, start);
    if (cols == 0) continue;
    Scores(x, b, kh, q, qs.data(), start, cols, sc.data());
    for (int64_t r = 0; r < R; ++r) {  // subtract the new running max
      float* row = sc.data() + r * cols;
      const float mx = RowMax(row, cols, m[r]);
      const float alpha = std::exp(m[r] - mx);
      m[r] = mx, l[r] *= alpha;
      for (int64_t c = 0; c < cols; ++c) row[c] -= mx;
      if (alpha != 1.0f)
        for (int64_t e = 0; e < E; ++e) acc[r * E + e] *= alpha;
    }
    // exp(-inf) = 0: a masked key adds nothing. VML_LA: low accuracy, 4 ulp at most (of the f32's
    // 24 bits), 1.3x faster than the default (1 ulp).
    vmsExp(R * cols, sc.data(), sc.data(), kVmlLA);
    for (int64_t r = 0; r < R; ++r) l[r] += RowSum(sc.data() + r * cols, cols);
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, R, E, cols, 1.0f, sc.data(), cols,
                x.v + (b * x.S + start) * kv_stride + kh * E, kv_stride, 1.0f, acc.data(), E);
  }
  for (int64_t i = 0; i < q.tb; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const bool empty = l[r] == 0.0f;  // a row that sees no key: output 0, never NaN
      const float inv = empty ? 0.0f : 1.0f / l[r];
      float* dst = x.out + ((b * x.T + q.t0 + i) * x.H + kh * G + g) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = acc[r * E + e] * inv;
      x.lse[(b * x.K + kh) * x.T * G + q.t0 * G + r] = empty ? x.lse_empty : m[r] + std::log(l[r]);
    }
}

// Backward, shared by both passes: for the rows of q (queries qs, scaled; cotangents dos) over
// keys [start, start + cols) of kv head kh, p = exp(s - lse) and ds = p * (do v^T - delta), into
// p and ds [R, cols].
void ProbsAndGrads(const AttentionArgs& x, int64_t b, int64_t kh, const QueryRows& q,
                   const float* qs, const float* dos, int64_t start, int64_t cols, float* p,
                   float* ds) {
  const int64_t E = x.E, kv_stride = x.K * E, G = x.H / x.K;
  const float* lse = x.lse_in + (b * x.K + kh) * x.T * G + q.t0 * G;
  const float* delta = x.delta + (b * x.K + kh) * x.T * G + q.t0 * G;
  Scores(x, b, kh, q, qs, start, cols, p);
  for (int64_t r = 0; r < q.R; ++r)
    for (int64_t c = 0; c < cols; ++c) p[r * cols + c] -= lse[r];
  vmsExp(q.R * cols, p, p, kVmlLA);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, q.R, cols, E, 1.0f, dos, E,
              x.v + (b * x.S + start) * kv_stride + kh * E, kv_stride, 0.0f, ds, cols);
  for (int64_t r = 0; r < q.R; ++r)
    for (int64_t c = 0; c < cols; ++c) ds[r * cols + c] = p[r * cols + c] * (ds[r * cols + c] - delta[r]);
}

// dK and dV of key block kb of kv head kh: over every query block that sees it.
void KeyBlockGrads(const AttentionArgs& x, int64_t b, int64_t kh, int64_t kb) {
  const int64_t E = x.E, kv_stride = x.K * E, start = kb * x.block_k;
  const int64_t nq = (x.T + x.block_q - 1) / x.block_q, width = std::min(x.block_k, x.S - start);
  thread_local std::vector<float> qs, dos, p, ds, dk, dv;
  dk.assign(width * E, 0.0f), dv.assign(width * E, 0.0f);
  for (int64_t qb = 0; qb < nq; ++qb) {
    const QueryRows q = Rows(x, b, qb);
    const int64_t cols = BlockKeys(x, b, q, start);
    if (cols == 0) continue;
    qs.resize(q.R * E), dos.resize(q.R * E), p.resize(q.R * cols), ds.resize(q.R * cols);
    Gather(x, x.q, b, kh, q, x.scale, qs.data());
    Gather(x, x.dout, b, kh, q, 1.0f, dos.data());
    ProbsAndGrads(x, b, kh, q, qs.data(), dos.data(), start, cols, p.data(), ds.data());
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, cols, E, q.R, 1.0f, p.data(), cols, dos.data(), E,
                1.0f, dv.data(), E);  // dv += p^T do
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, cols, E, q.R, 1.0f, ds.data(), cols, qs.data(), E,
                1.0f, dk.data(), E);  // dk += ds^T (q * scale)
  }
  for (int64_t c = 0; c < width; ++c) {
    const int64_t at = (b * x.S + start + c) * kv_stride + kh * E;
    std::copy(dk.begin() + c * E, dk.begin() + (c + 1) * E, x.dk + at);
    std::copy(dv.begin() + c * E, dv.begin() + (c + 1) * E, x.dv + at);
  }
}

// dQ of query block qb of kv head kh: over the key blocks it sees.
void QueryBlockGrads(const AttentionArgs& x, int64_t b, int64_t kh, int64_t qb) {
  const int64_t G = x.H / x.K, E = x.E, kv_stride = x.K * E;
  const QueryRows q = Rows(x, b, qb);
  thread_local std::vector<float> qs, dos, p, ds, dq;
  qs.resize(q.R * E), dos.resize(q.R * E), dq.assign(q.R * E, 0.0f);
  p.resize(q.R * x.block_k), ds.resize(q.R * x.block_k);
  Gather(x, x.q, b, kh, q, x.scale, qs.data());
  Gather(x, x.dout, b, kh, q, 1.0f, dos.data());
  for (int64_t start = 0; start < q.hi_lim; start += x.block_k) {
    const int64_t cols = BlockKeys(x, b, q, start);
    if (cols == 0) continue;
    ProbsAndGrads(x, b, kh, q, qs.data(), dos.data(), start, cols, p.data(), ds.data());
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, q.R, E, cols, 1.0f, ds.data(), cols,
                x.k + (b * x.S + start) * kv_stride + kh * E, kv_stride, 1.0f, dq.data(), E);
  }
  for (int64_t i = 0; i < q.tb; ++i)
    for (int64_t g = 0; g < G; ++g) {
      float* dst = x.dq + ((b * x.T + q.t0 + i) * x.H + kh * G + g) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = dq[(i * G + g) * E + e] * x.scale;
    }
}

// Runs block(b, kh, j) for every sequence, kv head and block j < n on the pool, MKL
// single-threaded; the largest j first if last_first (under a causal mask the last query blocks
// see the most keys, and the first key blocks are seen by the most queries).
template <typename F>
void ForEachBlock(ffi::ThreadPool& pool, const AttentionArgs& x, int64_t n, bool last_first, F block) {
  const int64_t items = x.B * x.K * n;
  ParallelFor(pool, items, [&](int64_t p) {
    const int64_t i = last_first ? items - 1 - p : p;
    MKL_Set_Num_Threads_Local(1);  // this item's GEMMs on this thread only
    block(x, i / (x.K * n), i % x.K, i / x.K % n);
    MKL_Set_Num_Threads_Local(0);  // back to the global setting
  });
}

// The arguments both attention handlers share, checked; the outputs are left to the caller.
ffi::Error Prepare(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> q_off, ffi::Buffer<ffi::S32> kv_len,
                   ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg, bool causal,
                   float sm_scale, int64_t block_q, int64_t block_k, AttentionArgs& x) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("cpu attention: q, k, v must be [B, T|S, heads, E]");
  x = AttentionArgs{q.typed_data(), k.typed_data(), v.typed_data(), q_off.typed_data(),
                    kv_len.typed_data(), nullptr, nullptr, nullptr, nullptr,
                    qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], block_q, block_k, causal, sm_scale,
                    0.0f};
  if (block_q < 1 || block_k < 1)
    return ffi::Error::InvalidArgument("cpu attention: block sizes < 1");
  if (x.H % x.K || kd[3] != x.E || kd[0] != x.B || vd[0] != x.B || vd[1] != x.S || vd[2] != x.K ||
      vd[3] != x.E)
    return ffi::Error::InvalidArgument("cpu attention: q, k and v shapes do not match");
  if (q_seg.element_count() == x.B * x.T && kv_seg.element_count() == x.B * x.S && x.T > 0)
    x.q_seg = q_seg.typed_data(), x.kv_seg = kv_seg.typed_data();
  return ffi::Error::Success();
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_off,
                         ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> q_seg,
                         ffi::Buffer<ffi::S32> kv_seg, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> lse, bool causal, float sm_scale,
                         float lse_empty, int64_t block_q, int64_t block_k) {
  AttentionArgs x{};
  if (auto error = Prepare(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, block_q,
                           block_k, x);
      error.failure())
    return error;
  x.out = out->typed_data(), x.lse = lse->typed_data(), x.lse_empty = lse_empty;
  ForEachBlock(pool, x, (x.T + block_q - 1) / block_q, true, AttentionBlock);
  return ffi::Error::Success();
}

// The gradients from the forward's lse: one pass over key blocks for dk and dv, one over query
// blocks for dq (FlashAttention-2's backward, with no write shared between work items).
ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> dout,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta,
                            ffi::Buffer<ffi::S32> q_off, ffi::Buffer<ffi::S32> kv_len,
                            ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv, bool causal, float sm_scale,
                            int64_t block_q, int64_t block_k) {
  AttentionArgs x{};
  if (auto error = Prepare(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, block_q,
                           block_k, x);
      error.failure())
    return error;
  x.dout = dout.typed_data(), x.lse_in = lse.typed_data(), x.delta = delta.typed_data();
  x.dq = dq->typed_data(), x.dk = dk->typed_data(), x.dv = dv->typed_data();
  ForEachBlock(pool, x, (x.S + block_k - 1) / block_k, false, KeyBlockGrads);
  ForEachBlock(pool, x, (x.T + block_q - 1) / block_q, true, QueryBlockGrads);
  return ffi::Error::Success();
}

// --- Decode attention -----------------------------------------------------------------------------

// One query per head and sequence over the first lengths[b] keys of a paged cache, split into
// chunks of kDecodeChunk keys (flash-decoding) so that a single sequence spreads over the spinning
// pool's threads; each chunk leaves its running max, sum and weighted values, and the calling
// thread merges them. Key t of sequence b is row t % page of page table[b, t / page] in the pool;
// the keys of one position (every kv head) lie together, so a chunk reads its keys and values as
// whole rows, tile by tile.
constexpr int64_t kDecodeChunk = 256, kDecodeTile = 64;

struct DecodeArgs {
  const float *q, *k, *v;  // [B, H, E], [P, page, K, E], [P, page, K, E]
  const int32_t *table, *len;  // [B, W], [B]
  int64_t B, P, page, W, H, K, E;
  float scale;

  int64_t S() const { return W * page; }  // the most keys a sequence can have
  int64_t Row(int64_t b, int64_t t) const {  // key t of sequence b: its row in the pool
    return int64_t{table[b * W + t / page]} * page + t % page;
  }
};

// y[0..n) = y * a + p * x (AVX2).
void ScaleAdd(float* y, float a, float p, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a), pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), pv, _mm256_mul_ps(_mm256_loadu_ps(y + i), av)));
  for (; i < n; ++i) y[i] = y[i] * a + p * x[i];
}

// Keys [j0, j1) of sequence b: m[h] the max logit, l[h] the sum of exp(logit - m), acc[h, :] the
// values weighted by those exps; m = kMInit, l = 0, acc = 0 for an empty range.
void DecodeChunk(const DecodeArgs& a, int64_t b, int64_t j0, int64_t j1, float* m, float* l, float* acc) {
  const int64_t H = a.H, E = a.E, G = H / a.K, T = kDecodeTile;
  std::fill(m, m + H, kMInit);
  std::fill(l, l + H, 0.0f);
  std::fill(acc, acc + H * E, 0.0f);
  thread_local std::vector<float> tile;
  tile.resize(H * T);
  float* s = tile.data();  // [H, T] logits, then probabilities
  const float* q = a.q + b * H * E;
  for (int64_t t0 = j0; t0 < j1; t0 += T) {
    const int64_t n = std::min(T, j1 - t0);
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = a.k + a.Row(b, t0 + j) * a.K * E;
      for (int64_t h = 0; h < H; ++h) s[h * T + j] = a.scale * Dot(q + h * E, kj + h / G * E, E);
    }
    for (int64_t h = 0; h < H; ++h) {
      float* sh = s + h * T;
      const float mt = RowMax(sh, n, m[h]), alpha = std::exp(m[h] - mt);
      m[h] = mt;
      l[h] *= alpha;
      if (alpha != 1.0f) ScaleAdd(acc + h * E, alpha, 0.0f, acc + h * E, E);
      for (int64_t j = 0; j < n; ++j) sh[j] -= mt;
      std::fill(sh + n, sh + T, kMInit);  // exp gives 0 past the tile's keys
    }
    vmsExp(H * T, s, s, kVmlLA);
    for (int64_t h = 0; h < H; ++h) l[h] += RowSum(s + h * T, n);
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = a.v + a.Row(b, t0 + j) * a.K * E;
      for (int64_t h = 0; h < H; ++h) ScaleAdd(acc + h * E, 1.0f, s[h * T + j], vj + h / G * E, E);
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                               ffi::ResultBuffer<ffi::F32> out, float sm_scale) {
  const auto kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  if (q.dimensions().size() != 3 || kd.size() != 4 || td.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("cpu_decode_attention: q [B, H, E], k and v [P, page, K, E], table [B, W]");
  DecodeArgs a{q.typed_data(), k.typed_data(), v.typed_data(), table.typed_data(), lengths.typed_data(),
               q.dimensions()[0], kd[0], kd[1], td[1], q.dimensions()[1], kd[2], q.dimensions()[2], sm_scale};
  if (td[0] != a.B || kd[3] != a.E || a.H % a.K || lengths.element_count() != a.B)
    return ffi::Error::InvalidArgument("cpu_decode_attention: shapes do not match");
  for (int64_t i = 0; i < a.B * a.W; ++i)
    if (a.table[i] < 0 || a.table[i] >= a.P)
      return ffi::Error::InvalidArgument("cpu_decode_attention: a block table entry outside the pool");
  int64_t longest = 0;
  for (int64_t b = 0; b < a.B; ++b) longest = std::max<int64_t>(longest, std::clamp<int64_t>(a.len[b], 0, a.S()));
  const int64_t chunks = std::max<int64_t>(1, (longest + kDecodeChunk - 1) / kDecodeChunk), n = a.B * chunks;
  std::vector<float> m(n * a.H), l(n * a.H), acc(n * a.H * a.E);  // per (b, chunk)
  std::atomic<int64_t> next{0};
  auto work = [&](int) {
    MKL_Set_Num_Threads_Local(1);  // vmsExp on this thread only
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      const int64_t b = i / chunks, c = i % chunks, len = std::clamp<int64_t>(a.len[b], 0, a.S());
      DecodeChunk(a, b, std::min(len, c * kDecodeChunk), std::min(len, (c + 1) * kDecodeChunk), &m[i * a.H],
                  &l[i * a.H], &acc[i * a.H * a.E]);
    }
    MKL_Set_Num_Threads_Local(0);
  };
  SpinPool::Get().Run(n == 1 ? 1 : SpinPool::Get().threads(), work);
  float* o = out->typed_data();
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h) {  // merge the chunks: rescale each to the overall max
      float mx = kMInit, total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, m[(b * chunks + c) * a.H + h]);
      float* oh = o + (b * a.H + h) * a.E;
      std::fill(oh, oh + a.E, 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (b * chunks + c) * a.H + h;
        const float w = l[i] > 0.0f ? std::exp(m[i] - mx) : 0.0f;
        total += w * l[i];
        ScaleAdd(oh, 1.0f, w, &acc[i * a.E], a.E);
      }
      if (total > 0.0f) ScaleAdd(oh, 1.0f / total, 0.0f, oh, a.E);  // no keys: zeros
    }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

// MKL's threads as GNU OpenMP threads (libgomp), set before its first call: gemm's products use
// them; the attention work items set MKL to one thread each, the pool being their parallelism.
extern "C" int llama_jax_gemm_init() { return MKL_Set_Threading_Layer(3 /* MKL_THREADING_GNU */); }
