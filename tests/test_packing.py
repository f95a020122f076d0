import random

import numpy as np
import pytest
import torch

from xtuner_lite.data import IGNORE_INDEX, build_packed, collate_packed, pack_indices
from xtuner_lite.data.tokenize import TokenizedBatch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packs_never_split_and_hold_every_sample_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = pack_indices(lengths, 512, seed=seed)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound * 1.02 + 1  # best-fit decreasing is near optimal here


def test_packing_is_seeded():
    lengths = [random.Random(0).randint(1, 100) for _ in range(300)]
    assert pack_indices(lengths, 256, seed=3) == pack_indices(lengths, 256, seed=3)
    assert pack_indices(lengths, 256, seed=3) != pack_indices(lengths, 256, seed=4)


def test_oversized_sample_is_refused():
    with pytest.raises(ValueError):
        pack_indices([10, 600], 512)


def test_rows_carry_positions_and_boundaries():
    tokens = TokenizedBatch(
        np.arange(1, 10, dtype=np.int32),
        np.array([IGNORE_INDEX, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.int32),
        np.array([3, 2, 4]),
        np.zeros(3, dtype=bool),
    )
    data = build_packed(tokens, max_length=9, pack=True, seed=0)
    assert len(data) == 1
    row = data.row(0)
    lengths = [b - a for a, b in zip(row["cu_seqlens"], row["cu_seqlens"][1:])]
    assert sorted(lengths) == [2, 3, 4]
    pos = 0
    for n in lengths:
        assert row["position_ids"][pos : pos + n] == list(range(n))
        assert row["labels"][pos] == IGNORE_INDEX  # never predicted across a boundary
        assert row["labels"][pos + 1 : pos + n] == row["input_ids"][pos + 1 : pos + n]
        pos += n


def test_collate_pads_and_keeps_boundaries():
    rows = [
        {
            "input_ids": [1, 2, 3],
            "labels": [-100, 2, 3],
            "position_ids": [0, 1, 0],
            "cu_seqlens": [0, 2, 3],
        },
        {"input_ids": [4], "labels": [-100], "position_ids": [0], "cu_seqlens": [0, 1]},
    ]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, -100, -100]
    assert batch["cu_seqlens"].tolist() == [0, 2, 3, 4, 6]
    assert batch["position_ids"].dtype == torch.long
    # rounded up to a multiple: one more padding position per row, real tokens unchanged
    wide = collate_packed(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert wide["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert wide["labels"][0].tolist() == [-100, 2, 3, -100]
    assert wide["cu_seqlens"].tolist() == [0, 2, 3, 4, 5, 8]
    assert int(wide["num_tokens"]) == int(batch["num_tokens"]) == 4
