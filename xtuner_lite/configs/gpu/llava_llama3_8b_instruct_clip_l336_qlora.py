# LLaVA stage 2 on one 8 GB GPU: QLoRA on Llama-3-8B-Instruct's linear layers and the projector
# in full, the CLIP ViT-L/336 tower frozen (unquantized, bf16), from stage 1's folder.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.llava_jsonl import *  # noqa: F403
    from .._base_.methods.qlora_8gb import *  # noqa: F403
    from .._base_.models.llava_llama3_8b_instruct_clip_l336 import *  # noqa: F403
    from .._base_.train.gpu_8gb import *  # noqa: F403

model = dict(
    qlora_8gb,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="qlora",
    trust_remote_code=trust_remote_code,  # noqa: F405
)
train_dataset.update(  # noqa: F405
    tokenizer=pretrained_model,  # noqa: F405
    processor=pretrained_model,  # noqa: F405
    template=template,  # noqa: F405
    max_length=max_length,  # noqa: F405
)
train.update(chunk_size=loss_chunk_size)  # noqa: F405
