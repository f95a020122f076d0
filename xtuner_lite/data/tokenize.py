"""Stage 4: tokenize rendered conversations and label only the trained characters.

The whole rendered string is tokenized at once (so tokens match inference exactly) and each token
is trained when any character it covers lies in a trained segment; other tokens get -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xtuner_lite.data.templates import Segment

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def char_mask(segments: list[Segment]) -> tuple[str, np.ndarray]:
    """Join segments; return the text and a per-character 0/1 trained mask."""
    text = "".join(t for t, _ in segments)
    mask = np.zeros(len(text) + 1, dtype=np.int32)  # one spare slot for zero-width tokens at the end
    pos = 0
    for part, trained in segments:
        if trained:
            mask[pos:pos + len(part)] = 1
        pos += len(part)
    return text, mask


def label_tokens(input_ids: list[int], offsets: list[tuple[int, int]], mask: np.ndarray) -> list[int]:
    """Keep a token's id as its label when it covers any trained character, else IGNORE_INDEX."""
    if not input_ids:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    cum = np.concatenate([[0], np.cumsum(mask)])
    starts, ends = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)  # zero-width: look at one char
    trained = (cum[ends] - cum[starts]) > 0
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.where(trained, ids, IGNORE_INDEX).tolist()


def tokenize_rendered(batch: list[list[Segment]], tokenizer: Any, max_length: int | None
                      ) -> list[TokenizedSample]:
    """Tokenize a batch of rendered conversations (fast tokenizers batch this in Rust)."""
    if not batch:
        return []
    texts, masks = zip(*(char_mask(s) for s in batch))
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False)
    out = []
    for ids, offsets, mask in zip(enc["input_ids"], enc["offset_mapping"], masks):
        labels = label_tokens(ids, offsets, mask)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(TokenizedSample(list(ids), labels, truncated))
    return out
