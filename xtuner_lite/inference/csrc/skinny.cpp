// Products of a few rows with a weight packed once: y = x · Wᵀ (+ bias) for decode steps.
// Why ours (inference/skinny.py): at a decode step's few rows oneDNN's packed kernels read the
// weights well below the memory's bandwidth; a register tile of rows × 32 columns fed by one
// sequential, prefetched stream per pair of 16-column blocks reads them closer to it.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <array>
#include <cmath>
#include <utility>

namespace {

constexpr int64_t kLanes = 16;  // fp32 columns in one AVX-512 register: a packed block's width
constexpr int kRows = 16;       // rows per register tile (16 rows x 2 blocks = 32 accumulators)
constexpr int64_t kAhead = 32;  // software prefetch distance, in 64-byte lines of one block

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

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*);

// tiles[B - 1][R - 1]: every row count a tile takes, for one block and for two
template <int... R>
constexpr std::array<std::array<Tile, kRows>, 2> tiles(std::integer_sequence<int, R...>) {
  return {{{tile<R + 1, 1>...}, {tile<R + 1, 2>...}}};
}

// the threads split the pairs of blocks; each pair is read once per 16 rows
void run(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
         int64_t N) {
  static constexpr auto table = tiles(std::make_integer_sequence<int, kRows>{});
  const int64_t blocks = N / kLanes, pairs = (blocks + 1) / 2, block = K * kLanes;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = 2 * p, nb = std::min<int64_t>(2, blocks - b0);
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

namespace {

// transformers' RMSNorm: x · rsqrt(mean(x²) + eps) in fp32, rounded to x's dtype, times weight
template <typename T>
void rms_rows(const T* x, const T* weight, T* y, int64_t M, int64_t K, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    float squares = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(row[k]);
      squares += v * v;
    }
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(K) + eps);
    for (int64_t k = 0; k < K; ++k) {
      const T normed = static_cast<T>(static_cast<float>(row[k]) * scale);
      y[m * K + k] = static_cast<T>(static_cast<float>(weight[k]) * static_cast<float>(normed));
    }
  }
}

// transformers' rotate-half rotary embedding, each product and the sum rounded to T as torch's
// separate ops round them: x's row m holds `heads` vectors of D; cos/sin (M, D)
template <typename T>
void rotate_rows(const T* x, int64_t ldx, const T* cos, const T* sin, T* y, int64_t M,
                 int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t m = 0; m < M; ++m) {
    const T* c = cos + m * D;
    const T* s = sin + m * D;
    for (int64_t h = 0; h < heads; ++h) {
      const T* in = x + m * ldx + h * D;
      T* out = y + (m * heads + h) * D;
      for (int64_t i = 0; i < D; ++i) {
        const float v = static_cast<float>(in[i]);
        const float other = i < half ? -static_cast<float>(in[i + half])
                                     : static_cast<float>(in[i - half]);
        const T a = static_cast<T>(v * static_cast<float>(c[i]));
        const T b = static_cast<T>(other * static_cast<float>(s[i]));
        out[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
      }
    }
  }
}

void check_dtype(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": fp32 or bf16");
}

}  // namespace

// The elementwise work of a decode step, one call each for its few rows: the same arithmetic
// as separate torch ops costs more in their dispatch than in the work.

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
                  weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "skinny.rms_norm: a contiguous (M, K) and a weight of K, one dtype");
  check_dtype(x, "skinny.rms_norm");
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "skinny.rms_norm", [&] {
    rms_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
             x.size(0), x.size(1), static_cast<float>(eps));
  });
  return y;
}

// x (M, heads·D), rows possibly strided (a split of a fused product) -> rotated (M, heads·D)
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "skinny.rotary", [&] {
    rotate_rows(x.data_ptr<scalar_t>(), x.stride(0), cos.data_ptr<scalar_t>(),
                sin.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), M, heads, D);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "weight (N, K) in the blocked layout of linear");
  m.def("linear", &linear, "x (M, K) times a packed weight, plus bias");
  m.def("rms_norm", &rms_norm, "transformers' RMSNorm of x (M, K)");
  m.def("rotary", &rotary, "transformers' rotate-half rotary embedding of x (M, heads·D)");
}
