# Qwen2.5-VL-7B-Instruct on one 8 GB GPU: QLoRA on the language model's linear layers and the
# patch merger (the projector) in full; the 632M-parameter vision tower frozen and, to fit, in
# NF4 too (its bf16 copy alone takes 1.2 GiB); images resized down to at most 448×448 pixels,
# aspect kept.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.llava_jsonl import *  # noqa: F403
    from .._base_.methods.qlora_8gb import *  # noqa: F403
    from .._base_.models.qwen2_5_vl_7b_instruct import *  # noqa: F403
    from .._base_.train.gpu_8gb import *  # noqa: F403

model = dict(
    qlora_8gb,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="qlora",
    trust_remote_code=trust_remote_code,  # noqa: F405
    vision=dict(quantize_vision_tower=True),
)
train_dataset.update(  # noqa: F405
    tokenizer=pretrained_model,  # noqa: F405
    processor=pretrained_model,  # noqa: F405
    template=template,  # noqa: F405
    max_length=max_length,  # noqa: F405
    image_max_pixels=image_max_pixels,  # noqa: F405
)
train.update(chunk_size=loss_chunk_size)  # noqa: F405
