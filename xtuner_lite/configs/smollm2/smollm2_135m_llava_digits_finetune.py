# LLaVA stage 2 on CPU: LoRA on SmolLM2-135M-Instruct (and the projector, trained in full) from
# stage 1's model (smollm2_135m_llava_digits_pretrain), the vision encoder frozen.
from mmengine.config import read_base

with read_base():
    from .._base_.train.cpu_lora import *  # noqa: F403

digits = "work_dirs/llava_digits"
# stage 1's result: the composed model with its trained encoder and projector
pretrained_model = "work_dirs/smollm2_135m_llava_digits_pretrain/model"
template = "smollm2"
model = dict(
    pretrained=pretrained_model,
    method="lora",
    lora=dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear"),
    dtype="bf16",  # the frozen base in bf16; adapter and projector fp32 under autocast
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
train.update(epochs=1, lr=2e-4, accumulative_counts=1, save_steps=100, log_interval=10)  # noqa: F405
