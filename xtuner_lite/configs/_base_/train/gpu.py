# Schedule for 7B-class models on one GPU (XTuner's defaults): 16 × 2048 tokens per step,
# paged 8-bit AdamW, sample answers every 500 steps. Everything else as on CPU.
from mmengine.config import read_base

with read_base():
    from .cpu_lora import *  # noqa: F403

train.update(  # noqa: F405
    accumulative_counts=16,
    optimizer="paged_adamw_8bit",
    save_steps=500,
    log_interval=10,
    device="cuda",
    sample_prompts=["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"],
    sample_freq=500,
)
