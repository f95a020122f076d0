"""xtuner_lite: memory-efficient LLM fine-tuning (full, LoRA, QLoRA) that also runs on CPU."""

from xtuner_lite.config import load_config
from xtuner_lite.data import SFTDataset, get_template, load_rows, process_dataset
from xtuner_lite.errors import DataError, XtunerError
from xtuner_lite.hub import download_embedded, load_model, load_tokenizer, resolve_model_path
from xtuner_lite.training import train

__version__ = "0.1.0"

__all__ = [
    "DataError", "SFTDataset", "XtunerError", "__version__", "download_embedded", "get_template",
    "load_config", "load_model", "load_rows", "load_tokenizer", "process_dataset",
    "resolve_model_path", "train",
]
