// bf16 products of a few rows on AMX tiles (amx.cpp), bound in skinny.cpp's module.
#pragma once

#include <torch/extension.h>

// Whether this build has the AMX kernel and the OS lets this process use the tiles
bool amx_ready();

// bf16 weight (N, K) -> its blocks (N/16, K/2, 16, 2): the tile layout of amx_linear's B
torch::Tensor amx_pack(const torch::Tensor& weight);

// bf16 x (M, K) · the packed weight's W (N, K)ᵀ + bias (N) -> (M, N) bf16, fp32 sums
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed,
                         const c10::optional<torch::Tensor>& bias);
