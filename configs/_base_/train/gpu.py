# Schedule for 7B-class models on one GPU (XTuner's defaults): 16 × 2048 tokens per step.
seed = 0
train = dict(
    batch_size=1,
    accumulative_counts=16,
    epochs=3,
    lr=2e-4,
    weight_decay=0.0,
    warmup_ratio=0.03,
    max_norm=1.0,
    dtype="bf16",
    optimizer="paged_adamw_8bit",
    save_steps=500,
    save_total_limit=2,
    log_interval=10,
    device="cuda",
    evaluation_inputs=["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"],
    evaluation_freq=500,
)
