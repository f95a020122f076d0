# SmolLM2-135M-Instruct as a reward model with LoRA on the DPO demo pairs: a scalar head on
# the last token, Bradley-Terry loss; `xtuner merge` gives a sequence-classification folder.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

objective = dict(type="reward", margin=0.0, center_rewards_coefficient=0.01)
train.update(epochs=1, lr=1e-4, accumulative_counts=4)  # noqa: F405
