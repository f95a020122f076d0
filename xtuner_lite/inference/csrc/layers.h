// A decode step's decoder layers in one call (layers.cpp), bound in skinny.cpp's module.
#pragma once

#include <torch/extension.h>

#include <vector>

// From h (M, hidden) and x, its first layer's input norm: per layer the fused q/k/v product,
// attend (the new key and value cached at column `length`), o + residual with the post-attention
// norm, the fused gate/up product, silu_mul, down + residual with the next norm (the next
// layer's input norm, after the last layer the final norm). weights/biases: per layer q/k/v,
// o, gate/up, down, packed; norms/eps: per layer its post-attention norm, then the next norm.
// Returns (h, the final norm of h).
std::vector<torch::Tensor> decode_layers(
    torch::Tensor h, torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
    const torch::Tensor& mask, int64_t length, const std::vector<torch::Tensor>& weights,
    const std::vector<c10::optional<torch::Tensor>>& biases,
    const std::vector<torch::Tensor>& norms, const std::vector<double>& eps,
    const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
    int64_t q_size, int64_t kv_size, int64_t inter, double scale);
