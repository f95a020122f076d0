// A decode step's decoder layers in one call, where every product is ours: the layer is the
// same calls the Python step makes (layers.h), without a Python round trip between them, which
// at a few rows costs a share of the step the products' own time makes noticeable.
#include "layers.h"

#include "amx.h"
#include "skinny.h"
#include "step.h"

namespace {

// the packed weight's product: fp32 (our blocked layout) or bf16 (AMX tiles)
torch::Tensor product(const torch::Tensor& x, const torch::Tensor& packed,
                      const c10::optional<torch::Tensor>& bias) {
  return packed.scalar_type() == at::kBFloat16 ? amx_linear(x, packed, bias, false)
                                               : ::linear(x, packed, bias);  // not at::linear
}

}  // namespace

std::vector<torch::Tensor> decode_layers(
    torch::Tensor h, torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
    const torch::Tensor& mask, int64_t length, const std::vector<torch::Tensor>& weights,
    const std::vector<c10::optional<torch::Tensor>>& biases,
    const std::vector<torch::Tensor>& norms, const std::vector<double>& eps,
    const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
    int64_t q_size, int64_t kv_size, int64_t inter, double scale) {
  const size_t layers = keys.size();
  TORCH_CHECK(values.size() == layers && weights.size() == 4 * layers &&
                  biases.size() == 4 * layers && norms.size() == 2 * layers &&
                  eps.size() == 2 * layers,
              "skinny.decode_layers: per layer 4 weights and biases, 2 norms (the second "
              "the next layer's first, the last the final norm), a key and a value buffer");
  for (size_t i = 0; i < layers; ++i) {
    const auto* w = &weights[4 * i];
    const auto* b = &biases[4 * i];
    const auto qkv = product(x, w[0], b[0]);
    const auto q = qkv.narrow(1, 0, q_size);
    const auto k = qkv.narrow(1, q_size, kv_size);
    const auto v = qkv.narrow(1, q_size + kv_size, kv_size);
    const auto out = attend(q, k, v, cos, sin, keys[i], values[i], length, mask, scale, true);
    auto normed = add_rms_norm(h, product(out, w[1], b[1]), norms[2 * i], eps[2 * i]);
    const auto gate_up = product(normed[1], w[2], b[2]);
    const auto act = silu_mul(gate_up.narrow(1, 0, inter), gate_up.narrow(1, inter, inter));
    normed = add_rms_norm(normed[0], product(act, w[3], b[3]), norms[2 * i + 1], eps[2 * i + 1]);
    h = normed[0];
    x = normed[1];
  }
  return {h, x};
}
