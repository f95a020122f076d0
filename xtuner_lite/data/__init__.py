"""The SFT data pipeline: load → map fn → chat template → tokenize with labels → pack."""

from xtuner_lite.data.dataset import SFTDataset, collate_packed
from xtuner_lite.data.loaders import Rows, load_rows
from xtuner_lite.data.map_fns import MAP_FNS, get_map_fn
from xtuner_lite.data.packing import PackedData, build_packed, pack_indices
from xtuner_lite.data.pipeline import DatasetStats, ProcessedDataset, process_dataset
from xtuner_lite.data.templates import TEMPLATES, ChatTemplate, JinjaTemplate, get_template
from xtuner_lite.data.tokenize import IGNORE_INDEX, tokenize_rendered

__all__ = [
    "IGNORE_INDEX",
    "MAP_FNS",
    "TEMPLATES",
    "ChatTemplate",
    "DatasetStats",
    "JinjaTemplate",
    "PackedData",
    "ProcessedDataset",
    "Rows",
    "SFTDataset",
    "build_packed",
    "collate_packed",
    "get_map_fn",
    "get_template",
    "load_rows",
    "pack_indices",
    "process_dataset",
    "tokenize_rendered",
]
