# LoRA/QLoRA settings for 7B-class models (XTuner's defaults): r=64 on every linear layer,
# bf16 weights and compute, gradient checkpointing. Configs pick method="qlora" or "lora".
peft_7b = dict(
    lora=dict(r=64, alpha=16, dropout=0.1, target_modules="all-linear"),
    dtype="bf16",
    compute_dtype="bf16",
    gradient_checkpointing=True,
)
