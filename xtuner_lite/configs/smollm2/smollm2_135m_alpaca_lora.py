# SmolLM2-135M-Instruct, LORA on the Alpaca demo, 2 CPU cores.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(method="lora")  # noqa: F405
train.update(epochs=1)  # noqa: F405
