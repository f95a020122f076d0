# LLaVA stage 1 on CPU: a vision encoder of ours (random, SigLIP-shaped) and the projector learn
# to show SmolLM2-135M-Instruct handwritten digits; the LLM stays frozen. First write the data
# and the composed model: python -m xtuner_lite.examples.digits work_dirs/llava_digits
# (xtuner_lite/examples/digits.py); stage 2 is smollm2_135m_llava_digits_finetune.
from mmengine.config import read_base

with read_base():
    from .._base_.train.cpu_lora import *  # noqa: F403

digits = "work_dirs/llava_digits"  # relative to the cwd, as the demo writes it
pretrained_model = f"{digits}/composed"
template = "smollm2"
model = dict(
    pretrained=pretrained_model,
    method="full",
    dtype="fp32",  # master weights of the trained parts; the frozen LLM computes in bf16 autocast
    vision=dict(freeze_vision_tower=False, freeze_language_model=True),
)
objective = dict(type="vlm_sft")
train_dataset = dict(
    data_files=f"{digits}/train.jsonl",
    tokenizer=pretrained_model,
    processor=pretrained_model,
    template=template,
    max_length=1024,
    pack=True,
)
train.update(epochs=2, lr=1e-3, accumulative_counts=1, save_steps=100, log_interval=10)  # noqa: F405
