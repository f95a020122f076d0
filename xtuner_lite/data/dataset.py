"""A torch Dataset over processed rows, and the collator that keeps sample boundaries."""

from __future__ import annotations

from typing import Any

import torch

from xtuner_lite.data.packing import PackedData
from xtuner_lite.data.pipeline import DatasetStats, process_dataset
from xtuner_lite.data.tokenize import IGNORE_INDEX


class SFTDataset(torch.utils.data.Dataset):
    """Rows of a processed dataset; build from a config dict with :meth:`from_config`."""

    def __init__(self, data: PackedData, stats: DatasetStats):
        self.data, self.stats = data, stats

    @classmethod
    def build(cls, **kwargs: Any) -> SFTDataset:
        processed = process_dataset(**kwargs)
        return cls(processed.data, processed.stats)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.data.row(i)


def collate_packed(
    rows: list[dict[str, list[int]]], pad_token_id: int = 0, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch; cu_seqlens are flattened over the batch (varlen layout).

    Padding is its own "sample" in cu_seqlens with labels -100, so attention stays per sample.
    ``pad_to_multiple_of`` rounds the width up: on CPU every new width makes oneDNN build and
    keep another set of kernels (resident memory grows through a run whose rows vary).
    """
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    cu = [0]
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        position_ids[b, :n] = torch.tensor(r["position_ids"])
        position_ids[b, n:] = torch.arange(width - n)
        offset = b * width
        cu += [offset + c for c in r["cu_seqlens"][1:]]
        if n < width:
            cu.append(offset + width)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows)),
    }
