"""``xtuner check-dataset``: show a sample after every pipeline stage, then the dataset's stats.

Trained text is shown in green (and between ⟦ ⟧ when the output is not a terminal), so a wrong
mask is visible at a glance before any GPU time is spent.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from xtuner_lite.config import check_kwargs, load_config, resolve_data_files
from xtuner_lite.data.image_text import image_tokens, process_image_dataset
from xtuner_lite.data.loaders import load_rows
from xtuner_lite.data.map_fns import get_map_fn, validate_conversation
from xtuner_lite.data.pipeline import (
    DatasetStats,
    process_dataset,
    resolve_template,
    resolve_tokenizer,
)
from xtuner_lite.data.preference import PreferenceStats, process_preference_dataset
from xtuner_lite.data.report import report_stats
from xtuner_lite.data.tokenize import IGNORE_INDEX, tokenize_rendered
from xtuner_lite.errors import DataError, RowError
from xtuner_lite.objectives import build_objective
from xtuner_lite.objectives.grpo.prompts import PromptStats, process_prompt_dataset
from xtuner_lite.values import CfgOptions, NonNegativeInt

CLIP = 160  # characters of a long string (or of each end of a long text) shown by default


def _clip_values(value: Any, limit: int | None) -> Any:
    """Long strings in a row elided in the middle, so a sample fits on a screen."""
    if isinstance(value, str):
        return _clip(value, limit)
    if isinstance(value, dict):
        return {k: _clip_values(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip_values(v, limit) for v in value]
    return value


def _runs(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Neighbouring parts with the same trained flag merged into one run."""
    runs: list[tuple[str, bool]] = []
    for part, trained in parts:
        if runs and runs[-1][1] == trained:
            runs[-1] = (runs[-1][0] + part, trained)
        else:
            runs.append((part, trained))
    return runs


def _clip(text: str, limit: int | None) -> str:
    if not limit or len(text) <= 2 * limit:
        return text
    return f"{text[:limit]} … [{len(text) - 2 * limit} characters] … {text[-limit:]}"


def _marked(parts: list[tuple[str, bool]], console: Console, limit: int | None = None) -> Text:
    """Trained runs in green (between ⟦ ⟧ off a terminal); each run's middle elided past
    ``limit`` characters at each end, so its start and its end-of-turn token stay visible."""
    text = Text()
    plain = not console.is_terminal
    for part, trained in _runs(parts):
        part = _clip(part, limit)
        if trained:
            text.append(f"⟦{part}⟧" if plain else part, style="bold green")
        else:
            text.append(part, style="dim")
    return text


def _token_pieces(
    tokenizer: Any, ids: list[int], labels: list[int]
) -> tuple[list[tuple[str, bool]], int]:
    """Each token's text with whether it is trained, and how many are."""
    pieces = [(tokenizer.decode([t]), label != IGNORE_INDEX) for t, label in zip(ids, labels)]
    return pieces, sum(1 for _, trained in pieces if trained)


def show_stages(
    cfg: dict[str, Any], num_samples: int = 1, console: Console | None = None, full: bool = False
) -> None:
    """Print the first ``num_samples`` rows after load, map fn, template and tokenization
    (long texts elided in the middle unless ``full``)."""
    limit = None if full else CLIP
    console = console or Console()
    tokenizer = resolve_tokenizer(cfg["tokenizer"])
    template = resolve_template(cfg.get("template"), tokenizer, cfg["tokenizer"])
    map_fn = get_map_fn(cfg.get("map_fn", "alpaca"))
    files = cfg["data_files"]
    rows = load_rows(files[0] if isinstance(files, (list, tuple)) else files)
    console.print(
        f"[bold]template[/]: {template.name}   [bold]stop words[/]: "
        f"{template.stop_words(tokenizer)}"
    )
    for i in range(min(num_samples, len(rows))):
        where = f"{rows.source} {rows.locate(i)}"
        raw = json.dumps(_clip_values(rows.records[i], limit), ensure_ascii=False, indent=1)
        console.print(Panel(raw, title=f"1. loaded — {where}", title_align="left"))
        try:
            messages, tools = validate_conversation(map_fn(rows.records[i]))
        except RowError as exc:
            raise DataError(
                exc.reason, source=rows.source, location=rows.locate(i), field=exc.field
            ) from None
        console.print(
            Panel(
                json.dumps(_clip_values(messages, limit), ensure_ascii=False, indent=1),
                title="2. after map fn",
                title_align="left",
            )
        )
        segments = template.render(messages, tokenizer, tools)
        console.print(
            Panel(
                _marked(segments, console, limit),
                title="3. chat template (trained = green)",
                title_align="left",
            )
        )
        tokens = tokenize_rendered([segments], tokenizer, cfg.get("max_length"))
        pieces, trained = _token_pieces(tokenizer, *tokens.sample(0))
        console.print(
            Panel(
                _marked(pieces, console, limit),
                title=f"4. tokens: {len(pieces)}, trained {trained}"
                + (" (TRUNCATED)" if tokens.truncated[0] else ""),
                title_align="left",
            )
        )


def _resolved(cfg: dict[str, Any], process: Any) -> tuple[dict[str, Any], Any]:
    """A ``train_dataset`` dict checked against ``process`` with its tokenizer and template
    loaded once (for the preview and the full run), and the tokenizer."""
    cfg = {k: v for k, v in dict(cfg).items() if k != "type"}
    check_kwargs(process, cfg, "train_dataset")
    tokenizer = resolve_tokenizer(cfg["tokenizer"])
    cfg.update(
        tokenizer=tokenizer,
        template=resolve_template(cfg.get("template"), tokenizer, cfg["tokenizer"]),
    )
    return cfg, tokenizer


def check_dataset(
    cfg: dict[str, Any], num_samples: int = 1, console: Console | None = None, full: bool = False
) -> DatasetStats:
    """Show stages for the first rows, process everything, print and return the stats.
    ``full``: show long texts whole."""
    console = console or Console()
    cfg, _ = _resolved(cfg, process_dataset)
    if num_samples:
        show_stages(cfg, num_samples, console, full)
    processed = process_dataset(**cfg)
    stats = processed.stats
    row = processed.data.row(0)
    console.print(
        Panel(
            f"{len(row['cu_seqlens']) - 1} samples, {len(row['input_ids'])} tokens; "
            f"cu_seqlens {row['cu_seqlens'][:8]}{' ...' if len(row['cu_seqlens']) > 8 else ''}; "
            f"position_ids restart at 0 for each sample",
            title="5. first packed row" if stats.packed else "5. first row",
            title_align="left",
        )
    )
    report_stats(stats, console)
    return stats


def check_preference_dataset(
    cfg: dict[str, Any], num_samples: int = 1, console: Console | None = None, full: bool = False
) -> PreferenceStats:
    """Process preference data (``kind`` pairs, or unpaired); show the first units (prompt, then
    each response with its trained span in green) and the dataset and pair statistics."""
    console = console or Console()
    limit = None if full else CLIP
    cfg, tokenizer = _resolved({"kind": "pairs", **dict(cfg)}, process_preference_dataset)
    processed = process_preference_dataset(**cfg)
    data = processed.data
    names = ("chosen", "rejected") if cfg["kind"] == "pairs" else ("completion", "KL completion")
    shown = 0
    for r in range(len(data)):
        row = data.row(r)
        bounds = row["cu_seqlens"]
        for u, flag in enumerate(row["unit_flags"]):
            if shown >= num_samples:
                break
            shown += 1
            title = f"unit {shown}" + ("" if cfg["kind"] == "pairs" else f" (label {bool(flag)})")
            for k, name in enumerate(names):
                lo, hi = bounds[2 * u + k], bounds[2 * u + k + 1]
                pieces, trained = _token_pieces(
                    tokenizer, row["input_ids"][lo:hi], row["labels"][lo:hi]
                )
                console.print(
                    Panel(
                        _marked(pieces, console, limit),
                        title=f"{title} — {name}: {len(pieces)} tokens, trained {trained}",
                        title_align="left",
                    )
                )
        if shown >= num_samples:
            break
    report_stats(processed.stats, console)
    return processed.stats


def check_prompt_dataset(
    cfg: dict[str, Any], num_samples: int = 1, console: Console | None = None, full: bool = False
) -> PromptStats:
    """Read an RL prompt dataset; show the first prompts as the model sees them, with the row
    fields the rewards receive (``full``: whole), and how many rows were kept and skipped."""
    console = console or Console()
    cfg, tokenizer = _resolved(cfg, process_prompt_dataset)
    prompts, stats = process_prompt_dataset(**cfg)
    for i, prompt in enumerate(prompts[:num_samples]):
        fields = json.dumps(prompt.row, ensure_ascii=False)[: None if full else CLIP]
        body = Text(tokenizer.decode(prompt.ids)) + Text(f"\nrow: {fields}", style="dim")
        title = f"prompt {i + 1} ({prompt.where}): {len(prompt.ids)} tokens"
        console.print(Panel(body, title=title, title_align="left"))
    skipped = "; ".join(f"{n} {why}" for why, n in stats.skipped.items()) or "none"
    console.print(f"{stats.prompts} prompts from {stats.rows} rows; skipped: {skipped}")
    return stats


def _image_runs(pieces: list[tuple[str, bool]], image_id_text: str) -> list[tuple[str, bool]]:
    """Token pieces with each run of image tokens shown as one ``<image>×N`` piece (the
    model's image token: ``<|image_pad|>×N`` for Qwen2-VL)."""
    out: list[tuple[str, bool]] = []
    count = 0
    for piece in pieces + [("", False)]:
        if piece[0] == image_id_text:
            count += 1
            continue
        if count:
            out.append((f"{image_id_text}×{count}", False))
            count = 0
        out.append(piece)
    return out[:-1]


def check_image_dataset(
    cfg: dict[str, Any], num_samples: int = 1, console: Console | None = None, full: bool = False
) -> DatasetStats:
    """Process conversations with images; show the first samples' tokens (trained in green)
    with each image's token run as one ``<image>×N``, then the dataset statistics."""
    console = console or Console()
    limit = None if full else CLIP
    cfg, tokenizer = _resolved(cfg, process_image_dataset)
    processed = process_image_dataset(**cfg)
    data = processed.data
    image_text = tokenizer.decode([image_tokens(cfg["processor"], tokenizer).token_id])
    shown = 0
    for r in range(len(data)):
        row = data.row(r)
        bounds = row["cu_seqlens"]
        for lo, hi in zip(bounds, bounds[1:]):
            if shown >= num_samples:
                break
            shown += 1
            pieces, trained = _token_pieces(
                tokenizer, row["input_ids"][lo:hi], row["labels"][lo:hi]
            )
            runs = _image_runs(pieces, image_text)
            images = sum(1 for text, _ in runs if text.startswith(f"{image_text}×"))
            title = f"sample {shown}: {hi - lo} tokens, trained {trained}, image runs {images}"
            console.print(Panel(_marked(runs, console, limit), title=title, title_align="left"))
        if shown >= num_samples:
            break
    console.print(f"{len(data.images)} distinct images, decoded once ({data.images.folder})")
    report_stats(processed.stats, console)
    return processed.stats


# what check-dataset shows for each kind of data an objective reads
SHOW = {
    "sft": check_dataset,
    "images": check_image_dataset,
    "pairs": check_preference_dataset,
    "unpaired": check_preference_dataset,
    "prompts": check_prompt_dataset,
}


def check_config_dataset(
    config: str,
    data: list[str] | None = None,
    show: NonNegativeInt = 1,
    full: bool = False,
    cfg_options: CfgOptions = None,
) -> None:
    """Show a config's data after each pipeline stage.

    Print samples after load, map fn, chat template, tokenization (trained tokens highlighted)
    and packing, then dataset statistics: as the config's objective reads them.

    Args:
        config: config file or name with a train_dataset dict
        data: override train_dataset.data_files
        show: samples to show per stage
        full: show long texts whole (default: their start and end)
        cfg_options: override config keys
    """
    cfg = load_config(config, cfg_options)
    if "train_dataset" not in cfg:
        raise DataError(f"config {config} has no 'train_dataset' dict")
    dataset_cfg = {k: v for k, v in dict(cfg.train_dataset).items() if k != "type"}
    if data:
        dataset_cfg["data_files"] = data
    dataset_cfg["data_files"] = resolve_data_files(
        dataset_cfg.get("data_files"), "--data" if data else "train_dataset.data_files"
    )
    objective = build_objective(cfg.get("objective"))
    dataset_cfg = objective.data_settings(dataset_cfg)
    SHOW[objective.data_kind](dataset_cfg, num_samples=show, full=full)
