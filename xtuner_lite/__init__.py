"""xtuner_lite: memory-efficient LLM fine-tuning (full, LoRA, QLoRA) that also runs on CPU."""

import importlib.util
import logging
import os
from importlib import import_module
from typing import Any

from xtuner_lite.errors import DataError, XtunerError

__version__ = "0.1.0"

# bitsandbytes warns, at import, on every CPU with AVX512-bf16 that its optional hub kernel
# package (`kernels`) is missing; its own fallback is what we use, so that one message is dropped
# where it arises (a filter on its logger, set up before bitsandbytes is imported)
_BNB_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(_BNB_KERNELS)
)


def name_cpu_accelerator() -> None:
    """Keep DeepSpeed's import quiet on machines without CUDA: once it is installed, mmengine's
    optimizer registry imports it, and its accelerator detection prints a warning to stdout
    (into output that scripts parse) unless the CPU accelerator is named first."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch  # lazy: only once DeepSpeed is known to be installed (torch is slow to import)

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


# everything the CLI does, one import away; loaded on first use, so `import xtuner_lite` and
# `xtuner --help` stay instant (torch, peft and mmengine take seconds to import)
_LAZY = {
    "load_config": "xtuner_lite.config",
    "train": "xtuner_lite.commands.train",
    "SFTDataset": "xtuner_lite.data",
    "get_template": "xtuner_lite.data",
    "load_rows": "xtuner_lite.data",
    "process_dataset": "xtuner_lite.data",
    "prepare_data": "xtuner_lite.dataprep",
    "download_embedded": "xtuner_lite.hub",
    "load_model": "xtuner_lite.hub",
    "load_tokenizer": "xtuner_lite.hub",
    "resolve_model_path": "xtuner_lite.hub",
    "merge_adapter": "xtuner_lite.commands.merge",
    "pth_to_hf": "xtuner_lite.commands.convert",
    "export_gguf": "xtuner_lite.commands.export",
    "ChatSession": "xtuner_lite.commands.chat",
    "InferenceEngine": "xtuner_lite.inference",
    "SamplingParams": "xtuner_lite.inference",
    "run_eval": "xtuner_lite.evaluation",
    "serve": "xtuner_lite.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtuner_lite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["DataError", "XtunerError", "__version__", "name_cpu_accelerator", *_LAZY]
