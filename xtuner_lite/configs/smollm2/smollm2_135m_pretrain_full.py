# Incremental pretraining on plain text: every token is trained (map_fn="pretrain").
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(method="full", dtype="fp32")  # noqa: F405
train_dataset.update(
    data_files="examples/data/pretrain_mini.jsonl",
    map_fn="pretrain",  # noqa: F405
    max_length=512,
)
train.update(epochs=None, max_iters=20, lr=2e-5, accumulative_counts=1)  # noqa: F405
