# SmolLM2-135M-Instruct, QLORA on the Alpaca demo, 2 CPU cores.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

# NF4 + double quant base, bf16 compute; LoRA on every linear layer but the head.
model.update(method="qlora", compute_dtype="bf16", gradient_checkpointing=True)  # noqa: F405
train.update(epochs=1)  # noqa: F405
