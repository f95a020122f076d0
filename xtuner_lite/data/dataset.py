"""A torch Dataset over processed rows, and the collator that keeps sample boundaries."""

from __future__ import annotations

from typing import Any

import torch

from xtuner_lite.data.packing import PackedData
from xtuner_lite.data.pipeline import DatasetStats, process_dataset
from xtuner_lite.data.preference import PreferenceData, process_preference_dataset
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


class PreferenceDataset(torch.utils.data.Dataset):
    """Rows of packed preference units; ``reference`` (optional) holds each sequence's cached
    reference log-probability sum, in storage order, so training runs no reference forward."""

    def __init__(self, data: PreferenceData, stats: DatasetStats):
        self.data, self.stats = data, stats
        self.reference: torch.Tensor | None = None

    @classmethod
    def build(cls, **kwargs: Any) -> PreferenceDataset:
        processed = process_preference_dataset(**kwargs)
        return cls(processed.data, processed.stats)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.data.row(i)
        if self.reference is not None:
            first = row["first_sequence"]
            row["ref_logps"] = self.reference[first : first + len(row["cu_seqlens"]) - 1]
        return row

    @staticmethod
    def collate(
        rows: list[dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int = 1
    ) -> dict[str, torch.Tensor]:
        return collate_preference(rows, pad_token_id, pad_to_multiple_of)


def collate_preference(
    rows: list[dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """:func:`collate_packed` plus which sequence every position belongs to (-1: padding),
    numbered over the batch so sequences 2k and 2k+1 form unit k; each unit's flag; each
    sequence's last position (reward models); and cached reference log-probs when present."""
    batch = collate_packed(rows, pad_token_id, pad_to_multiple_of)
    width = batch["input_ids"].shape[1]
    seq_index = torch.full_like(batch["input_ids"], -1)
    last, count = [], 0
    for b, row in enumerate(rows):
        bounds = row["cu_seqlens"]
        for start, end in zip(bounds[:-1], bounds[1:]):
            seq_index[b, start:end] = count
            last.append(b * width + end - 1)
            count += 1
    batch.update(
        seq_index=seq_index,
        num_sequences=torch.tensor(count),
        num_units=torch.tensor(count // 2),
        unit_flags=torch.tensor([f for row in rows for f in row["unit_flags"]], dtype=torch.bool),
        last_index=torch.tensor(last, dtype=torch.long),
    )
    if "ref_logps" in rows[0]:
        batch["ref_logps"] = torch.cat([torch.as_tensor(row["ref_logps"]) for row in rows])
    return batch
