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

# 1. the gpu test tier: CUDA loading, bf16/QLoRA/full steps, fp16 (and the fallback to it on a
#    GPU without bf16), activation offload, 8-bit and paged AdamW, FlashAttention varlen packing
#    (when flash-attn is installed), the decode step on CUDA, lmdeploy chat (when installed)
HF_HUB_OFFLINE=1 timeout 300 python -m pytest -q -ra -m gpu tests/test_gpu.py \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -15

# 2. the 8 GiB proof on the shipped recipes as they are (random weights of their architectures,
#    capped at 8 GiB, 20 steps): one recipe per architecture — a model's SFT, custom-data and
#    DPO recipes plan the same row length and settings; InternLM2.5 has InternLM2's shapes and
#    Llama-3 Llama-3.1's. Each architecture's weights (about 16 GB) are deleted after its runs.
timeout 200 python benchmarks/bench_8gb.py --config qwen2_5_7b_instruct_qlora_alpaca \
    internlm2_5_7b_chat_qlora_alpaca qwen3_8b_qlora_alpaca --cap-gib 8 --steps 20 --delete \
    --work "$OUT/weights" --results "$RESULTS" 2>&1 | grep '^{'
L31=llama3_1_8b_instruct_qlora_alpaca
timeout 80 python benchmarks/bench_8gb.py --config $L31 --cap-gib 8 --steps 20 \
    --work "$OUT/weights" --results "$RESULTS" 2>&1 | grep '^{'
# activation offload: what it saves and costs at 2,048 and 4,096 tokens (uncapped); then fp16
# with loss scaling under the cap (as on a GPU without bf16)
for length in 2048 4096; do
  timeout 100 python benchmarks/bench_8gb.py --config $L31 --max-length $length \
      --offload on off --cap-gib 80 --steps 6 --work "$OUT/weights" --results "$RESULTS" \
      2>&1 | grep '^{'
done
timeout 60 python benchmarks/bench_8gb.py --config $L31 --fp16 --cap-gib 8 --steps 8 --delete \
    --work "$OUT/weights" --results "$RESULTS" 2>&1 | grep '^{'

# the image-text recipes: random weights of their architectures (the tower, projector and
# language model), rows holding as many images of the planned size as the plan assumes
timeout 240 python benchmarks/bench_8gb.py --config qwen2_5_vl_7b_instruct_qlora \
    llava_qwen2_5_7b_clip_l336_qlora --cap-gib 8 --steps 8 --delete --work "$OUT/weights" \
    --results "$RESULTS" 2>&1 | grep '^{'

# 3. planner vs torch.cuda.max_memory_allocated on small shapes
timeout 120 python benchmarks/plan_vs_cuda.py --steps 3 --delete --work "$OUT/weights" \
    --results "$RESULTS" 2>&1 | tail -12
echo "results: $RESULTS"
