"""A torch Dataset over processed rows, and the collator that keeps sample boundaries."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
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


def _row_sequences(seq_row: torch.Tensor) -> list[tuple[int, int, int]]:
    """(sequence number, start, end) of a row's sequences, in order (padding left out)."""
    values, counts = torch.unique_consecutive(seq_row, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [
        (v, s, e) for v, s, e in zip(values.tolist(), [0, *ends[:-1]], ends, strict=True) if v >= 0
    ]


def _prompt_groups(
    ids: list[int], labels: list[int], sequences: list[tuple[int, int, int]]
) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Runs of consecutive sequences with the same untrained prefix (their prompt), each with
    the prompt's length; a sequence whose prompt is a single token stands alone (prompt 0)."""
    groups: list[tuple[int, list[tuple[int, int, int]]]] = []
    for v, s, e in sequences:
        length = next((i for i in range(e - s) if labels[s + i] != IGNORE_INDEX), e - s)
        prompt = ids[s : s + length] if length > 1 else None
        if groups and prompt is not None and groups[-1][0] == length:
            first = groups[-1][1][0][1]
            if ids[first : first + length] == prompt:
                groups[-1][1].append((v, s, e))
                continue
        groups.append((length if prompt is not None else 0, [(v, s, e)]))
    return groups


def share_prompts(
    batch: dict[str, torch.Tensor],
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    one_row: bool = False,
) -> dict[str, torch.Tensor]:
    """A collated batch of :func:`collate_preference` with each prompt run once: in every row,
    consecutive sequences with the same prompt (a pair's chosen and rejected, a GRPO group)
    become one segment, the prompt but its last token first, then each sequence's rest, its
    prompt's last token first, as a branch that attends to the prompt and to itself only
    (``branch_ids``/``root_ids``, see ``model/attention.py``). Positions keep their values, so
    every trained token's log-prob (and each sequence's last hidden state) is the one the
    sequence gets on its own, for fewer tokens; sequence numbers are unchanged.

    ``one_row``: the rows' segments joined into a single row, padded once, for attention that
    runs each segment on its own (``attention.runs_segments``): rows padded to the longest
    one would run their padding through every layer."""
    counter = itertools.count()
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        row = [batch[k][b].tolist() for k in ("input_ids", "labels", "position_ids")]
        rows.append(_branched_row(*row, _row_sequences(batch["seq_index"][b]), counter))
    if one_row:
        rows = [_joined(rows)]
    return _collate_branched(batch, rows, pad_token_id, pad_to_multiple_of)


def _joined(
    rows: list[tuple[dict[str, list[int]], list[int], dict[int, int]]],
) -> tuple[dict[str, list[int]], list[int], dict[int, int]]:
    """Branched rows of :func:`_branched_row` laid end to end as one."""
    out: dict[str, list[int]] = {key: [] for key in rows[0][0]}
    cu, last = [0], {}
    for row, bounds, ends in rows:
        offset = len(out["ids"])
        for key, values in row.items():
            out[key] += values
        cu += [offset + c for c in bounds[1:]]
        last.update({v: offset + position for v, position in ends.items()})
    return out, cu, last


def _branched_row(
    ids: list[int],
    labels: list[int],
    pos: list[int],
    sequences: list[tuple[int, int, int]],
    counter: Iterator[int],
) -> tuple[dict[str, list[int]], list[int], dict[int, int]]:
    """One row of :func:`share_prompts`: its columns, segment bounds and each sequence's last
    position; ``counter`` numbers branches and roots."""
    out: dict[str, list[int]] = {k: [] for k in ("ids", "labels", "pos", "seq", "branch", "root")}
    cu, last = [0], {}

    def put(lo: int, hi: int, seq: int, branch: int, root: int) -> None:
        for key, source in (("ids", ids), ("labels", labels), ("pos", pos)):
            out[key] += source[lo:hi]
        for key, value in (("seq", seq), ("branch", branch), ("root", root)):
            out[key] += [value] * (hi - lo)

    for length, members in _prompt_groups(ids, labels, sequences):
        root = next(counter)
        if length:
            start = members[0][1]
            put(start, start + length - 1, -1, root, root)
        for v, s, e in members:
            branch = next(counter) if length else root
            put(s + max(length - 1, 0), e, v, branch, root)
            last[v] = len(out["ids"]) - 1
        cu.append(len(out["ids"]))
    return out, cu, last


def _collate_branched(
    batch: dict[str, torch.Tensor],
    rows: list[tuple[dict[str, list[int]], list[int], dict[int, int]]],
    pad_token_id: int,
    pad_to_multiple_of: int,
) -> dict[str, torch.Tensor]:
    """:func:`collate_packed` of the branched rows (a segment per prompt group), plus each
    position's sequence, branch and root (-1 on padding: its own root) and each sequence's
    last position."""
    packed = collate_packed(
        [
            {"input_ids": out["ids"], "labels": out["labels"], "position_ids": out["pos"],
             "cu_seqlens": cu}
            for out, cu, _ in rows
        ],
        pad_token_id,
        pad_to_multiple_of,
    )  # fmt: skip
    width = packed["input_ids"].shape[1]
    columns = {"seq_index": "seq", "branch_ids": "branch", "root_ids": "root"}
    for key in columns:
        packed[key] = torch.full((len(rows), width), -1, dtype=torch.long)
    last_index = torch.zeros(int(batch["num_sequences"]), dtype=torch.long)
    for b, (out, _, last) in enumerate(rows):
        for key, source in columns.items():
            packed[key][b, : len(out[source])] = torch.tensor(out[source], dtype=torch.long)
        for v, position in last.items():
            last_index[v] = b * width + position
    packed["last_index"] = last_index
    device = batch["input_ids"].device
    return {**batch, **{k: v.to(device) for k, v in packed.items()}}
