# SmolLM2-135M-Instruct, ORPO with LoRA on the DPO demo pairs (no reference model).
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

objective = dict(type="orpo", beta=0.1)
train.update(epochs=1, lr=5e-5, accumulative_counts=4)  # noqa: F405
