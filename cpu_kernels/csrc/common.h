// What the library's source files share (cpu_kernels.cc, quant.cc): MKL's entry points, the two
// ways of running work on several threads, and a reduction. In a named namespace, not an anonymous
// one, so that the spinning pool is one object for the whole library: two pools would spin against
// each other between a step's f32 and quantized products.
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

extern "C" {
// MKL's CBLAS, LP64 (no header needed).
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
void vmsExp(int n, const float* a, float* y, long long mode);
int MKL_Set_Num_Threads_Local(int n);
int MKL_Set_Threading_Layer(int code);
}

namespace llama_jax_cpu {

namespace ffi = xla::ffi;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

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

// Threads for the matrix-vector products of decode: a step is ~200 products of a few MB, one after
// another, each too short (20-200 us) for a pool whose threads sleep between jobs (XLA's intra-op
// pool took ~100 us to wake; MKL's OpenMP team fought XLA's threads for the cores). The helpers
// spin for kSpinNs after each job, so those of the next product start at once, then sleep.
// A job is pieces that whoever is running claims one at a time, the calling thread first: it never
// waits for a helper that has not started (asleep, or descheduled on a machine with more runnable
// threads than cores, where waiting for one cost a scheduler time slice, milliseconds, per
// product), only for pieces a helper has claimed.
// Pieces per thread of a product split over the SpinPool: more than one, so that a helper that joins
// late still finds work.
constexpr int kPiecesPerThread = 2;

class SpinPool {
 public:
  static SpinPool& Get() {
    static const bool registered = [] {
      // A forked child has none of its parent's threads: it starts a pool of its own.
      return pthread_atfork(nullptr, nullptr, [] { instance_ = nullptr; }) == 0;
    }();
    (void)registered;
    std::lock_guard<std::mutex> lock(instance_mu_);
    if (!instance_) instance_ = new SpinPool(Helpers());  // never destroyed: its threads outlive main
    return *instance_;
  }
  int threads() const { return helpers_ + 1; }

  // Runs f(0 .. pieces-1) (at most kMaxPieces) on this thread and the helpers that join; returns
  // when all have run. When another thread holds the pool (XLA running two independent products at
  // once), this thread runs them all.
  template <typename F>
  void Run(int pieces, const F& f) {
    std::unique_lock<std::mutex> lock(run_mu_, std::try_to_lock);
    if (!lock.owns_lock() || helpers_ == 0 || pieces <= 1) {
      for (int i = 0; i < pieces; ++i) f(i);
      return;
    }
    job_ = [](const void* ctx, int piece) { (*static_cast<const F*>(ctx))(piece); };
    ctx_ = &f;
    const uint32_t generation = generation_.load(std::memory_order_relaxed) + 1;
    // The job before this one left its claims exhausted, so no helper claims anything of this one
    // before this store publishes it (with job_ and ctx_).
    claims_.store(uint64_t{generation} << 32 | uint64_t(pieces) << 16, std::memory_order_release);
    generation_.store(generation, std::memory_order_release);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> guard(sleep_mu_);
      sleep_cv_.notify_all();
    }
    const int mine = Drain(generation);
    while (done_.load(std::memory_order_acquire) + mine < pieces) _mm_pause();
    done_.store(0, std::memory_order_relaxed);
  }

  static constexpr int kMaxPieces = 0xFFFF;

 private:
  static constexpr int64_t kSpinNs = 2'000'000;

  static int Helpers() {
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    return std::clamp(cores - 1, 0, 7);  // a few cores already saturate memory bandwidth
  }

  explicit SpinPool(int helpers) : helpers_(helpers) {
    for (int i = 0; i < helpers; ++i) std::thread([this] { Loop(); }).detach();
  }

  // Claims and runs pieces of job `generation` until none is left; returns how many it ran.
  int Drain(uint32_t generation) {
    int ran = 0;
    uint64_t c = claims_.load(std::memory_order_acquire);
    for (;;) {  // c: generation (32 bits), pieces (16), next piece (16)
      const int pieces = int(c >> 16 & 0xFFFF), next = int(c & 0xFFFF);
      if (uint32_t(c >> 32) != generation || next >= pieces) return ran;
      if (!claims_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
      job_(ctx_, next);  // the job's caller waits for this piece, so job_ and ctx_ stay valid
      ++ran;
      c = claims_.load(std::memory_order_acquire);
    }
  }

  void Loop() {
    uint32_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if (spins % 256) continue;
        std::this_thread::yield();  // to any other thread waiting for this core (XLA's)
        if (std::chrono::steady_clock::now() - start < std::chrono::nanoseconds(kSpinNs)) continue;
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1);
        sleep_cv_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (const int ran = Drain(seen)) done_.fetch_add(ran, std::memory_order_release);
    }
  }

  static inline SpinPool* instance_ = nullptr;
  static inline std::mutex instance_mu_;
  const int helpers_;
  std::mutex run_mu_;  // one job at a time
  void (*job_)(const void*, int) = nullptr;
  const void* ctx_ = nullptr;
  std::atomic<uint32_t> generation_{0};  // bumped once per job
  std::atomic<uint64_t> claims_{0};      // the job's generation, its pieces and the next unclaimed
  std::atomic<int> done_{0};             // pieces the helpers have run
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
};

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// a[0..n) . b[0..n) (AVX2), in four independent chains of FMAs: one would wait on the FMA's latency
// every 8 floats.
inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int c = 0; c < 4; ++c)
      acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * c), _mm256_loadu_ps(b + i + 8 * c), acc[c]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  float s = HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace llama_jax_cpu
