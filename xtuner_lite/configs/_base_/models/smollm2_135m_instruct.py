# SmolLM2-135M-Instruct, the embedded default: downloaded and converted on first use.
pretrained_model = "smollm2-135m-instruct"
template = "smollm2"  # chatml with SmolLM2's default system prompt
max_length = 2048

model = dict(
    pretrained=pretrained_model,
    method="lora",
    lora=dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear"),
    dtype="bf16",  # frozen base in bf16; LoRA weights stay fp32 under train.dtype autocast
    gradient_checkpointing=False,
)
