# SmolLM2-135M-Instruct learns seeded arithmetic word problems by GRPO with LoRA on CPU: each step
# samples 8 completions of 4 prompts from the model being trained (the bundled engine) and
# rewards an exact final number, plus a little for ending on a "#### N" line.
from mmengine.config import read_base

with read_base():
    from .._base_.models.smollm2_135m_instruct import *  # noqa: F403
    from .._base_.train.cpu_lora import *  # noqa: F403

model.update(lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))  # noqa: F405

train_dataset = dict(
    data_files="examples/data/arithmetic_train.jsonl",  # objectives/grpo/arithmetic.py
    tokenizer=pretrained_model,  # noqa: F405
    template=template,  # noqa: F405
    map_fn="question",
    max_prompt_length=256,
)
objective = dict(
    type="grpo",
    rewards=[
        dict(type="numeric_answer", answer_key="answer", weight=1.0),
        dict(type="format", pattern=r"####\s*-?\d+\s*$", weight=0.2, name="final_line"),
    ],
    num_generations=8,
    max_new_tokens=96,
    temperature=0.7,  # at 1.0 this small model's samples are mostly noise
    epsilon=0.2,
    aggregation="grpo",
    beta=0.0,
)
train.update(  # noqa: F405
    batch_size=4,  # prompts per micro-batch (x num_generations completions)
    accumulative_counts=1,
    epochs=None,
    max_iters=20,  # the measured run (docs/benchmarks.md)
    lr=2e-4,
    warmup_ratio=0.05,
    save_steps=10,
    log_interval=1,
)
