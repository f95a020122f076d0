# SmolLM2-135M-Instruct, SimPO with LoRA on the DPO demo pairs (length-normalized, no reference).
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

objective = dict(type="simpo", beta=2.0, gamma=0.5)
train.update(epochs=1, lr=5e-5, accumulative_counts=4)  # noqa: F405
