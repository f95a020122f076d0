# SmolLM2-135M-Instruct learns tool calling in Qwen2.5's format (the chatml family's): glaive's
# function-calling conversations plus seeded calculator-use ones
# (xtuner_lite.toolcalling.calculator_data). Chat with the result:
# `xtuner chat smollm2-135m-instruct --adapter work_dirs/.../adapter --tools calculator`.
from mmengine.config import read_base

with read_base():
    from .._base_.datasets.alpaca_en_demo import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))  # noqa: F405

train_dataset.update(  # noqa: F405
    data_files=[
        "../shared/data/sft/llamafactory_glaive_toolcall_en_demo.json",  # relative to the cwd
        "examples/data/calculator_train.jsonl",
    ],
    map_fn="sharegpt",
    max_length=1024,
)
train.update(  # noqa: F405
    batch_size=1, accumulative_counts=4, epochs=None, max_iters=150, lr=4e-4, save_steps=50
)
