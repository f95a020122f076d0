// The elementwise work and the attention of a decode step (step.cpp), bound with the products
// in skinny.cpp's module.
#pragma once

#include <torch/extension.h>

#include <vector>

// transformers' Llama RMSNorm of x (M, K)
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// (h + delta, RMSNorm of it): a residual add and the next norm in one pass
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta,
                                        const torch::Tensor& weight, double eps);

// transformers' rotate-half rotary embedding of x (M, heads·D), rows possibly strided
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     int64_t heads);

// silu(gate) · up, each rounded as torch's two ops round
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up);

// One new token a row: rotates k into the key buffer's column `length`, stores v, and returns
// softmax(q·kᵀ·scale over the row's real columns)·v for every query head (M, heads·D); with
// `tiles`, bf16 scores are AMX tile products where the CPU has them
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                     torch::Tensor values, int64_t length, const torch::Tensor& mask,
                     double scale, bool tiles);
