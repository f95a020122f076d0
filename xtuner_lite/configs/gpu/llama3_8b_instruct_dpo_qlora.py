# DPO (sigmoid) with QLoRA on preference pairs, one GPU; the reference is the NF4 base with
# the adapter disabled, its log-probabilities computed once and cached on disk.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.pref_gpu import *  # noqa: F403
    from .._base_.methods.peft_7b import *  # noqa: F403
    from .._base_.models.llama3_8b_instruct import *  # noqa: F403
    from .._base_.train.gpu import *  # noqa: F403

model = dict(
    peft_7b,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="qlora",
    trust_remote_code=trust_remote_code,  # noqa: F405
)
train_dataset.update(tokenizer=pretrained_model, template=template)  # noqa: F405
objective = dict(type="dpo", loss_type="sigmoid", beta=0.1, precompute_reference=True)
train.update(lr=5e-5)  # noqa: F405 - LoRA DPO: adapters take a higher rate than a full fine-tune
