// bf16 products of a few rows on AMX tiles (amx.cpp), bound in skinny.cpp's module.
#pragma once

#include <torch/extension.h>

// Whether this build has the AMX kernel and the OS lets this process use the tiles
bool amx_ready();

// Our other kernels' use of the tiles, in a thread: amx_configure before, amx_release after
// (the layout is per thread, and oneDNN's kernels set their own); only where amx_ready()
void amx_configure();
void amx_release();

// out (16 × 16 fp32, rows adjacent) = a (16 rows of K bf16, row stride lda) · b (K × 16 bf16 as
// pairs of K: (K/2, 16, 2)), fp32 sums; K % 32 == 0; between amx_configure and amx_release
void amx_product16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t K, float* out);

// bf16 weight (N, K) -> its blocks (N/16, K/2, 16, 2): the tile layout of amx_linear's B
torch::Tensor amx_pack(const torch::Tensor& weight);

// bf16 x (M, K) · the packed weight's W (N, K)ᵀ + bias (N) -> (M, N) bf16, fp32 sums; with
// `widened`, the same bf16 values as fp32 (logits, without a conversion after)
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed,
                         const c10::optional<torch::Tensor>& bias, bool widened);
