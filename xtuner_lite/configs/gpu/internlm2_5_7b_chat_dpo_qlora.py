# internlm2_5_7b_chat DPO (sigmoid) with QLoRA on preference pairs, one 8 GB GPU: 1,024 tokens per
# sequence (a packed row holds both of a pair's); the reference is the NF4 base with the adapter
# disabled, its log-probabilities computed once and cached on disk.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.pref_gpu import *  # noqa: F403
    from .._base_.methods.qlora_8gb import *  # noqa: F403
    from .._base_.models.internlm2_5_7b_chat import *  # noqa: F403
    from .._base_.train.gpu_8gb import *  # noqa: F403

model = dict(
    qlora_8gb,  # noqa: F405
    pretrained=pretrained_model,  # noqa: F405
    method="qlora",
    trust_remote_code=trust_remote_code,  # noqa: F405
)
train_dataset.update(tokenizer=pretrained_model, template=template, max_length=1024)  # noqa: F405
objective = dict(type="dpo", loss_type="sigmoid", beta=0.1, precompute_reference=True)
# LoRA DPO: adapters take a higher rate than a full fine-tune
train.update(lr=5e-5, chunk_size=loss_chunk_size)  # noqa: F405
