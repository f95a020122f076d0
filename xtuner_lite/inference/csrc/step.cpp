// The elementwise work and the attention of a decode step, one call each for its few rows: the
// same arithmetic as separate torch ops costs more in their dispatch than in the work, and
// torch's flash attention is made for long queries, not one token a row reading its KV cache.
// Plain loops over fixed-width lanes, which the compiler vectorizes for the build's ISA.
#include "step.h"

#include "amx.h"
#include "values.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kWidth = 16;  // partial sums of a dot product: one AVX-512 register of fp32
constexpr int64_t kAhead = 8;   // columns of the KV cache prefetched ahead of the one read

using xtuner_lite::bits_float;
using xtuner_lite::float_bits;
using xtuner_lite::round_to;
using xtuner_lite::widen;

// exp(x), Cephes' single-precision polynomial (within 2 ulp of the exact value): a loop of it
// vectorizes, where std::exp is one call per value
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float shifted = x * 1.44269504088896341f + 12582912.f;  // 1.5·2²³: round to nearest
  const float n = shifted - 12582912.f;
  const int32_t e = static_cast<int32_t>(float_bits(shifted) - float_bits(12582912.f));
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return p * bits_float(static_cast<uint32_t>(e + 127) << 23);
}

// x[0] + … + x[n-1] in kWidth lanes, halved at the end (a sum in order is a chain of dependent
// adds, as long as the row)
inline float lane_sum(const float* x, int64_t n) {
  float part[kWidth] = {};
  const int64_t whole = n - n % kWidth;
  for (int64_t i = 0; i < whole; i += kWidth)
    for (int64_t l = 0; l < kWidth; ++l) part[l] += x[i + l];
  for (int64_t i = whole; i < n; ++i) part[i - whole] += x[i];
  for (int64_t width = kWidth / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// A row of n scores, its maximum `top`, made exp(score - top); returns 1 / their sum (the
// softmax's weights are the row times it)
inline float softmax_weights(float* row, int64_t n, float top) {
  for (int64_t i = 0; i < n; ++i) row[i] = vexp(row[i] - top);
  return 1.f / lane_sum(row, n);
}

// every cache line of a cached key or value of D
template <typename T>
inline void fetch_column(const T* column, int64_t D) {
  for (int64_t l = 0; l < D * static_cast<int64_t>(sizeof(T)) / 64; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(column) + 64 * l, _MM_HINT_T0);
}

// The cache is read from memory once: the key of column real[i + kAhead] and the value of
// column real[i] (read after every score) fetched ahead of their reads
template <typename T>
inline void fetch_ahead(const T* keys, const T* values, const int64_t* real, int64_t i,
                        int64_t n, int64_t D) {
  if (i + kAhead >= n) return;
  fetch_column(keys + real[i + kAhead] * D, D);
  fetch_column(values + real[i] * D, D);
}

// four scores stored at `at`, `top` raised to the largest of them
inline void keep_four(__m128 four, float* at, float& top) {
  _mm_storeu_ps(at, four);
  alignas(16) float got[4];
  _mm_store_ps(got, four);
  for (int c = 0; c < 4; ++c) top = got[c] > top ? got[c] : top;
}

#if defined(__AVX512F__)
constexpr bool kHeadKernel = true;  // heads<V, G> below serve head dims of 16·V, V in {4, 8}

// widen(round_to<uint16_t>(x)) of 16 values: bf16's rounding to nearest even, as torch's
inline __m512 bf16_round(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
  const __m512i high = _mm512_and_si512(up, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  const __mmask16 ordered = _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q);
  const __m512i nan = _mm512_set1_epi32(0x7fc00000);
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(ordered, nan, high));
}

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(bf16_round(x)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}

// 16 values of T as fp32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bf16 is fp32's upper half
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// A cached key or value of D = 16·V as V fp32 registers. bf16 in its pairs' order: each 32
// values as their even and their odd ones (one shift or mask of a 32-value load each, where
// widening in order costs two steps per 16); the query is laid out in the same order, which
// a dot product does not see, and the weighted values are put back in order once at the end.
template <int V>
inline void load_column(const float* p, __m512* out) {
  for (int v = 0; v < V; ++v) out[v] = _mm512_loadu_ps(p + v * kWidth);
}
template <int V>
inline void load_column(const uint16_t* p, __m512* out) {
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int v = 0; v < V; v += 2) {
    const __m512i pairs = _mm512_loadu_si512(p + v * kWidth);
    out[v] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    out[v + 1] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
  }
}

// D fp32 values in load_column<V, T>'s order
template <int V, typename T>
inline void in_column_order(const float* x, __m512* out) {
  if constexpr (std::is_same_v<T, float>) {
    load_column<V>(x, out);
  } else {
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int v = 0; v < V; v += 2) {
      const __m512 a = _mm512_loadu_ps(x + v * kWidth);
      const __m512 b = _mm512_loadu_ps(x + (v + 1) * kWidth);
      out[v] = _mm512_permutex2var_ps(a, even, b);
      out[v + 1] = _mm512_permutex2var_ps(a, odd, b);
    }
  }
}

// x (in load_column<V, T>'s order) · scale, stored in order as T
template <int V, typename T>
inline void store_in_order(const __m512* x, __m512 scale, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    for (int v = 0; v < V; ++v) store16(out + v * kWidth, _mm512_mul_ps(x[v], scale));
  } else {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    for (int v = 0; v < V; v += 2) {
      const __m512 even = _mm512_mul_ps(x[v], scale), odd = _mm512_mul_ps(x[v + 1], scale);
      store16(out + v * kWidth, _mm512_permutex2var_ps(even, low, odd));
      store16(out + (v + 1) * kWidth, _mm512_permutex2var_ps(even, high, odd));
    }
  }
}

// the lane sums of a, b, c and d
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto halves = [](__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  };
  const __m256 ab = _mm256_hadd_ps(halves(a), halves(b));
  const __m256 cd = _mm256_hadd_ps(halves(c), halves(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: a, b, c, d's partial sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// The scores of G query heads over 16 adjacent cached bf16 keys as one AMX tile product: the
// keys are the A tile as they lie in the cache, the heads the B tile's columns (the rest zero).
template <int G, int64_t D>
struct TileScores {
  static constexpr int64_t kRows = 16;
  alignas(64) uint16_t heads[D / 2 * kRows * 2];  // (D/2, 16, 2): pairs of D, for 16 heads
  alignas(64) float out[kRows * kRows];           // (16 keys, 16 heads)

  explicit TileScores(const float* query) {  // query: G heads of D, bf16 values as fp32
    std::memset(heads, 0, sizeof heads);
    for (int j = 0; j < G; ++j)
      for (int64_t d = 0; d < D; ++d) {  // exact: the values are bf16's
        const uint32_t bits = float_bits(query[j * D + d]);
        heads[(d / 2 * kRows + j) * 2 + d % 2] = static_cast<uint16_t>(bits >> 16);
      }
  }
  // scores[j·n + i + r] = scale · key[r]·query[j], top[j] their maximum so far
  void run(const uint16_t* keys, float scale, float* scores, int64_t n, int64_t i, float* top) {
    amx_product16(keys, D, heads, D, out);
    for (int j = 0; j < G; ++j)
      for (int64_t r = 0; r < kRows; ++r) {
        const float score = out[r * kRows + j] * scale;
        scores[j * n + i + r] = score;
        top[j] = score > top[j] ? score : top[j];
      }
  }
};

// G query heads (D = 16·V each, fp32 in `query`) of one kv head over its n cached columns:
// each column's key and value read once for all G, scores, softmax and the weighted values
// accumulated in registers (G·V of them: at most 16); out: the G heads' outputs in T. With
// `tiles` (bf16, AMX ready) the scores of 16 adjacent columns are one tile product.
template <int V, int G, typename T>
void heads(const float* query, const T* keys, const T* values, const int64_t* real, int64_t n,
           float scale, float* scores, T* out, bool tiles) {
  constexpr int64_t D = V * kWidth;
  __m512 q[G][V];
  for (int j = 0; j < G; ++j) in_column_order<V, T>(query + j * D, q[j]);
  float top[G];
  for (int j = 0; j < G; ++j) top[j] = -std::numeric_limits<float>::infinity();
  // columns four at a time where the registers allow: their sums reduced together (reducing
  // each column's 16 lanes alone costs more than its products)
  constexpr int64_t kFour = G * V + V + 4 * G <= 30 ? 4 : 1;
  const auto prefetch = [&](int64_t i) { fetch_ahead(keys, values, real, i, n, D); };
  const auto column = [&](int64_t i, __m512* sums) {  // G partial sums of column real[i]
    __m512 key[V];
    load_column<V>(keys + real[i] * D, key);
    for (int j = 0; j < G; ++j) {
      sums[j] = _mm512_mul_ps(q[j][0], key[0]);
      for (int v = 1; v < V; ++v) sums[j] = _mm512_fmadd_ps(q[j][v], key[v], sums[j]);
    }
  };
  const auto four = [&](int64_t i) {
    __m512 sums[4][G];
    for (int c = 0; c < 4; ++c) {
      prefetch(i + c);
      column(i + c, sums[c]);
    }
    for (int j = 0; j < G; ++j) {
      const __m128 sums4 = reduce4(sums[0][j], sums[1][j], sums[2][j], sums[3][j]);
      keep_four(_mm_mul_ps(sums4, _mm_set1_ps(scale)), scores + j * n + i, top[j]);
    }
  };
  const auto one = [&](int64_t i) {
    prefetch(i);
    __m512 sums[G];
    column(i, sums);
    for (int j = 0; j < G; ++j) {
      const float score = _mm512_reduce_add_ps(sums[j]) * scale;
      scores[j * n + i] = score;
      top[j] = score > top[j] ? score : top[j];
    }
  };
  int64_t i = 0;
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (tiles) {
      TileScores<G, D> tile(query);
      constexpr int64_t rows = TileScores<G, D>::kRows;
      while (i + rows <= n) {
        if (real[i + rows - 1] != real[i] + rows - 1) {  // a hole: these columns one by one
          one(i++);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r) {  // this chunk's values, the next chunk's keys
          fetch_column(values + (real[i] + r) * D, D);
          if (i + rows + r < n) fetch_column(keys + real[i + rows + r] * D, D);
        }
        tile.run(keys + real[i] * D, scale, scores, n, i, top);
        i += rows;
      }
    }
  }
  if constexpr (kFour == 4)
    for (; i + 4 <= n; i += 4) four(i);
  for (; i < n; ++i) one(i);
  float inverse[G];
  for (int j = 0; j < G; ++j) inverse[j] = softmax_weights(scores + j * n, n, top[j]);
  __m512 acc[G][V];
  for (int j = 0; j < G; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    __m512 value[V];
    load_column<V>(values + real[i] * D, value);
    for (int j = 0; j < G; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * n + i]);
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(p, value[v], acc[j][v]);
    }
  }
  for (int j = 0; j < G; ++j) store_in_order<V>(acc[j], _mm512_set1_ps(inverse[j]), out + j * D);
}

// heads<V, G> over `count` query heads, in chunks of as many as fit the registers
template <int V, typename T>
void all_heads(const float* query, const T* keys, const T* values, const int64_t* real,
               int64_t n, float scale, float* scores, T* out, int64_t count, bool tiles) {
  constexpr int64_t D = V * kWidth, most = 16 / V;
  for (int64_t j = 0; j < count; j += most) {
    const int64_t chunk = std::min(most, count - j);
    const float* qj = query + j * D;
    T* oj = out + j * D;
    if (chunk == 1) heads<V, 1>(qj, keys, values, real, n, scale, scores, oj, tiles);
    if constexpr (most >= 2)
      if (chunk == 2) heads<V, 2>(qj, keys, values, real, n, scale, scores, oj, tiles);
    if constexpr (most >= 4) {
      if (chunk == 3) heads<V, 3>(qj, keys, values, real, n, scale, scores, oj, tiles);
      if (chunk == 4) heads<V, 4>(qj, keys, values, real, n, scale, scores, oj, tiles);
    }
  }
}
#elif defined(__AVX2__)
constexpr bool kHeadKernel = true;  // heads8<U, G> below serve head dims of 8·U, U in {8, 16}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 is fp32's upper half
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// bf16_round of 8 values
inline __m256 bf16_round8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
  const __m256i high = _mm256_and_si256(up, _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q));
  return _mm256_castsi256_ps(_mm256_blendv_epi8(_mm256_set1_epi32(0x7fc00000), high, ordered));
}

inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(uint16_t* p, __m256 x) {
  const __m256i kept = _mm256_srli_epi32(_mm256_castps_si256(bf16_round8(x)), 16);
  // packing works per 128-bit half: the two halves' four values each, then put side by side
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(kept, kept), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// the lane sums of a, b, c and d
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// heads<V, G>'s work on AVX2's 16 registers of 8 lanes (D = 8·U): the query is read from the
// cache, not held, and the weighted values are summed 16 of D at a time, the row's values read
// again from the cache for each 16.
template <int U, int G, typename T>
void heads8(const float* query, const T* keys, const T* values, const int64_t* real, int64_t n,
            float scale, float* scores, T* out) {
  constexpr int64_t D = U * 8;
  float top[G];
  for (int j = 0; j < G; ++j) top[j] = -std::numeric_limits<float>::infinity();
  const auto prefetch = [&](int64_t i) { fetch_ahead(keys, values, real, i, n, D); };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {  // four columns' sums reduced together
    __m256 sums[4][G];
    for (int c = 0; c < 4; ++c) {
      prefetch(i + c);
      for (int j = 0; j < G; ++j) sums[c][j] = _mm256_setzero_ps();
      const T* key = keys + real[i + c] * D;
      for (int u = 0; u < U; ++u) {
        const __m256 k = load8(key + u * 8);
        for (int j = 0; j < G; ++j)
          sums[c][j] = _mm256_fmadd_ps(_mm256_loadu_ps(query + j * D + u * 8), k, sums[c][j]);
      }
    }
    for (int j = 0; j < G; ++j) {
      const __m128 sums4 = reduce4(sums[0][j], sums[1][j], sums[2][j], sums[3][j]);
      keep_four(_mm_mul_ps(sums4, _mm_set1_ps(scale)), scores + j * n + i, top[j]);
    }
  }
  for (; i < n; ++i) {
    prefetch(i);
    const T* key = keys + real[i] * D;
    for (int j = 0; j < G; ++j) {
      __m256 sum = _mm256_setzero_ps();
      for (int u = 0; u < U; ++u)
        sum = _mm256_fmadd_ps(_mm256_loadu_ps(query + j * D + u * 8), load8(key + u * 8), sum);
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 pair = _mm_hadd_ps(half, half);
      const float score = _mm_cvtss_f32(_mm_hadd_ps(pair, pair)) * scale;
      scores[j * n + i] = score;
      top[j] = score > top[j] ? score : top[j];
    }
  }
  float inverse[G];
  for (int j = 0; j < G; ++j) inverse[j] = softmax_weights(scores + j * n, n, top[j]);
  for (int u = 0; u < U; u += 2) {  // 16 of D at a time: 2·G accumulators
    __m256 acc[2][G];
    for (int j = 0; j < G; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; ++c) {
      const T* value = values + real[c] * D + u * 8;
      const __m256 lo = load8(value), hi = load8(value + 8);
      for (int j = 0; j < G; ++j) {
        const __m256 p = _mm256_broadcast_ss(scores + j * n + c);
        acc[0][j] = _mm256_fmadd_ps(p, lo, acc[0][j]);
        acc[1][j] = _mm256_fmadd_ps(p, hi, acc[1][j]);
      }
    }
    for (int j = 0; j < G; ++j) {
      const __m256 scaled = _mm256_set1_ps(inverse[j]);
      store8(out + j * D + u * 8, _mm256_mul_ps(acc[0][j], scaled));
      store8(out + j * D + u * 8 + 8, _mm256_mul_ps(acc[1][j], scaled));
    }
  }
}

// heads8 over `count` query heads, three at a time (4·3 sums and a key fill the registers)
template <int V, typename T>
void all_heads(const float* query, const T* keys, const T* values, const int64_t* real,
               int64_t n, float scale, float* scores, T* out, int64_t count, bool) {
  constexpr int64_t D = V * kWidth, U = D / 8;
  for (int64_t j = 0; j < count; j += 3) {
    const int64_t chunk = std::min<int64_t>(3, count - j);
    const float* qj = query + j * D;
    T* oj = out + j * D;
    if (chunk == 1) heads8<U, 1>(qj, keys, values, real, n, scale, scores, oj);
    if (chunk == 2) heads8<U, 2>(qj, keys, values, real, n, scale, scores, oj);
    if (chunk == 3) heads8<U, 3>(qj, keys, values, real, n, scale, scores, oj);
  }
}
#else
constexpr bool kHeadKernel = false;

template <int V, typename T>
void all_heads(const float*, const T*, const T*, const int64_t*, int64_t, float, float*, T*,
               int64_t, bool) {}
#endif

// 16 fp32 values in registers — one AVX-512 register, or two of AVX2 — for the elementwise
// loops below: written once for both builds, the same operations in the same order as the plain
// loops (whose bf16 conversions the compiler leaves partly scalar).
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
struct Lanes {
  __m512 v;
};
inline Lanes lanes(float x) { return {_mm512_set1_ps(x)}; }
template <typename T>
inline Lanes load_lanes(const T* p) { return {load16(p)}; }
template <typename T>
inline void store_lanes(T* p, Lanes x) { store16(p, x.v); }
inline void spill(Lanes x, float* out) { _mm512_storeu_ps(out, x.v); }
inline Lanes operator+(Lanes a, Lanes b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes operator-(Lanes a, Lanes b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Lanes operator*(Lanes a, Lanes b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Lanes operator/(Lanes a, Lanes b) { return {_mm512_div_ps(a.v, b.v)}; }
// max's second operand is its result where one is NaN: a NaN stays NaN, as in vexp
inline Lanes clamp(Lanes x, float low, float high) {
  return {_mm512_min_ps(_mm512_set1_ps(high), _mm512_max_ps(_mm512_set1_ps(low), x.v))};
}
// 2^(bits(shifted) - bits(base)), the exponent vexp builds
inline Lanes power_of_two(Lanes shifted, float base) {
  const __m512i e = _mm512_sub_epi32(_mm512_castps_si512(shifted.v),
                                     _mm512_castps_si512(_mm512_set1_ps(base)));
  const __m512i biased = _mm512_add_epi32(e, _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(biased, 23))};
}
inline Lanes bf16_rounded(Lanes x) { return {bf16_round(x.v)}; }
#else
struct Lanes {
  __m256 lo, hi;
};
inline Lanes lanes(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
template <typename T>
inline Lanes load_lanes(const T* p) { return {load8(p), load8(p + 8)}; }
template <typename T>
inline void store_lanes(T* p, Lanes x) {
  store8(p, x.lo);
  store8(p + 8, x.hi);
}
inline void spill(Lanes x, float* out) {
  _mm256_storeu_ps(out, x.lo);
  _mm256_storeu_ps(out + 8, x.hi);
}
inline Lanes operator+(Lanes a, Lanes b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline Lanes operator-(Lanes a, Lanes b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline Lanes operator*(Lanes a, Lanes b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline Lanes operator/(Lanes a, Lanes b) {
  return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
}
inline Lanes clamp(Lanes x, float low, float high) {  // NaN kept, as above
  const __m256 l = _mm256_set1_ps(low), h = _mm256_set1_ps(high);
  return {_mm256_min_ps(h, _mm256_max_ps(l, x.lo)), _mm256_min_ps(h, _mm256_max_ps(l, x.hi))};
}
inline Lanes power_of_two(Lanes shifted, float base) {
  const __m256i b = _mm256_castps_si256(_mm256_set1_ps(base)), bias = _mm256_set1_epi32(127);
  const auto half = [&](__m256 s) {
    const __m256i e = _mm256_sub_epi32(_mm256_castps_si256(s), b);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, bias), 23));
  };
  return {half(shifted.lo), half(shifted.hi)};
}
inline Lanes bf16_rounded(Lanes x) { return {bf16_round8(x.lo), bf16_round8(x.hi)}; }
#endif

// widen(round_to<T>(x)) of 16 values
template <typename T>
inline Lanes rounded(Lanes x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else
    return bf16_rounded(x);
}

// vexp of 16 values: its operations in its order (so its bits)
inline Lanes vexp(Lanes x) {
  x = clamp(x, -87.3f, 88.7f);
  const Lanes shifted = x * lanes(1.44269504088896341f) + lanes(12582912.f);
  const Lanes n = shifted - lanes(12582912.f);
  Lanes r = x - n * lanes(0.693359375f);
  r = r - n * lanes(-2.12194440e-4f);
  Lanes p = lanes(1.9875691500e-4f);
  for (const float k : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f})
    p = p * r + lanes(k);
  p = p * (r * r) + r + lanes(1.f);
  return p * power_of_two(shifted, 12582912.f);
}
#endif

// whether a head kernel above serves head dim D (else the plain loops of Attention::run)
constexpr bool head_kernel(int64_t D) { return kHeadKernel && (D == 64 || D == 128); }

template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  float part[kWidth] = {};
  for (int64_t d = 0; d < D; d += kWidth)
    for (int64_t l = 0; l < kWidth; ++l) part[l] += q[d + l] * widen(k[d + l]);
  // halving, not in order: a chain of 16 dependent adds would cost more than the products
  for (int64_t width = kWidth / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// transformers' rotate-half rotary embedding of one vector of D, each product and the sum
// rounded to T as torch's separate ops round them
template <typename T>
void rotate(const T* in, const T* c, const T* s, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {  // rotate-half's first half reads the negated second
    const T a = round_to<T>(widen(in[i]) * widen(c[i]));
    const T b = round_to<T>(-widen(in[i + half]) * widen(s[i]));
    out[i] = round_to<T>(widen(a) + widen(b));
  }
  for (int64_t i = half; i < D; ++i) {
    const T a = round_to<T>(widen(in[i]) * widen(c[i]));
    const T b = round_to<T>(widen(in[i - half]) * widen(s[i]));
    out[i] = round_to<T>(widen(a) + widen(b));
  }
}

// transformers' RMSNorm of one row: x · rsqrt(mean(x²) + eps) in fp32, rounded to T, times
// weight. The AVX-512 build's vector loops are these loops' operations in the same order (the
// compiler leaves the bf16 conversions of the plain loops partly scalar).
template <typename T>
void rms_row(const T* row, const T* weight, T* y, int64_t K, float eps) {
  float part[kWidth] = {};  // lanes of the sum of squares, as a vectorized reduction keeps them
  const int64_t whole = K - K % kWidth;
  int64_t done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  Lanes squares = lanes(0.f);
  for (; done < whole; done += kWidth) {
    const Lanes x = load_lanes(row + done);
    squares = squares + x * x;
  }
  spill(squares, part);
#endif
  for (int64_t k = done; k < whole; k += kWidth)
    for (int64_t l = 0; l < kWidth; ++l) part[l] += widen(row[k + l]) * widen(row[k + l]);
  for (int64_t k = whole; k < K; ++k) part[0] += widen(row[k]) * widen(row[k]);
  for (int64_t width = kWidth / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  const float scale = 1.f / std::sqrt(part[0] / static_cast<float>(K) + eps);
  done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; done < whole; done += kWidth) {
    const Lanes normed = rounded<T>(load_lanes(row + done) * lanes(scale));
    store_lanes(y + done, load_lanes(weight + done) * normed);
  }
#endif
  for (int64_t k = done; k < K; ++k) {
    const T normed = round_to<T>(widen(row[k]) * scale);
    y[k] = round_to<T>(widen(weight[k]) * widen(normed));
  }
}

// y = silu(gate) · up, each rounded to T as torch's ops round. The plain loops go in chunks
// through an fp32 buffer: a loop from bf16 through the exponential's integer work back to bf16
// does not vectorize (the AVX-512 build's vector loop is the same operations)
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* y, int64_t N) {
  int64_t done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; done + kWidth <= N; done += kWidth) {
    const Lanes g = load_lanes(gate + done);
    const Lanes act = g / (lanes(1.f) + vexp(lanes(0.f) - g));
    store_lanes(y + done, rounded<T>(act) * load_lanes(up + done));
  }
#endif
  constexpr int64_t kChunk = 256;
  float act[kChunk];
  for (int64_t n0 = done; n0 < N; n0 += kChunk) {
    const int64_t n1 = std::min(N, n0 + kChunk);
    for (int64_t n = n0; n < n1; ++n) act[n - n0] = widen(gate[n]);
    for (int64_t i = 0; i < n1 - n0; ++i) act[i] = act[i] / (1.f + vexp(-act[i]));
    for (int64_t n = n0; n < n1; ++n)
      y[n] = round_to<T>(widen(round_to<T>(act[n - n0])) * widen(up[n]));
  }
}

// y = a + b, rounded to T as torch's add rounds
template <typename T>
void add(const T* a, const T* b, T* y, int64_t K) {
  int64_t done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; done + kWidth <= K; done += kWidth)
    store_lanes(y + done, load_lanes(a + done) + load_lanes(b + done));
#endif
  for (int64_t k = done; k < K; ++k) y[k] = round_to<T>(widen(a[k]) + widen(b[k]));
}

// f(T{}) for the value type T of the dtype our ops take (check_dtype first)
template <typename F>
void by_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat)
    f(float{});
  else
    f(uint16_t{});
}

template <typename T>
T* ptr(const torch::Tensor& x) {
  return static_cast<T*>(x.data_ptr());
}

void check_dtype(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": fp32 or bf16");
}

void check_rows(const torch::Tensor& x, int64_t M, int64_t N, at::ScalarType dtype,
                const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == M && x.size(1) == N && x.stride(1) == 1 &&
                  x.scalar_type() == dtype,
              what, ": (", M, ", ", N, ") with unit column stride, of one dtype");
}

// What one (row, kv head) of a decode step's attention reads and writes.
template <typename T>
struct Attention {
  const T *q, *k, *v, *cos, *sin;
  int64_t ldq, ldk, ldv;
  T *keys, *values, *out;  // cache buffers (M, G, capacity, D); out (M, H·D)
  const int64_t *real, *count;  // each row's real columns (M, length + 1; count[m] of them)
  int64_t G, groups, D, capacity, length;
  float scale;
  bool tiles;  // bf16 scores of adjacent keys as AMX tile products (the tiles configured)

  void run(int64_t m, int64_t g, std::vector<float>& scratch) const {
    const int64_t columns = length + 1;
    const int64_t base = (m * G + g) * capacity * D;
    T* key = keys + base + length * D;
    rotate(k + m * ldk + g * D, cos + m * D, sin + m * D, key, D);
    std::memcpy(values + base + length * D, v + m * ldv + g * D, D * sizeof(T));
    const int64_t* cols = real + m * columns;  // the row's real columns
    const int64_t n = count[m];
    scratch.resize(static_cast<size_t>(groups * (2 * n + 2 * D)));
    float* query = scratch.data();  // (groups, D): the rotated query heads, as fp32
    float* acc = query + groups * D;  // (groups, D)
    float* scores = acc + groups * D;  // (groups, n)
    for (int64_t j = 0; j < groups; ++j) {
      T rotated[256];
      const int64_t head = g * groups + j;
      rotate(q + m * ldq + head * D, cos + m * D, sin + m * D, rotated, D);
      for (int64_t d = 0; d < D; ++d) query[j * D + d] = widen(rotated[d]);
    }
    if (head_kernel(D)) {
      const auto kernel = D == 64 ? all_heads<4, T> : all_heads<8, T>;
      T* o = out + m * (G * groups * D) + g * groups * D;
      kernel(query, keys + base, values + base, cols, n, scale, scores, o, groups, tiles);
      return;
    }
    for (int64_t j = 0; j < groups; ++j) {
      const float* qj = query + j * D;
      T* o = out + m * (G * groups * D) + (g * groups + j) * D;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        scores[i] = dot(qj, keys + base + cols[i] * D, D) * scale;
        top = scores[i] > top ? scores[i] : top;
      }
      const float inverse = softmax_weights(scores, n, top);
      float* a = acc + j * D;
      for (int64_t d = 0; d < D; ++d) a[d] = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        const T* value = values + base + cols[i] * D;
        const float p = scores[i];
        for (int64_t d = 0; d < D; ++d) a[d] += p * widen(value[d]);
      }
      for (int64_t d = 0; d < D; ++d) o[d] = round_to<T>(a[d] * inverse);
    }
  }
};

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
                  weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "skinny.rms_norm: a contiguous (M, K) and a weight of K, one dtype");
  check_dtype(x, "skinny.rms_norm");
  auto y = torch::empty_like(x);
  const int64_t K = x.size(1);
  by_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    for (int64_t m = 0; m < x.size(0); ++m)
      rms_row(ptr<scalar_t>(x) + m * K, ptr<scalar_t>(weight),
              ptr<scalar_t>(y) + m * K, K, static_cast<float>(eps));
  });
  return y;
}

std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta,
                                        const torch::Tensor& weight, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && weight.is_contiguous() &&
                  weight.numel() == h.size(1) && weight.scalar_type() == h.scalar_type(),
              "skinny.add_rms_norm: a contiguous (M, K) and a weight of K, one dtype");
  check_dtype(h, "skinny.add_rms_norm");
  const int64_t M = h.size(0), K = h.size(1);
  check_rows(delta, M, K, h.scalar_type(), "skinny.add_rms_norm's delta");
  auto sum = torch::empty_like(h), y = torch::empty_like(h);
  by_dtype(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* a = ptr<scalar_t>(h);
    const scalar_t* b = ptr<scalar_t>(delta);
    scalar_t* s = ptr<scalar_t>(sum);
    const scalar_t* w = ptr<scalar_t>(weight);
    scalar_t* normed = ptr<scalar_t>(y);
    const int64_t ldb = delta.stride(0);
    for (int64_t m = 0; m < M; ++m) {
      add(a + m * K, b + m * ldb, s + m * K, K);
      rms_row(s + m * K, w, normed + m * K, K, static_cast<float>(eps));
    }
  });
  return {sum, y};
}

torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     int64_t heads) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % heads == 0,
              "skinny.rotary: x (M, heads·D), unit column stride");
  const int64_t M = x.size(0), D = x.size(1) / heads;
  TORCH_CHECK(D % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == M * D &&
                  sin.numel() == M * D && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "skinny.rotary: cos and sin (M, D) of x's dtype");
  check_dtype(x, "skinny.rotary");
  auto y = torch::empty({M, heads * D}, x.options());
  by_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* in = ptr<scalar_t>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t h = 0; h < heads; ++h)
        rotate(in + m * x.stride(0) + h * D, ptr<scalar_t>(cos) + m * D,
               ptr<scalar_t>(sin) + m * D, ptr<scalar_t>(y) + (m * heads + h) * D, D);
  });
  return y;
}

torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2, "skinny.silu_mul: gate (M, N)");
  const int64_t M = gate.size(0), N = gate.size(1);
  check_dtype(gate, "skinny.silu_mul");
  check_rows(gate, M, N, gate.scalar_type(), "skinny.silu_mul's gate");
  check_rows(up, M, N, gate.scalar_type(), "skinny.silu_mul's up");
  auto y = torch::empty({M, N}, gate.options());
  by_dtype(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* g = ptr<scalar_t>(gate) + m * gate.stride(0);
        const scalar_t* u = ptr<scalar_t>(up) + m * up.stride(0);
        scalar_t* o = ptr<scalar_t>(y) + m * N;
        silu_mul_row(g, u, o, N);
      }
    });
  });
  return y;
}

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                     torch::Tensor values, int64_t length, const torch::Tensor& mask,
                     double scale, bool tiles) {
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type(),
              "skinny.attend: key and value buffers (M, kv heads, capacity, D), contiguous");
  check_dtype(keys, "skinny.attend");
  const int64_t M = keys.size(0), G = keys.size(1), capacity = keys.size(2), D = keys.size(3);
  TORCH_CHECK(D % kWidth == 0 && D <= 256, "skinny.attend: a head dim that is a multiple of ",
              kWidth, " up to 256, not ", D);
  TORCH_CHECK(length >= 0 && length < capacity, "skinny.attend: column ", length,
              " is past the buffers' ", capacity, " (reserve first)");
  TORCH_CHECK(q.dim() == 2 && q.size(1) % (G * D) == 0, "skinny.attend: q (M, heads·D)");
  const int64_t groups = q.size(1) / (G * D);
  const auto dtype = keys.scalar_type();
  check_rows(q, M, G * groups * D, dtype, "skinny.attend's q");
  check_rows(k, M, G * D, dtype, "skinny.attend's k");
  check_rows(v, M, G * D, dtype, "skinny.attend's v");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == M * D &&
                  sin.numel() == M * D && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype,
              "skinny.attend: cos and sin (M, D) of the cache's dtype");
  TORCH_CHECK(mask.dim() == 2 && mask.is_contiguous() && mask.size(0) == M &&
                  mask.size(1) == length + 1 && mask.scalar_type() == at::kLong,
              "skinny.attend: an int64 mask (M, length + 1)");
  auto out = torch::empty({M, G * groups * D}, q.options());
  const int64_t columns = length + 1;  // each row's real columns, found once for its kv heads
  std::vector<int64_t> real(M * columns), count(M, 0);
  const int64_t* flags = mask.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < columns; ++c)
      if (flags[m * columns + c]) real[m * columns + count[m]++] = c;
  // tile products where asked and possible: bf16, a head kernel, AMX (rows of 32 bf16)
  const bool use_tiles = tiles && dtype == at::kBFloat16 && head_kernel(D) && amx_ready();
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const Attention<scalar_t> work{ptr<scalar_t>(q),      ptr<scalar_t>(k),
                                   ptr<scalar_t>(v),      ptr<scalar_t>(cos),
                                   ptr<scalar_t>(sin),    q.stride(0),
                                   k.stride(0),           v.stride(0),
                                   ptr<scalar_t>(keys),   ptr<scalar_t>(values),
                                   ptr<scalar_t>(out),    real.data(),
                                   count.data(),          G,
                                   groups,                D,
                                   capacity,              length,
                                   static_cast<float>(scale),
                                   use_tiles};
    at::parallel_for(0, M * G, 1, [&](int64_t begin, int64_t end) {
      if (use_tiles) amx_configure();
      std::vector<float> scratch;
      for (int64_t unit = begin; unit < end; ++unit) work.run(unit / G, unit % G, scratch);
      if (use_tiles) amx_release();
    });
  });
  return out;
}
