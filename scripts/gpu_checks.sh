#!/usr/bin/env bash
# Every GPU-only check in one go, for whoever has a CUDA GPU for a few minutes:
#   bash scripts/gpu_checks.sh [OUT_DIR]      (needs `make install-tests`; sized to fit a short GPU loan)
# Writes OUT_DIR/gpu_results.jsonl (the 8 GiB proof, planner vs measured) and
# OUT_DIR/gpu_tests.txt (the gpu test tier), and prints both.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-work_dirs/gpu_checks}}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_results.jsonl"
: > "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. the gpu test tier: CUDA loading, bf16/QLoRA/full steps, fp16, 8-bit and paged AdamW,
#    FlashAttention varlen packing (when flash-attn is installed), the decode step on CUDA
HF_HUB_OFFLINE=1 timeout 300 python -m pytest -q -ra -m gpu tests/test_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -15

# 2. the 8 GiB proof: QLoRA r=64 at max_length 2048 on the shapes users pick, with the planner's
#    cheapest changes for an 8 GiB cap (loss chunk 256, paged 8-bit AdamW, bf16 adapters)
for shape in llama2_7b internlm2_5_7b qwen2_5_7b llama3_1_8b; do
  timeout 150 python benchmarks/bench_8gb.py --shape "$shape" --cap-gib 8 --steps 5 \
      --chunk-size 256 --optimizer paged_adamw_8bit --lora-dtype bf16 --delete \
      --work "$OUT/weights" --results "$RESULTS" 2>&1 | tail -3
done

# 3. planner vs torch.cuda.max_memory_allocated on small shapes
timeout 120 python benchmarks/plan_vs_cuda.py --steps 3 --delete --work "$OUT/weights" \
    --results "$RESULTS" 2>&1 | tail -12
echo "results: $RESULTS"
