# A reward model with LoRA (a scalar head on the last token) on preference pairs, one GPU.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.pref_gpu import *  # noqa: F403
    from .._base_.methods.peft_7b import *  # noqa: F403
    from .._base_.models.qwen2_5_7b_instruct import *  # noqa: F403
    from .._base_.train.gpu import *  # noqa: F403

model = dict(
    peft_7b,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="lora",
    trust_remote_code=trust_remote_code,  # noqa: F405
)
train_dataset.update(tokenizer=pretrained_model, template=template)  # noqa: F405
objective = dict(type="reward", center_rewards_coefficient=0.01)
train.update(epochs=1)  # noqa: F405
