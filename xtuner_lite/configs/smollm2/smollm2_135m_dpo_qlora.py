# SmolLM2-135M-Instruct, DPO with QLoRA (NF4 base) on the DPO demo pairs; the reference
# log-probabilities are computed once before training and cached on disk.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(method="qlora", compute_dtype="bf16")  # noqa: F405
objective = dict(type="dpo", loss_type="sigmoid", beta=0.1, precompute_reference=True)
train.update(epochs=1, lr=5e-5, accumulative_counts=4)  # noqa: F405
