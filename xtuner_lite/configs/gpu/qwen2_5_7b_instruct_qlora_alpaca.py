# qwen2_5_7b_instruct QLORA on alpaca data, one GPU.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_gpu import *  # noqa: F403
    from .._base_.methods.peft_7b import *  # noqa: F403
    from .._base_.models.qwen2_5_7b_instruct import *  # noqa: F403
    from .._base_.train.gpu import *  # noqa: F403

model = dict(
    peft_7b,
    pretrained=pretrained_model,
    method="qlora",  # noqa: F405
    trust_remote_code=trust_remote_code,
)  # noqa: F405
train_dataset.update(tokenizer=pretrained_model, template=template)  # noqa: F405
