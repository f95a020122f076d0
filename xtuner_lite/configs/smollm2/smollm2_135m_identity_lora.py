# Quickstart: SmolLM2-135M-Instruct learns a new name and maker (examples/data/identity.json).
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))  # noqa: F405

train_dataset.update(data_files="examples/data/identity.json", max_length=512)  # noqa: F405

train.update(
    batch_size=1,
    accumulative_counts=1,
    epochs=None,
    max_iters=30,
    lr=1e-3,  # noqa: F405
    warmup_ratio=0.1,
    save_steps=15,
)
train.update(sample_prompts=["Who are you?", "Who made you?"], sample_max_new_tokens=32)  # noqa: F405
