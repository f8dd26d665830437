// Quantized linear layers as an XLA FFI custom call: y = x @ W^T for a weight W [N, K] held as
// llama_jax.quant's QArray in its inference layout (axis -1: each output row contiguous along the
// input, in groups of G inputs with their own scale, and min where GGUF Q4_1 has one), which is
// GGUF's own layout, block for block. Scales (and mins) are [N, K / G]; G = K when there is one
// scale per output row.
//   int8: int8 values, w = v * s, f16 or f32 scales (GGUF Q8_0: G = 32, f16).
//   int4: nibbles packed [N, K / 2]: within each group, byte j holds input j (low nibble) and input
//         j + G/2 (high); w = (nibble - 8) * s, or nibble * s + min, f16 scales and mins (GGUF Q4_0
//         and Q4_1 at G = 32).
//   fp8:  float8_e4m3fn values, w = v * s, one f16 or f32 scale per row.
//
// Decode (fewer than kGemmRows rows of x) reads each weight byte once for all rows and expands it
// in registers to f32 (int8 values and int4 nibbles are small integers, exact in f32; fp8 through
// f16 by shifts), multiplied by the f32 activations as they are: the result is the dequantized
// product up to f32 summation order (each weight made as dequantize makes it, or a row's one scale
// applied to its sum, which factors out exactly but for rounding), not llama.cpp's,
// which rounds the activations to int8 first for integer products. The output rows are split over
// the spinning pool as Matvec's are.
// Prefill (kGemmRows rows or more) and the gradient with respect to x (x @ W, `transposed`):
// panels of W dequantized to f32 exactly as llama_jax.quant.dequantize computes them, in cache,
// each multiplied by MKL's sgemm (single-threaded), the panels spread over XLA's pool.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "common.h"

namespace {

using namespace llama_jax_cpu;

// Rows of x from which a product goes through dequantized panels and sgemm (cpu_kernels.quant.
// PANEL_ROWS): the decode kernels expand every weight again for each 4 rows of x, and at 16 rows the
// two took about as long.
constexpr int64_t kGemmRows = 16;
// The decode kernels take this many rows of x per pass over a weight row (their accumulators stay
// in registers); more rows pass again over the same row, then in L1.
constexpr int kRowTile = 4;
// A dequantized panel's floats: 256 KB, in L2 beside the sgemm's packed operands.
constexpr int64_t kPanelFloats = 1 << 16;
// Products of fewer weights run on the calling thread: waking a helper costs more.
constexpr int64_t kMinSplit = 1 << 16;

enum class Format { kInt8, kInt4, kFp8 };

struct QWeight {
  Format format;
  const uint8_t* values;
  const void* scales;     // [N, groups], f16 (int4 always) or f32
  const uint16_t* mins;   // [N, groups] f16, or null: int4 with mins only
  bool scales_f16;
  int64_t N, K, G, groups, row_bytes;

  const uint8_t* Row(int64_t n) const { return values + n * row_bytes; }
  const uint16_t* Scales16(int64_t n) const { return static_cast<const uint16_t*>(scales) + n * groups; }
  // int4 as nibble * scale + offset: the group's min, or -8 * scale when symmetric.
  float Offset(int64_t n, int64_t g) const {
    return mins ? _cvtsh_ss(mins[n * groups + g]) : -8.0f * _cvtsh_ss(Scales16(n)[g]);
  }
};

// a[0..n) as f32, from f16 (F16C) or f32.
void ToF32(const void* a, bool f16, int64_t n, float* out) {
  if (!f16) {
    std::memcpy(out, a, n * sizeof(float));
    return;
  }
  const auto* h = static_cast<const uint16_t*>(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}

// Row n's scales as f32 (int8, fp8: f16 or f32 scales).
void RowScales(const QWeight& w, int64_t n, float* s) {
  ToF32(static_cast<const char*>(w.scales) + n * w.groups * (w.scales_f16 ? 2 : 4), w.scales_f16, w.groups, s);
}

// 16 float8_e4m3fn bytes -> two vectors of f32 values * 2^-8: the bytes' bits moved into f16's
// fields (f16 has one more exponent bit, so every e4m3 value, subnormals included, is an f16 of
// 2^-8 times it), then F16C's exact conversion.
inline void Fp8ToF32(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3F80)),
                                    _mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16(int16_t(0x8000))));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
constexpr float kFp8Unscale = 256.0f;  // undoes Fp8ToF32's 2^-8

// Accumulators per row of x in the decode kernels: four independent chains of FMAs for one row, so
// that it does not wait on their latency; two each for several rows, whose chains are independent
// already (and four each would not fit the 16 vector registers).
template <int MT>
constexpr int kChains = MT == 1 ? 4 : 2;

// --- int4 decode -----------------------------------------------------------------------------------

// y[m, n] for rows m0 .. m0 + MT - 1 of x and weight row n, in f32: each weight made in registers
// as llama_jax.quant.dequantize makes it, nibble * scale + offset (the group's min, or -8 * scale)
// in one FMA (nibble * scale is exact, so its one rounding is dequantize's), then dotted with x.
// s and o: the row's scales and offsets in f32, converted 8 at a time by DecodeRows once per row,
// and the nibbles and x walked by pointers: on the AVX2 CPU measured (Zen 3) this loop's time
// follows its instruction count, and a conversion of each group's f16 scale and min here, with
// addresses recomputed every 16 bytes, made nearly half of it. (Taking the scale and min out of
// each group's sum instead saves an FMA a weight but was no faster, and the min's term, min * (sum
// of x), cancels against the scale's: three times the rounding error on Q4_1's weights.)
// 16 bytes at a time: their low nibbles are 16 consecutive inputs, their high nibbles the 16 that
// are G/2 further.
template <int MT>
void Int4Row(const QWeight& w, const float* x, const float* s, const float* o, int64_t n, int64_t m0, float* y) {
  constexpr int C = kChains<MT>;
  const uint8_t* p = w.Row(n);
  const int64_t K = w.K, G = w.G, half = G / 2;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  __m256 acc[MT][C];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
  const float* xg = x + m0 * K;  // row m0 of x at group g
  for (int64_t g = 0; g < w.groups; ++g, xg += G) {
    const __m256 d = _mm256_broadcast_ss(s + g), offset = _mm256_broadcast_ss(o + g);
    for (int64_t j = 0; j < half; j += 16, p += 16) {
      __m256 v[4];  // inputs j .. j+7, j+8 .. j+15 (low nibbles), the same + G/2 (high)
      for (int i = 0; i < 2; ++i) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i)));
        v[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nibble)), d, offset);
        v[2 + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), d, offset);
      }
      for (int m = 0; m < MT; ++m) {
        const float* xm = xg + m * K + j;
        acc[m][0 % C] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xm), acc[m][0 % C]);
        acc[m][1 % C] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xm + 8), acc[m][1 % C]);
        acc[m][2 % C] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xm + half), acc[m][2 % C]);
        acc[m][3 % C] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xm + half + 8), acc[m][3 % C]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 t = acc[m][0];
    for (int c = 1; c < C; ++c) t = _mm256_add_ps(t, acc[m][c]);
    y[(m0 + m) * w.N + n] = HorizontalSum(t);
  }
}

// --- int8 decode -----------------------------------------------------------------------------------

// y[m, n] as Int4Row: in groups, each weight made as dequantize makes it, value * scale (one
// rounding, dequantize's), then dotted with x: summing each group apart and scaling its sum instead
// puts a reduction of the FMA chains, and its latency, on every group of 32. With one scale per
// row, that scale multiplies the row's sum instead.
template <int MT>
void Int8Row(const QWeight& w, const float* x, const float* s, int64_t n, int64_t m0, float* y) {
  constexpr int C = kChains<MT>;
  const int8_t* row = reinterpret_cast<const int8_t*>(w.Row(n));
  const bool grouped = w.groups > 1;
  __m256 acc[MT][C];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m256 d = _mm256_broadcast_ss(s + g);
    for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 32) {
      __m256 v[4];
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * i))));
        if (grouped) v[i] = _mm256_mul_ps(v[i], d);
      }
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + (m0 + m) * w.K + k;
        for (int i = 0; i < 4; ++i) acc[m][i % C] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xm + 8 * i), acc[m][i % C]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 t = acc[m][0];
    for (int c = 1; c < C; ++c) t = _mm256_add_ps(t, acc[m][c]);
    y[(m0 + m) * w.N + n] = HorizontalSum(t) * (grouped ? 1.0f : s[0]);
  }
}

// --- fp8 decode ------------------------------------------------------------------------------------

template <int MT>
void Fp8Row(const QWeight& w, const float* x, const float* s, int64_t n, int64_t m0, float* y) {
  const uint8_t* row = w.Row(n);
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < w.K; k += 16) {
    __m256 lo, hi;
    Fp8ToF32(row + k, lo, hi);
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + (m0 + m) * w.K + k;
      acc[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m)
    y[(m0 + m) * w.N + n] = HorizontalSum(_mm256_add_ps(acc[m][0], acc[m][1])) * s[0] * kFp8Unscale;
}

// Weight rows [n0, n1) against every row of x, kRowTile rows of x at a time.
void DecodeRows(const QWeight& w, const float* x, int64_t M, int64_t n0, int64_t n1, float* y) {
  std::vector<float> scales(w.groups), offsets(w.format == Format::kInt4 ? w.groups : 0);
  float *s = scales.data(), *o = offsets.data();
  for (int64_t n = n0; n < n1; ++n) {
    RowScales(w, n, s);
    if (w.format == Format::kInt4) {  // QWeight::Offset, 8 at a time
      if (w.mins)
        ToF32(w.mins + n * w.groups, true, w.groups, o);
      else
        for (int64_t g = 0; g < w.groups; ++g) o[g] = -8.0f * s[g];
    }
    for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      auto rows = [&](auto tile) {
        constexpr int MT = decltype(tile)::value;
        switch (w.format) {
          case Format::kInt4: return Int4Row<MT>(w, x, s, o, n, m0, y);
          case Format::kInt8: return Int8Row<MT>(w, x, s, n, m0, y);
          case Format::kFp8: return Fp8Row<MT>(w, x, s, n, m0, y);
        }
      };
      static_assert(kRowTile == 4);
      switch (std::min<int64_t>(kRowTile, M - m0)) {
        case 1: rows(std::integral_constant<int, 1>()); break;
        case 2: rows(std::integral_constant<int, 2>()); break;
        case 3: rows(std::integral_constant<int, 3>()); break;
        default: rows(std::integral_constant<int, 4>()); break;
      }
    }
  }
}

void Decode(const QWeight& w, const float* x, int64_t M, float* y) {
  // Small products are not worth a second thread.
  const int pieces = w.N * w.K < kMinSplit ? 1 : kPiecesPerThread * SpinPool::Get().threads();
  const int64_t step = (w.N + pieces - 1) / pieces;
  SpinPool::Get().Run(pieces, [&](int p) {
    DecodeRows(w, x, M, std::min(w.N, p * step), std::min(w.N, (p + 1) * step), y);
  });
}

// --- Dequantized panels through sgemm ----------------------------------------------------------------

// Row n of W, inputs [k0, k1), as f32 into out: value * scale + min, what llama_jax.quant.dequantize
// computes, bit for bit (the products by a scale are exact, one rounding at the add), 8 at a time
// as the decode kernels expand them. k0 and k1 are multiples of 32, and of G for int4. s: room for
// the row's scales.
void DequantizeRow(const QWeight& w, int64_t n, int64_t k0, int64_t k1, float* s, float* out) {
  const uint8_t* row = w.Row(n);
  switch (w.format) {
    case Format::kInt8:
      RowScales(w, n, s);
      for (int64_t k = k0; k < k1;) {  // group by group: G is 32, a multiple of it, or K
        const int64_t g = k / w.G, end = std::min(k1, (g + 1) * w.G);
        const __m256 d = _mm256_set1_ps(s[g]);
        for (; k < end; k += 8) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
          _mm256_storeu_ps(out + k - k0, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d));
        }
      }
      return;
    case Format::kInt4: {
      const __m256i nibble = _mm256_set1_epi32(0x0F);
      const int64_t half = w.G / 2;
      for (int64_t g = k0 / w.G; g < k1 / w.G; ++g) {
        const uint8_t* p = row + g * half;
        float* o = out + g * w.G - k0;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(w.Scales16(n)[g])), m = _mm256_set1_ps(w.Offset(n, g));
        for (int64_t j = 0; j < half; j += 8) {  // byte j: input j (low nibble) and j + G/2 (high)
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
          _mm256_storeu_ps(o + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nibble)), d, m));
          _mm256_storeu_ps(o + j + half, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), d, m));
        }
      }
      return;
    }
    case Format::kFp8: {
      RowScales(w, n, s);
      const __m256 scale = _mm256_set1_ps(s[0] * kFp8Unscale);
      for (int64_t k = k0; k < k1; k += 16) {
        __m256 lo, hi;
        Fp8ToF32(row + k, lo, hi);
        _mm256_storeu_ps(out + k - k0, _mm256_mul_ps(lo, scale));
        _mm256_storeu_ps(out + k - k0 + 8, _mm256_mul_ps(hi, scale));
      }
      return;
    }
  }
}

// y [M, N] = x [M, K] @ W^T, panels of output rows; or, transposed, y [M, K] = x [M, N] @ W, panels
// of inputs (each panel writes its own columns of y, so no two work items share an output).
void Panels(ffi::ThreadPool& pool, const QWeight& w, const float* x, int64_t M, bool transposed, float* y) {
  const int64_t align = w.format == Format::kInt4 ? w.G : 32;
  const int64_t width = transposed ? std::max(align, kPanelFloats / w.N / align * align)
                                   : std::max<int64_t>(16, kPanelFloats / w.K / 16 * 16);
  const int64_t extent = transposed ? w.K : w.N, panels = (extent + width - 1) / width;
  ParallelFor(pool, panels, [&](int64_t i) {
    thread_local std::vector<float> buf, s;
    const int64_t lo = i * width, hi = std::min(extent, lo + width), size = hi - lo;
    buf.resize(transposed ? w.N * size : size * w.K);
    s.resize(w.groups);
    MKL_Set_Num_Threads_Local(1);  // the panels are the parallelism
    if (transposed) {
      for (int64_t n = 0; n < w.N; ++n) DequantizeRow(w, n, lo, hi, s.data(), &buf[n * size]);
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, M, size, w.N, 1.0f, x, w.N, buf.data(), size, 0.0f, y + lo, w.K);
    } else {
      for (int64_t n = lo; n < hi; ++n) DequantizeRow(w, n, 0, w.K, s.data(), &buf[(n - lo) * w.K]);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, size, w.K, 1.0f, x, w.K, buf.data(), w.K, 0.0f, y + lo, w.N);
    }
    MKL_Set_Num_Threads_Local(0);
  });
}

// --- The handler -------------------------------------------------------------------------------------

ffi::Error QLinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values, ffi::AnyBuffer scales,
                       ffi::AnyBuffer mins, ffi::ResultBuffer<ffi::F32> y, std::string_view format,
                       int64_t group_size, bool transposed) {
  QWeight w{};
  ffi::DataType want;
  if (format == "int8") {
    w.format = Format::kInt8, want = ffi::DataType::S8;
  } else if (format == "int4") {
    w.format = Format::kInt4, want = ffi::DataType::U8;
  } else if (format == "fp8") {
    w.format = Format::kFp8, want = ffi::DataType::F8E4M3FN;
  } else {
    return ffi::Error::InvalidArgument("cpu qlinear: format must be int8, int4 or fp8");
  }
  const auto vd = values.dimensions(), sd = scales.dimensions(), xd = x.dimensions();
  if (values.element_type() != want || vd.size() != 2)
    return ffi::Error::InvalidArgument("cpu qlinear: values must be 2-D int8 (int8), uint8 (int4) or f8e4m3fn (fp8)");
  w.values = static_cast<const uint8_t*>(values.untyped_data());
  w.N = vd[0], w.row_bytes = vd[1];
  w.K = w.format == Format::kInt4 ? 2 * vd[1] : vd[1];
  w.G = group_size > 0 ? group_size : w.K;
  // Whole 32-byte chunks of nibbles per row (int4), 16 bytes of fp8 at a time, one scale per row
  // for fp8.
  if (w.K % (w.format == Format::kInt4 ? 64 : 32) || w.G % 32 || w.K % w.G ||
      (w.format == Format::kFp8 && w.G != w.K))
    return ffi::Error::InvalidArgument("cpu qlinear: unsupported input size or group size (cpu_kernels.quant.supports)");
  w.groups = w.K / w.G;
  const bool int4 = w.format == Format::kInt4;
  auto type_ok = [&](ffi::AnyBuffer b) {  // int4: f16 (QArray's and GGUF's); int8, fp8: f16 or f32
    return b.element_type() == ffi::DataType::F16 || (!int4 && b.element_type() == ffi::DataType::F32);
  };
  if (!type_ok(scales) || sd.size() != 2 || sd[0] != w.N || sd[1] != w.groups)
    return ffi::Error::InvalidArgument("cpu qlinear: scales must be [N, K / group_size], f16 (int4) or f16 / f32");
  w.scales = scales.untyped_data(), w.scales_f16 = scales.element_type() == ffi::DataType::F16;
  if (mins.element_count() > 0) {
    const auto md = mins.dimensions();
    if (!int4 || mins.element_type() != ffi::DataType::F16 || md.size() != 2 || md[0] != w.N || md[1] != w.groups)
      return ffi::Error::InvalidArgument("cpu qlinear: mins are int4's, f16 like its scales");
    w.mins = static_cast<const uint16_t*>(mins.untyped_data());
  }
  if (xd.size() != 2 || xd[1] != (transposed ? w.N : w.K))
    return ffi::Error::InvalidArgument("cpu qlinear: x must be [M, K] ([M, N] transposed)");
  const int64_t M = xd[0];
  if (M == 0) return ffi::Error::Success();
  if (w.N == 0) {  // empty sums
    std::fill_n(y->typed_data(), y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  if (transposed || M >= kGemmRows)
    Panels(pool, w, x.typed_data(), M, transposed, y->typed_data());
  else
    Decode(w, x.typed_data(), M, y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxQLinear, QLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // values
                                  .Arg<ffi::AnyBuffer>()         // scales
                                  .Arg<ffi::AnyBuffer>()         // mins (empty when none)
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("format")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("transposed"));
