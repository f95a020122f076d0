// Products of a few rows with a weight packed once: y = x · Wᵀ (+ bias) for decode steps.
// Why ours (inference/skinny.py): at a decode step's few rows oneDNN's packed kernels read the
// weights well below the memory's bandwidth; a register tile of rows × 16-column weight blocks,
// each block read once as one sequential, prefetched stream, reads them closer to it. Built for
// AVX-512 (a block row is one register) or, on CPUs without it, AVX2 (two registers).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "skinny.h"

#include "amx.h"
#include "layers.h"
#include "step.h"

#include <array>
#include <cmath>
#include <utility>

namespace {

constexpr int64_t kLanes = 16;  // a packed block's columns (fp32): one AVX-512 register
constexpr int64_t kAhead = 32;  // software prefetch distance, in 64-byte lines of one block

#if defined(__AVX512F__)
constexpr int kRows = 16;   // rows per register tile: 16 rows x 2 blocks = 32 accumulators
constexpr int kBlocks = 2;  // blocks per tile

// y[0:R, 0:16B] = x[0:R] · W[n0:n0+16B]ᵀ (+ bias): B consecutive blocks of the packed weight,
// a block being K lines of 16 columns (line k = W[n0:n0+16, k]), each read once as one stream
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
          const float* bias) {
  __m512 acc[B][R];
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[B];
    for (int b = 0; b < B; ++b) {
      const float* line = w + (b * K + k) * kLanes;
      wv[b] = _mm512_loadu_ps(line);
      _mm_prefetch(reinterpret_cast<const char*>(line + kAhead * kLanes), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(x[r * ldx + k]);
      for (int b = 0; b < B; ++b) acc[b][r] = _mm512_fmadd_ps(xs, wv[b], acc[b][r]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const __m512 add = bias ? _mm512_loadu_ps(bias + b * kLanes) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(y + r * ldy + b * kLanes, _mm512_add_ps(acc[b][r], add));
  }
}
#else
constexpr int kRows = 6;    // 6 rows x 2 registers = 12 accumulators of AVX2's 16 registers
constexpr int kBlocks = 1;  // a block's next 6 rows read it again, from the cache

// as above, one block, its line k in two 8-lane registers
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
          const float* bias) {
  static_assert(B == 1, "AVX2 tiles hold one block");
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* line = w + k * kLanes;
    const __m256 lo = _mm256_loadu_ps(line), hi = _mm256_loadu_ps(line + 8);
    _mm_prefetch(reinterpret_cast<const char*>(line + kAhead * kLanes), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm256_fmadd_ps(xs, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xs, hi, acc[r][1]);
    }
  }
  const __m256 add_lo = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 add_hi = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(acc[r][0], add_lo));
    _mm256_storeu_ps(y + r * ldy + 8, _mm256_add_ps(acc[r][1], add_hi));
  }
}
#endif

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*);

template <int B, int... R>
constexpr std::array<Tile, kRows> row_tiles(std::integer_sequence<int, R...>) {
  return {tile<R + 1, B>...};
}

// tiles[B - 1][R - 1]: every row count a tile takes, for each number of blocks
template <int... B>
constexpr std::array<std::array<Tile, kRows>, kBlocks> tiles(std::integer_sequence<int, B...>) {
  return {row_tiles<B + 1>(std::make_integer_sequence<int, kRows>{})...};
}

// the threads split the groups of kBlocks blocks; each group is read from memory once
void run(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
         int64_t N) {
  static constexpr auto table = tiles(std::make_integer_sequence<int, kBlocks>{});
  const int64_t blocks = N / kLanes, groups = (blocks + kBlocks - 1) / kBlocks;
  const int64_t block = K * kLanes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b0 = g * kBlocks, nb = std::min<int64_t>(kBlocks, blocks - b0);
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, M - r0);
        table[nb - 1][rows - 1](x + r0 * K, K, w + b0 * block, K, y + r0 * N + b0 * kLanes, N,
                                bias ? bias + b0 * kLanes : nullptr);
      }
    }
  });
}

}  // namespace

// weight (N, K) -> its blocks (N/16, K, 16)
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % kLanes == 0 &&
                  weight.scalar_type() == at::kFloat,
              "skinny.pack: an fp32 (N, K) weight with N % 16 == 0");
  const int64_t N = weight.size(0), K = weight.size(1);
  return weight.reshape({N / kLanes, kLanes, K}).transpose(1, 2).contiguous();
}

// x (M, K) · the packed weight's W (N, K)ᵀ + bias (N) -> (M, N), fp32
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  packed.scalar_type() == at::kFloat && packed.dim() == 3,
              "skinny.linear: a contiguous fp32 (M, K) and a packed fp32 weight");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kLanes;
  TORCH_CHECK(packed.size(1) == K, "skinny.linear: x has ", K, " features, the weight ",
              packed.size(1));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kFloat,
                "skinny.linear: an fp32 bias of ", N);
  auto y = torch::empty({M, N}, x.options());
  run(x.data_ptr<float>(), packed.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr,
      y.data_ptr<float>(), M, K, N);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "weight (N, K) in the blocked layout of linear");
  m.def("linear", &linear, "x (M, K) times a packed weight, plus bias");
  m.def("amx_ready", &amx_ready, "whether this build and process can use AMX tiles");
  m.def("amx_pack", &amx_pack, "bf16 weight (N, K) in the tile layout of amx_linear");
  m.def("amx_linear", &amx_linear, "bf16 x (M, K) times an AMX-packed weight, plus bias");
  m.def("rms_norm", &rms_norm, "transformers' RMSNorm of x (M, K)");
  m.def("rotary", &rotary, "transformers' rotate-half rotary embedding of x (M, heads·D)");
  m.def("add_rms_norm", &add_rms_norm, "(h + delta, transformers' RMSNorm of it)");
  m.def("silu_mul", &silu_mul, "silu(gate) · up");
  m.def("attend", &attend, "one decode step's attention, the new key and value cached");
  m.def("decode_layers", &decode_layers, "a decode step's decoder layers, every product ours");
}
