# SmolLM2-135M-Instruct, FULL on the Alpaca demo, 2 CPU cores.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

# Every weight trains: lower learning rate, fp32 master weights under bf16 autocast.
model.update(method="full", dtype="fp32", gradient_checkpointing=True)  # noqa: F405
train.update(epochs=1, lr=2e-5)  # noqa: F405
