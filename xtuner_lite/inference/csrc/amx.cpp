// bf16 products of a decode step's few rows on AMX tiles. Why ours (inference/skinny.py): at
// 16 rows a product is a stream of the weight, and oneDNN's kernels read it well below the
// memory's bandwidth; here each 16-column block of the weight, laid out as B tiles, is read once
// as one sequential, prefetched stream while the rows' A tile is reused from the cache. Only in
// the AVX-512 build, compiled for AMX per function: the rest of the build runs without it.
#include "amx.h"

#include "values.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#define XTUNER_AMX 1
#endif

namespace {

constexpr int64_t kCols = 16;   // a block's columns: one C tile's fp32 row
constexpr int64_t kDepth = 32;  // bf16 values of K per tile row (64 bytes)
constexpr int64_t kTile = 16;   // rows of a tile
constexpr int64_t kAhead = 4;   // B tiles of one block prefetched ahead of the one multiplied

using xtuner_lite::round_to;
using xtuner_lite::widen;

}  // namespace

#if defined(XTUNER_AMX)
namespace {

struct TileConfig {  // the layout LDTILECFG reads: every byte not set must be zero
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool permitted() {  // Linux hands out the tile state on request, once per process
  constexpr long kRequest = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool ok = syscall(SYS_arch_prctl, kRequest, kTileData) == 0;
  return ok;
}

// C tiles 0..B-1 = A (tile B: 16 rows of x, row stride ldx) · the B tiles (B+1..2B) of blocks
// w[0..B), over K; then stored in out (16 rows × 16·B fp32). `streamed`: w is read from memory
// once (a weight), so its tiles are fetched ahead; else it is at hand (in the cache)
template <int B, bool streamed = true>
__attribute__((target("amx-tile,amx-bf16"))) void tiles(const uint16_t* x, int64_t ldx,
                                                       int64_t K, const uint16_t* w, float* out) {
  static_assert(B == 1 || B == 2, "one or two blocks");
  const int64_t block = K * kCols, step = kDepth * kCols;  // a block; one B tile of it
  _tile_zero(0);
  if constexpr (B == 2) _tile_zero(1);
  for (int64_t c = 0; c < K / kDepth; ++c) {
    if constexpr (streamed)
      for (int b = 0; b < B; ++b) {
        const char* ahead = reinterpret_cast<const char*>(w + b * block + (c + kAhead) * step);
        for (int line = 0; line < 16; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
      }
    _tile_loadd(2, x + c * kDepth, ldx * 2);
    _tile_loadd(3, w + c * step, 64);
    _tile_dpbf16ps(0, 2, 3);
    if constexpr (B == 2) {
      _tile_loadd(4, w + block + c * step, 64);
      _tile_dpbf16ps(1, 2, 4);
    }
  }
  _tile_stored(0, out, B * kCols * 4);
  if constexpr (B == 2) _tile_stored(1, out + kCols, B * kCols * 4);
}

// tiles 0-1: C (16 rows of 16 fp32), 2: A (16 rows of 32 bf16), 3-4: B (16 pairs of K ×
// 16 columns); a constant in memory, as GCC drops stores to a local the instruction reads
constexpr TileConfig tile_layout() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  return config;
}
alignas(64) const TileConfig kLayout = tile_layout();

__attribute__((target("amx-tile"))) void configure() { _tile_loadconfig(&kLayout); }

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

// y (M, N) = x (Mp, K, rows past M zero) · W ᵀ + bias, rounded to bf16 (stored as such, or
// widened to fp32: Y); threads split the pairs of blocks
template <typename Y>
void run(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, const uint16_t* w, int64_t N,
         const uint16_t* bias, Y* y) {
  const int64_t blocks = N / kCols, pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    configure();  // the tile layout is per thread, and oneDNN's kernels set their own
    alignas(64) float out[kTile * 2 * kCols];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = 2 * p, nb = std::min<int64_t>(2, blocks - b0);
      for (int64_t r0 = 0; r0 < Mp; r0 += kTile) {
        const uint16_t* rows = x + r0 * K;
        if (nb == 2)
          tiles<2>(rows, K, K, w + b0 * K * kCols, out);
        else
          tiles<1>(rows, K, K, w + b0 * K * kCols, out);
        for (int64_t r = 0; r < std::min<int64_t>(kTile, M - r0); ++r)
          for (int64_t n = 0; n < nb * kCols; ++n) {
            const int64_t col = b0 * kCols + n;
            const float sum = out[r * nb * kCols + n] + (bias ? widen(bias[col]) : 0.f);
            const uint16_t rounded = round_to<uint16_t>(sum);
            if constexpr (std::is_same_v<Y, float>)
              y[(r0 + r) * N + col] = widen(rounded);
            else
              y[(r0 + r) * N + col] = rounded;
          }
      }
    }
    release();
  });
}

}  // namespace

bool amx_ready() { return permitted(); }

void amx_configure() { configure(); }

void amx_release() { release(); }

void amx_product16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t K, float* out) {
  tiles<1, false>(a, lda, K, b, out);  // b: one block, in the B tiles' layout
}
#else
bool amx_ready() { return false; }

void amx_configure() {}

void amx_release() {}

void amx_product16(const uint16_t*, int64_t, const uint16_t*, int64_t, float*) {}
#endif

torch::Tensor amx_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.size(0) % kCols == 0 && weight.size(1) % kDepth == 0,
              "skinny.amx_pack: a bf16 (N, K) weight with N % 16 == 0 and K % 32 == 0");
  const int64_t N = weight.size(0), K = weight.size(1);
  return weight.reshape({N / kCols, kCols, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed,
                         const c10::optional<torch::Tensor>& bias, bool widened) {
  TORCH_CHECK(amx_ready(), "skinny.amx_linear: this build or process has no AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "skinny.amx_linear: a bf16 (M, K) and a packed bf16 weight");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * kCols;
  TORCH_CHECK(packed.size(1) * 2 == K, "skinny.amx_linear: x has ", K, " features, the weight ",
              packed.size(1) * 2);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N &&
                    bias->scalar_type() == at::kBFloat16,
                "skinny.amx_linear: a bf16 bias of ", N);
  const int64_t Mp = (M + kTile - 1) / kTile * kTile;  // whole tiles of rows, the rest zero
  auto rows = x;
  if (Mp != M || !x.is_contiguous()) {
    rows = torch::zeros({Mp, K}, x.options());
    rows.narrow(0, 0, M).copy_(x);
  }
  auto y = torch::empty({M, N}, x.options().dtype(widened ? at::kFloat : at::kBFloat16));
#if defined(XTUNER_AMX)
  const auto* in = static_cast<const uint16_t*>(rows.data_ptr());
  const auto* weight = static_cast<const uint16_t*>(packed.data_ptr());
  const auto* b = has_bias ? static_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
  if (widened)
    run(in, M, Mp, K, weight, N, b, y.data_ptr<float>());
  else
    run(in, M, Mp, K, weight, N, b, static_cast<uint16_t*>(y.data_ptr()));
#endif
  return y;
}
