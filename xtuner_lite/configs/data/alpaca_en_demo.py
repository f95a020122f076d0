# Data-only config for `xtuner check-dataset`: LLaMA-Factory's 999-row Alpaca demo on SmolLM2.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403

train_dataset.update(max_length=2048)  # noqa: F405
