# SmolLM2-135M-Instruct, DPO (sigmoid) with LoRA on the DPO demo pairs, 2 CPU cores.
# The reference is the same model with its adapter disabled: no second copy in memory.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

objective = dict(type="dpo", loss_type="sigmoid", beta=0.1, label_smoothing=0.0)
train.update(epochs=1, lr=5e-5, accumulative_counts=4)  # noqa: F405
