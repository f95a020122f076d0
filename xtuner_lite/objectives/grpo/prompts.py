"""Prompt datasets for RL: rows read by the training loaders, turned into conversations by the
same map fns, rendered by the same template up to the assistant's turn.

A row's final assistant message (an SFT row's answer) is not part of the prompt; every field of
the raw row travels with the prompt for the reward functions (the reference answer, tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from xtuner_lite.data.loaders import expand, load_rows
from xtuner_lite.data.map_fns import MAP_FNS, as_object, pick_map_fn, string_field
from xtuner_lite.data.pipeline import resolve_template, resolve_tokenizer, source_files
from xtuner_lite.errors import DataError, RowError


def question_map_fn(row: Any) -> dict:
    """``{question, ...}`` (GSM8K, MATH-style rows) → one user turn."""
    row = as_object(row)
    return {"messages": [{"role": "user", "content": string_field(row, "question")}]}


PROMPT_MAP_FNS = {**MAP_FNS, "question": question_map_fn}


@dataclass
class Prompt:
    ids: list[int]
    row: dict
    where: str  # file and row, for error messages


@dataclass
class PromptStats:
    rows: int = 0
    prompts: int = 0
    skipped: Counter = field(default_factory=Counter)


def prompt_messages(conversation: dict) -> list[dict]:
    """The messages before the last assistant turn (or all, when none is there)."""
    messages = list(conversation["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise RowError("the conversation has no user turn to answer", field="messages")
    return messages


def process_prompt_dataset(
    data_files: str | list[str],
    tokenizer: Any,
    template: Any = "auto",
    map_fn: Any = "question",
    max_prompt_length: int = 512,
) -> tuple[list[Prompt], PromptStats]:
    """Every row as a tokenized prompt; a row whose prompt is longer than
    ``max_prompt_length`` tokens is skipped and counted; a bad row is an error naming it."""
    tokenizer_ref, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
    template = resolve_template(template, tokenizer, tokenizer_ref)
    convert = pick_map_fn(map_fn, PROMPT_MAP_FNS, "unknown map_fn")
    prompts, stats = [], PromptStats()
    for source in expand(source_files(data_files)):
        rows = load_rows(source)
        for index, raw in enumerate(rows.records):
            where = f"{rows.source}, {rows.locate(index)}"
            stats.rows += 1
            try:
                messages = prompt_messages(convert(raw))
            except RowError as exc:
                raise DataError(exc.reason, rows.source, rows.locate(index), exc.field) from None
            text = template.render_prompt(messages, tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_length:
                stats.skipped[f"prompt longer than max_prompt_length={max_prompt_length}"] += 1
                continue
            prompts.append(Prompt(ids, dict(raw), where))
    stats.prompts = len(prompts)
    if not prompts:
        raise DataError(f"no usable prompt (skipped: {dict(stats.skipped)})", str(data_files))
    return prompts, stats


class PromptDataset(torch.utils.data.Dataset):
    """Prompts for the loader; a micro-batch is a list of them (rollouts make the tensors)."""

    def __init__(self, prompts: list[Prompt], stats: PromptStats):
        self.prompts, self.stats = prompts, stats

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "prompt": self.prompts[i]}

    @staticmethod
    def collate(rows: list[dict], pad_token_id: int = 0, pad_to_multiple_of: int = 1) -> dict:
        return {"prompts": [r["prompt"] for r in rows], "indices": [r["index"] for r in rows]}


__all__ = [
    "PROMPT_MAP_FNS",
    "Prompt",
    "PromptDataset",
    "PromptStats",
    "process_prompt_dataset",
    "question_map_fn",
]
