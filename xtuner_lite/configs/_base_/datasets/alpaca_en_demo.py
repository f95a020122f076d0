# LLaMA-Factory's 999-row Alpaca demo (../shared/data, not bundled: point data_files at a copy).
from mmengine.config import read_base

with read_base():
    from ..models.smollm2_135m_instruct import *  # noqa: F403

train_dataset = dict(
    data_files="../shared/data/sft/llamafactory_alpaca_en_demo.json",  # relative to the cwd
    tokenizer=pretrained_model,  # noqa: F405
    map_fn="alpaca",
    template=template,  # noqa: F405
    max_length=1024,
    pack=True,
)
