# QLoRA for 7–8B models on an 8 GB card (`xtuner plan CONFIG --gpu-mem 8GiB` fits, with 0.5 GiB
# to spare): r=16 on every linear layer — the QLoRA paper found the rank does not change the
# result once every linear layer is adapted, and r=16 takes a quarter of r=64's adapter,
# gradients and optimizer state — with fp32 adapter weights (exact updates), a bf16 frozen base
# and compute, and gradient checkpointing (whose kept layer inputs train.offload_activations
# moves to host memory; see _base_/train/gpu_8gb.py).
qlora_8gb = dict(
    lora=dict(r=16, alpha=16, dropout=0.1, target_modules="all-linear"),
    dtype="bf16",
    compute_dtype="bf16",
    gradient_checkpointing=True,
)
