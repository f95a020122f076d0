"""The preference data pipeline: load → map fn → chat template → tokenize → truncate → pack.

A *unit* is what one loss term looks at: a pair (chosen, rejected) or, for KTO, an example
(its completion, and a mismatched completion after the same prompt for the KL estimate). Both
sequences of a unit hold the same prompt tokens, tokenized once; each is labelled only on its
response (and end-of-turn token). Packing places whole units into rows of ``2 × max_length``
tokens, so a unit is never split and every sequence attends only to itself.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xtuner_lite.data import control
from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.data.loaders import Rows, load_rows
from xtuner_lite.data.packing import PackedData, arrange, pack_indices
from xtuner_lite.data.pipeline import (
    DatasetStats,
    ProcessedDataset,
    cache_key,
    check_control_mode,
    dataset_cache_dir,
    guard_control_tokens,
    length_summary,
    load_processed,
    note_skip,
    resolve_template,
    resolve_tokenizer,
    save_processed,
    source_files,
)
from xtuner_lite.data.pref_map_fns import PrefMapFn, get_pref_map_fn, validate_preference
from xtuner_lite.data.templates import Segment, Template
from xtuner_lite.data.tokenize import TokenizedBatch, tokenize_rendered
from xtuner_lite.errors import DataError, RowError, XtunerError

KINDS = ("pairs", "unpaired")


@dataclass
class PreferenceStats(DatasetStats):
    """DatasetStats counted over units (``samples``: units kept; each is two sequences)."""

    kind: str = "pairs"
    units: int = 0  # pairs, or unpaired examples
    prompts_trimmed: int = 0  # units whose prompt lost tokens on the left
    responses_trimmed: int = 0  # units whose responses were cut to a common budget
    desirable: int = 0  # unpaired: examples labelled true
    prompt_mean: float = 0.0
    response_means: list[float] = field(default_factory=list)  # chosen, rejected (completion, KL)
    first_longer: float = 0.0  # share of pairs whose chosen response is the longer one

    @property
    def packing_efficiency(self) -> float:
        """Real tokens per slot: a row holds both sequences of its units, 2 × max_length."""
        slots = self.rows * 2 * self.max_length
        return self.tokens / slots if slots else 0.0


@dataclass
class PreferenceData(PackedData):
    """Sequences stored two per unit (chosen then rejected; completion then its KL sequence),
    with one flag per unit in storage order (unpaired: 1 when desirable)."""

    unit_flags: np.ndarray

    def row(self, i: int) -> dict[str, list[int]]:
        out = super().row(i)
        first = int(self._row_starts[i]) // 2
        out["unit_flags"] = self.unit_flags[first : first + int(self.row_sizes[i]) // 2].tolist()
        out["first_sequence"] = int(self._row_starts[i])
        return out


@dataclass
class _Unit:
    prompt: list[int]
    responses: list[tuple[list[int], list[int]]]  # (ids, labels) of each response
    flag: int
    index: int  # row index in its file


def _render(
    template: Template, tokenizer: Any, prompt: list[dict], responses: list[list[dict]]
) -> tuple[str, list[list[Segment]]]:
    """The prompt text (shared) and each response's segments, from one rendering per response;
    only the response's assistant turns are trained."""
    context = [{**m, "loss": False} for m in prompt]
    shared, tails = None, []
    for response in responses:
        turns = [{**m, "loss": m["role"] == "assistant"} for m in response]
        segments = template.render(context + turns, tokenizer)
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        head = "".join(text for text, _ in segments[:first])
        if shared is None:
            shared = head
        elif head != shared:
            raise RowError("the template renders the prompt differently for the two responses")
        tails.append(segments[first:])
    return shared or "", tails


def _rows_to_units(
    rows: Rows,
    map_fn: PrefMapFn,
    template: Template,
    tokenizer: Any,
    paired: bool,
    control_tokens: str,
) -> tuple[list[_Unit], list[tuple[int, RowError]], int]:
    prompts, tails, flags, indices, errors, flagged = [], [], [], [], [], 0
    tokens = control.control_tokens(tokenizer)
    keys = ("chosen", "rejected") if paired else ("completion",)
    for i, record in enumerate(rows.records):
        try:
            item = validate_preference(map_fn(record), paired)
            messages = [*item["prompt"], *(m for k in keys for m in item[k])]
            guarded, found = guard_control_tokens(messages, tokens, control_tokens)
            flagged += found and control_tokens == "warn"
            n = len(item["prompt"])
            prompt, rest = guarded[:n], guarded[n:]
            responses = [rest[: len(item[keys[0]])]]
            if paired:
                responses.append(rest[len(item[keys[0]]) :])
            text, segments = _render(template, tokenizer, prompt, responses)
        except RowError as exc:
            errors.append((i, exc))
            continue
        except XtunerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user map fn failing: report it per row
            errors.append((i, RowError(f"map fn raised {type(exc).__name__}: {exc}")))
            continue
        prompts.append([(text, False)])
        tails.extend(segments)
        flags.append(1 if paired else int(item["label"]))
        indices.append(i)
    prompt_tokens = tokenize_rendered(prompts, tokenizer, None)
    tail_tokens = tokenize_rendered(tails, tokenizer, None)
    per_unit = 2 if paired else 1
    units = []
    for u, (flag, index) in enumerate(zip(flags, indices)):
        ids, _ = prompt_tokens.sample(u)
        responses = [tail_tokens.sample(per_unit * u + k) for k in range(per_unit)]
        units.append(_Unit(ids, responses, flag, index))
    return units, errors, flagged


def _add_kl_responses(units: list[_Unit], seed: int) -> None:
    """KTO's KL estimate: each example also carries another example's completion after its own
    prompt (a seeded cycle over the dataset, as TRL shifts completions within a batch)."""
    if len(units) < 2:
        raise XtunerError("KTO needs at least 2 examples (its KL term pairs mismatched ones)")
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    for j, u in enumerate(order):
        units[u].responses.append(units[order[(j + 1) % len(order)]].responses[0])


def truncate_unit(
    prompt: list[int], responses: list[tuple[list[int], list[int]]], max_length: int
) -> tuple[list[int], list[tuple[list[int], list[int]]], bool, bool]:
    """Fit ``prompt + response`` of every response into ``max_length``: the prompt first loses
    tokens on the left (down to half the budget), then all responses are cut to one budget, so
    the two sides stay comparable. Returns the pieces and (prompt trimmed, responses cut)."""
    longest = max(len(ids) for ids, _ in responses)
    if len(prompt) + longest <= max_length:
        return prompt, responses, False, False
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    trimmed = keep < len(prompt)
    prompt = prompt[len(prompt) - keep :]
    budget = max_length - len(prompt)
    cut = any(len(ids) > budget for ids, _ in responses)
    return prompt, [(ids[:budget], labels[:budget]) for ids, labels in responses], trimmed, cut


def _sequences(units: list[_Unit], max_length: int, stats: PreferenceStats) -> TokenizedBatch:
    ids, labels, lengths = [], [], []
    for unit in units:
        prompt, responses, trimmed, cut = truncate_unit(unit.prompt, unit.responses, max_length)
        stats.prompts_trimmed += trimmed
        stats.responses_trimmed += cut
        stats.rows_truncated += trimmed or cut
        for response_ids, response_labels in responses:
            ids.extend(prompt)
            ids.extend(response_ids)
            labels.extend([IGNORE_INDEX] * len(prompt))
            labels.extend(response_labels)
            lengths.append(len(prompt) + len(response_ids))
    lengths_array = np.array(lengths, dtype=np.int64)
    return TokenizedBatch(
        np.array(ids, dtype=np.int32),
        np.array(labels, dtype=np.int32),
        lengths_array,
        np.zeros(len(lengths), dtype=bool),
    )


def _unit_rows(
    unit_lengths: np.ndarray, capacity: int, pack: bool, shuffle: bool, seed: int
) -> list[list[int]]:
    if pack:
        return pack_indices(unit_lengths.tolist(), capacity, seed)
    rows = [[u] for u in range(len(unit_lengths))]
    if shuffle:
        random.Random(seed).shuffle(rows)
    return rows


def _skip_identical(units: list[_Unit], max_length: int, skip: Any, paired: bool) -> list[_Unit]:
    """A pair whose two responses are the same tokens after truncation teaches nothing (the
    loss is constant): counted and skipped."""
    if not paired:
        return units
    kept = []
    for unit in units:
        _, responses, _, _ = truncate_unit(unit.prompt, unit.responses, max_length)
        if responses[0][0] == responses[1][0]:
            skip(unit.index, f"chosen and rejected identical after truncation to {max_length}")
            continue
        kept.append(unit)
    return kept


def preference_units(
    records: list[Any],
    tokenizer: Any,
    template: Template,
    max_length: int = 1024,
    source: str = "preference rows",
    map_fn: str | PrefMapFn = "auto",
) -> tuple[PreferenceData, list[int]]:
    """Pairs in their given order, one per row, unpacked (evaluation); bad rows are errors
    naming ``source`` and the row. Returns the data and, per pair, its index in ``records``."""
    rows = Rows(source, list(records))
    units, errors, _ = _rows_to_units(
        rows, get_pref_map_fn(map_fn), template, tokenizer, True, "warn"
    )
    if errors:
        i, error = errors[0]
        raise DataError(error.reason, source=source, location=rows.locate(i), field=error.field)
    stats = PreferenceStats(sources=[source], max_length=max_length)
    tokens = _sequences(units, max_length, stats)
    data = arrange(tokens, [[2 * u, 2 * u + 1] for u in range(len(units))])
    flags = np.ones(len(units), dtype=np.int64)
    data = PreferenceData(
        data.input_ids, data.labels, data.sample_lengths, data.row_sizes, unit_flags=flags
    )
    return data, [u.index for u in units]


def process_preference_dataset(
    data_files: str | os.PathLike | list,
    tokenizer: Any,
    kind: str = "pairs",
    map_fn: str | PrefMapFn = "auto",
    template: str | Template | None = None,
    max_length: int = 1024,
    pack: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    skip_invalid: bool = False,
    use_cache: bool = True,
    control_tokens: str = "warn",
) -> ProcessedDataset:
    """Preference rows → packed units and statistics, cached on disk like SFT data.

    ``kind``: ``pairs`` (DPO, ORPO, SimPO, reward models) or ``unpaired`` (KTO).
    ``max_length`` caps each sequence (prompt + response); packed rows hold ``2 × max_length``.
    Invalid rows (missing or identical responses, wrong types) raise a :class:`DataError` naming
    file, row and field, unless ``skip_invalid``, which counts them by reason instead.
    """
    if kind not in KINDS:
        raise XtunerError(f"train_dataset.kind must be one of {KINDS}, got {kind!r}")
    check_control_mode(control_tokens)
    if max_length < 4:
        raise XtunerError(f"train_dataset.max_length must be at least 4, got {max_length}")
    files = source_files(data_files)
    tokenizer_ref, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
    fn = get_pref_map_fn(map_fn)
    tmpl = resolve_template(template, tokenizer, tokenizer_ref)
    key = None
    if use_cache:
        base = cache_key(
            files,
            tokenizer,
            fn,
            tmpl,
            max_length,
            pack,
            shuffle,
            seed,
            skip_invalid,
            control_tokens,
        )
        key = hashlib.sha256(f"preference:{kind}:{base}".encode()).hexdigest()[:24]
        cached = load_processed(dataset_cache_dir() / key, PreferenceData, PreferenceStats)
        if cached is not None:
            return cached
    result = _process(files, tokenizer, kind, fn, tmpl, max_length, pack, shuffle, seed,
                      skip_invalid, control_tokens)  # fmt: skip
    if key is not None:
        save_processed(dataset_cache_dir() / key, result)
    return result


def _process(
    files, tokenizer, kind, fn, tmpl, max_length, pack, shuffle, seed, skip_invalid, control_tokens
) -> ProcessedDataset:
    paired = kind == "pairs"
    stats = PreferenceStats(sources=files, max_length=max_length, packed=pack, kind=kind)
    skipped: Counter[str] = Counter()
    units: list[_Unit] = []
    for path in files:
        rows = load_rows(path, skip_invalid=skip_invalid)
        stats.rows_loaded += len(rows) + len(rows.invalid)

        def skip(index: int, reason: str, rows: Rows = rows) -> None:
            note_skip(stats, skipped, f"{rows.source} {rows.locate(index)}", reason)

        for where, reason in rows.invalid:
            note_skip(stats, skipped, f"{rows.source} {where}", reason)
        found, errors, flagged = _rows_to_units(rows, fn, tmpl, tokenizer, paired, control_tokens)
        stats.rows_with_control_tokens += flagged
        for i, error in errors:
            if not skip_invalid and not error.skip:
                raise DataError(
                    error.reason, source=rows.source, location=rows.locate(i), field=error.field
                )
            skip(i, error.reason + (f" (field {error.field!r})" if error.field else ""))
        units.extend(_skip_identical(found, max_length, skip, paired))
    stats.rows_skipped = dict(skipped)
    if not units:
        raise DataError(
            f"no usable rows left ({stats.rows_loaded} loaded, "
            f"{sum(skipped.values())} skipped: {dict(skipped)})",
            source=", ".join(files),
        )
    if not paired:
        _add_kl_responses(units, seed)
    tokens = _sequences(units, max_length, stats)
    unit_lengths = tokens.lengths[0::2] + tokens.lengths[1::2]
    rows = _unit_rows(unit_lengths, 2 * max_length, pack, shuffle, seed)
    data = arrange(tokens, [[2 * u + k for u in row for k in (0, 1)] for row in rows])
    order = np.fromiter((u for row in rows for u in row), dtype=np.int64, count=len(units))
    flags = np.array([units[u].flag for u in order], dtype=np.int64)
    data = PreferenceData(
        data.input_ids, data.labels, data.sample_lengths, data.row_sizes, unit_flags=flags
    )
    _fill_stats(stats, data, units, tokens)
    return ProcessedDataset(data, stats)


def _fill_stats(
    stats: PreferenceStats, data: PreferenceData, units: list[_Unit], tokens: TokenizedBatch
) -> None:
    stats.units = len(units)
    stats.samples = len(units)  # rows kept (each gives two sequences)
    stats.rows = len(data)
    stats.tokens, stats.trained_tokens = data.num_tokens, data.num_trained_tokens
    stats.desirable = int(sum(u.flag for u in units)) if stats.kind == "unpaired" else 0
    trained = (tokens.labels != IGNORE_INDEX).astype(np.int64)
    per_sequence = np.add.reduceat(trained, tokens.starts) if len(trained) else trained
    stats.prompt_mean = float(np.mean([len(u.prompt) for u in units]))
    stats.response_means = [float(per_sequence[0::2].mean()), float(per_sequence[1::2].mean())]
    stats.first_longer = float((per_sequence[0::2] > per_sequence[1::2]).mean())
    stats.lengths = length_summary(tokens.lengths)


__all__ = [
    "PreferenceData",
    "preference_units",
    "PreferenceStats",
    "process_preference_dataset",
    "truncate_unit",
]
