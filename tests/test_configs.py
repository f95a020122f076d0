"""Every bundled config loads, names only known keys, and the 7B ones build without weights."""

import pytest
import torch

from xtuner_lite.config import CONFIG_ROOT, check_kwargs, load_config
from xtuner_lite.data import get_template
from xtuner_lite.model import build_model
from xtuner_lite.objectives import build_objective
from xtuner_lite.training import TrainSettings

TRAIN_CONFIGS = sorted(
    p
    for p in CONFIG_ROOT.rglob("*.py")
    if "_base_" not in p.parts and p.parent.name not in ("data", "prepare")
)
GPU_CONFIGS = [p for p in TRAIN_CONFIGS if p.parent.name == "gpu"]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_config_keys_are_valid(path):
    cfg = load_config(str(path))
    check_kwargs(build_model, dict(cfg.model), f"{path.name} model")
    objective = build_objective(dict(cfg.get("objective", {})))
    data_cfg = {k: v for k, v in dict(cfg.train_dataset).items() if k != "type"}
    objective.data_settings(data_cfg)  # checked against what the objective reads
    check_kwargs(TrainSettings, dict(cfg.train), f"{path.name} train")
    get_template(cfg.train_dataset["template"], tokenizer=None)


def test_there_are_gpu_configs_for_each_model_method_and_data():
    names = {p.stem for p in GPU_CONFIGS}
    for model in (
        "qwen2_5_7b_instruct",
        "llama3_8b_instruct",
        "internlm2_chat_7b",
        "internlm2_5_7b_chat",
    ):
        for variant in ("qlora_alpaca", "lora_alpaca", "qlora_custom_jsonl"):
            assert f"{model}_{variant}" in names
    for model in ("llama3_1_8b_instruct", "qwen3_8b"):  # QLoRA on an 8 GB card only
        for variant in ("qlora_alpaca", "qlora_custom_jsonl", "dpo_qlora"):
            assert f"{model}_{variant}" in names


@pytest.mark.parametrize(
    "path",
    [p for p in GPU_CONFIGS if p.stem.endswith(("qlora_alpaca", "dpo_qlora", "reward_lora"))],
    ids=lambda p: p.stem,
)
def test_gpu_models_build_on_meta_device_with_lora(path):
    """Build the real architecture without weights; LoRA sits on every linear but the head
    (a reward model also trains its one-score head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = load_config(str(path))
    arch = dict(cfg.architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    reward = cfg.get("objective", {}).get("type") == "reward"
    with torch.device("meta"):
        if reward:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    lora = cfg.model["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            target_modules=lora["target_modules"],
            task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        ),
    )
    linears = [
        m
        for n, m in model.base_model.model.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n
    ]
    expected = sum(lora["r"] * (m.in_features + m.out_features) for m in linears)
    expected += config.hidden_size if reward else 0  # the score head's one output
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected and len(linears) == 7 * config.num_hidden_layers
    if arch["hidden_size"] == 3584 and not reward:
        # Qwen2.5-7B all-linear: peft reports 161,480,704 at r=64; the count is linear in r
        assert trainable == 161_480_704 * lora["r"] // 64
