"""xtuner_lite: memory-efficient LLM fine-tuning (full, LoRA, QLoRA) that also runs on CPU."""
# ruff: noqa: E402 - DeepSpeed's accelerator is named before the imports below load mmengine

from importlib import import_module
from typing import Any

from xtuner_lite.deepspeed_env import name_cpu_accelerator

name_cpu_accelerator()  # before anything imports mmengine (and through it DeepSpeed)

from xtuner_lite.config import load_config
from xtuner_lite.data import SFTDataset, get_template, load_rows, process_dataset
from xtuner_lite.errors import DataError, XtunerError
from xtuner_lite.hub import download_embedded, load_model, load_tokenizer, resolve_model_path
from xtuner_lite.training import train

__version__ = "0.1.0"

# everything the CLI does, one import away; loaded on first use (they pull in torch/peft)
_LAZY = {
    "merge_adapter": "xtuner_lite.merge", "pth_to_hf": "xtuner_lite.convert",
    "export_gguf": "xtuner_lite.export", "ChatSession": "xtuner_lite.chat",
    "InferenceEngine": "xtuner_lite.inference", "SamplingParams": "xtuner_lite.inference",
    "run_eval": "xtuner_lite.evaluation", "serve": "xtuner_lite.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtuner_lite' has no attribute {name!r}")


__all__ = [
    "DataError", "SFTDataset", "XtunerError", "__version__", "download_embedded", "get_template",
    "load_config", "load_model", "load_rows", "load_tokenizer", "process_dataset",
    "resolve_model_path", "train", *_LAZY,
]
