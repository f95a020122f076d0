# SmolLM2-135M-Instruct, KTO with LoRA on LLaMA-Factory's unpaired KTO demo (label true/false).
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.dpo_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

train_dataset.update(data_files="../shared/data/pref/llamafactory_kto_en_demo.json")  # noqa: F405
objective = dict(type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
# KTO's KL term is estimated within each micro-batch: several rows per micro-batch
train.update(epochs=1, lr=5e-5, batch_size=2, accumulative_counts=2)  # noqa: F405
