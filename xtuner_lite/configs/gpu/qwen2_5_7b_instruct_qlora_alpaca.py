# qwen2_5_7b_instruct QLoRA on alpaca data, one 8 GB GPU.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_gpu import *  # noqa: F403
    from .._base_.methods.qlora_8gb import *  # noqa: F403
    from .._base_.models.qwen2_5_7b_instruct import *  # noqa: F403
    from .._base_.train.gpu_8gb import *  # noqa: F403

model = dict(
    qlora_8gb,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="qlora",
    trust_remote_code=trust_remote_code,  # noqa: F405
)
train_dataset.update(tokenizer=pretrained_model, template=template)  # noqa: F405
train.update(chunk_size=loss_chunk_size)  # noqa: F405
