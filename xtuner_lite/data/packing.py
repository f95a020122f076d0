"""Stage 5: pack whole samples into rows of at most ``max_length`` tokens, never splitting one.

Best-fit decreasing: longest samples first, each into the fullest row that still has room. It
fills rows far better than packing in arrival order, and a sample is never cut across two rows
(XTuner's concat-and-split does cut, which trains on answers without their questions).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np

from xtuner_lite.data.tokenize import IGNORE_INDEX, TokenizedBatch


def pack_indices(lengths: list[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """Group sample indices into bins whose lengths sum to at most ``max_length``; seeded order."""
    if any(n > max_length for n in lengths):
        raise ValueError("truncate samples to max_length before packing")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # random tie-breaking among equal lengths
    order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin id)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    rng.shuffle(bins)
    return bins


@dataclass
class PackedData:
    """Flat storage for (packed) rows: tokens of all samples end to end, plus boundaries.

    ``sample_lengths`` lists each sample's length in storage order; ``row_sizes`` says how many
    consecutive samples form each row (all ones when not packed).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    sample_lengths: np.ndarray
    row_sizes: np.ndarray

    def __post_init__(self):
        self._sample_starts = np.concatenate([[0], np.cumsum(self.sample_lengths)])
        self._row_starts = np.concatenate([[0], np.cumsum(self.row_sizes)])

    def __len__(self) -> int:
        return len(self.row_sizes)

    def row(self, i: int) -> dict[str, list[int]]:
        """One row with per-sample position_ids and cumulative sequence lengths (cu_seqlens)."""
        first, last = self._row_starts[i], self._row_starts[i + 1]
        lo, hi = self._sample_starts[first], self._sample_starts[last]
        lengths = self.sample_lengths[first:last]
        return {
            "input_ids": self.input_ids[lo:hi].tolist(),
            "labels": self.labels[lo:hi].tolist(),
            "position_ids": np.concatenate([np.arange(n) for n in lengths]).tolist(),
            "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).tolist(),
        }

    @property
    def num_tokens(self) -> int:
        return int(self.sample_lengths.sum())

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def build_packed(
    tokens: TokenizedBatch, max_length: int, pack: bool, seed: int = 0, shuffle: bool = True
) -> PackedData:
    """Arrange tokenized samples into rows (packed, or one per row); see :func:`arrange`."""
    lengths = tokens.lengths
    if pack:
        rows = pack_indices(lengths.tolist(), max_length, seed)
    else:
        rows = [[i] for i in range(len(lengths))]
        if shuffle:
            random.Random(seed).shuffle(rows)
    return arrange(tokens, rows)


def arrange(tokens: TokenizedBatch, rows: list[list[int]]) -> PackedData:
    """Samples in the order and grouping of ``rows`` (lists of sample indices); a sample's
    first label is masked.

    Masking the first label keeps packed loss equal to per-sample loss: in a packed row the
    previous sample's last token would otherwise be trained to predict this sample's first.
    """
    lengths = tokens.lengths
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    sample_lengths = lengths[order]
    new_starts = np.concatenate([[0], np.cumsum(sample_lengths)[:-1]]).astype(np.int64)
    # gather index: for each token in the new order, where it sits in the old flat arrays
    gather = np.arange(int(sample_lengths.sum())) + np.repeat(
        tokens.starts[order] - new_starts, sample_lengths
    )
    input_ids = tokens.input_ids[gather]
    labels = tokens.labels[gather]
    labels[new_starts[sample_lengths > 0]] = IGNORE_INDEX
    return PackedData(
        input_ids, labels, sample_lengths, np.array([len(r) for r in rows], dtype=np.int64)
    )
