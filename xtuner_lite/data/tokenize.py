"""Stage 4: tokenize rendered conversations and label only the trained characters.

The whole rendered string is tokenized at once (so tokens match inference exactly) and each token
is trained when any character it covers lies in a trained segment; other tokens get -100.
Labels are computed for the whole batch in a few numpy operations rather than in a Python loop
over tokens, which would run once per token of the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.data.templates import Segment


@dataclass
class TokenizedBatch:
    """Samples stored end to end: ``lengths[i]`` tokens of sample i follow those of sample i-1."""

    input_ids: np.ndarray  # int32, flat
    labels: np.ndarray  # int32, flat
    lengths: np.ndarray  # int64, per sample (after truncation)
    truncated: np.ndarray  # bool, per sample

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def sample(self, i: int) -> tuple[list[int], list[int]]:
        lo = int(self.starts[i])
        hi = lo + int(self.lengths[i])
        return self.input_ids[lo:hi].tolist(), self.labels[lo:hi].tolist()

    def trained_after_first(self) -> np.ndarray:
        """Trained tokens per sample, not counting the first (it is never predicted)."""
        trained = (self.labels != IGNORE_INDEX).astype(np.int64)
        starts = self.starts
        nonempty = self.lengths > 0
        trained[starts[nonempty]] = 0
        sums = np.zeros(len(self.lengths), dtype=np.int64)
        sums[nonempty] = np.add.reduceat(trained, starts[nonempty])
        return sums

    def select(self, keep: np.ndarray) -> TokenizedBatch:
        token_keep = np.repeat(keep, self.lengths)
        return TokenizedBatch(
            self.input_ids[token_keep],
            self.labels[token_keep],
            self.lengths[keep],
            self.truncated[keep],
        )

    @staticmethod
    def concat(batches: list[TokenizedBatch]) -> TokenizedBatch:
        return TokenizedBatch(
            *(
                np.concatenate([getattr(b, f) for b in batches])
                for f in ("input_ids", "labels", "lengths", "truncated")
            )
        )


def char_mask(segments: list[Segment]) -> tuple[str, np.ndarray]:
    """Join segments; return the text and a per-character 0/1 trained mask (+1 spare slot)."""
    text = "".join(t for t, _ in segments)
    mask = np.zeros(len(text) + 1, dtype=np.int8)
    pos = 0
    for part, trained in segments:
        if trained:
            mask[pos : pos + len(part)] = 1
        pos += len(part)
    return text, mask


def _encode(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: skips transformers' per-row wrapping
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_rendered(
    batch: list[list[Segment]], tokenizer: Any, max_length: int | None
) -> TokenizedBatch:
    """Tokenize rendered conversations; truncate each to ``max_length`` tokens."""
    if not batch:
        empty = np.zeros(0, dtype=np.int32)
        return TokenizedBatch(empty, empty.copy(), np.zeros(0, np.int64), np.zeros(0, bool))
    texts, masks = zip(*(char_mask(s) for s in batch))
    ids_list, offsets_list = _encode(tokenizer, list(texts))
    lengths = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=len(ids_list))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_list), dtype=np.int32, count=total)
    offsets = np.fromiter(
        chain.from_iterable(chain.from_iterable(offsets_list)), dtype=np.int64, count=2 * total
    ).reshape(-1, 2)
    # One cumulative trained-character count over all texts; a token is trained when the count
    # grows inside its character span (a zero-width token looks at one character).
    mask = np.concatenate(masks)
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    text_base = np.concatenate([[0], np.cumsum([len(m) for m in masks])[:-1]])
    base = np.repeat(text_base, lengths)
    starts = base + offsets[:, 0]
    ends = base + np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    labels = np.where(cum[ends] - cum[starts] > 0, ids, IGNORE_INDEX).astype(np.int32)
    tokens = TokenizedBatch(ids, labels, lengths, np.zeros(len(lengths), dtype=bool))
    if max_length is not None and (lengths > max_length).any():
        position = np.arange(total) - np.repeat(tokens.starts, lengths)
        keep = position < max_length
        tokens = TokenizedBatch(
            ids[keep], labels[keep], np.minimum(lengths, max_length), lengths > max_length
        )
    return tokens
