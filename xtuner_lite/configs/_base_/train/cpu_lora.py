# Schedule for small models on 2 CPU cores: bf16 autocast, AdamW, warmup + cosine.
seed = 0
train = dict(
    batch_size=1,
    accumulative_counts=4,
    epochs=3,
    lr=2e-4,
    weight_decay=0.0,
    warmup_ratio=0.03,
    max_norm=1.0,
    dtype="bf16",
    optimizer="adamw",
    save_steps=50,
    save_total_limit=2,
    log_interval=5,
)
