// fp32 products of a few rows with a weight packed once (skinny.cpp).
#pragma once

#include <torch/extension.h>

// weight (N, K) -> its blocks (N/16, K, 16)
torch::Tensor pack(const torch::Tensor& weight);

// x (M, K) · the packed weight's W (N, K)ᵀ + bias (N) -> (M, N), fp32
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const c10::optional<torch::Tensor>& bias);
