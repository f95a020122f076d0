# LLaMA-Factory's 300-pair DPO demo (../shared/data, not bundled: point data_files at a copy).
from mmengine.config import read_base

with read_base():
    from ..models.smollm2_135m_instruct import *  # noqa: F403

train_dataset = dict(
    data_files="../shared/data/pref/llamafactory_dpo_en_demo.json",  # relative to the cwd
    tokenizer=pretrained_model,  # noqa: F405
    map_fn="auto",  # ShareGPT, OpenAI or Alpaca preference rows, told apart by their keys
    template=template,  # noqa: F405
    max_length=512,  # per sequence (prompt + response); a packed row holds 2 x max_length
    pack=True,
)
