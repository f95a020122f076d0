"""The SFT data pipeline end to end: load → map fn → chat template → tokenize → pack, cached.

Each stage is a plain function in its own module; this one strings them together, counts what is
skipped and why, fans large inputs out over processes, and caches the result on disk keyed by
everything that changes it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from xtuner_lite.data import control
from xtuner_lite.data.loaders import Rows, expand, load_rows
from xtuner_lite.data.map_fns import MapFn, get_map_fn, validate_conversation
from xtuner_lite.data.packing import PackedData, build_packed
from xtuner_lite.data.templates import Template, get_template
from xtuner_lite.data.tokenize import TokenizedBatch, tokenize_rendered
from xtuner_lite.errors import DataError, RowError, XtunerError
from xtuner_lite.hub import cache_dir, default_template_for, load_tokenizer

CACHE_VERSION = "3"
PARALLEL_MIN_ROWS = 20_000
CHUNK_ROWS = 2_000


@dataclass
class DatasetStats:
    """What happened to the data: every skipped row is counted under its reason."""

    sources: list[str]
    rows_loaded: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    rows_truncated: int = 0
    rows_with_control_tokens: int = 0  # kept with chat-control token text in a message
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    packed: bool = True
    lengths: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def packing_efficiency(self) -> float:
        """Real tokens per slot: each row is max_length slots when packed or padded to it."""
        slots = self.rows * self.max_length
        return self.tokens / slots if slots else 0.0


@dataclass
class ProcessedDataset:
    data: PackedData
    stats: DatasetStats


# ---------------------------------------------------------------- per-row work (also in workers)

_WORKER: dict[str, Any] = {}


@dataclass
class ChunkResult:
    """Tokens of the rows that made it through, their row indices, and the rows that failed."""

    tokens: TokenizedBatch
    indices: np.ndarray
    errors: list[tuple[int, RowError]]
    flagged: int = 0  # rows with control-token text


def guard_control_tokens(
    messages: list[dict], tokens: list[str], mode: str
) -> tuple[list[dict], bool]:
    """Messages with control-token text escaped (``escape``) or refused (``skip``); and whether
    any was found."""
    found = next(
        (t for m in messages if (t := control.find_control_token(m["content"], tokens))), None
    )
    if found is None:
        return messages, False
    if mode == "skip":
        raise RowError(
            f"message text contains the control token {found!r}", field="messages", skip=True
        )
    if mode == "escape":
        messages = [{**m, "content": control.escape(m["content"], tokens)} for m in messages]
    return messages, True


def _process_records(
    records: list[Any],
    tokenizer: Any,
    map_fn: MapFn,
    template: Template,
    max_length: int,
    offset: int = 0,
    control_tokens: str = "warn",
) -> ChunkResult:
    rendered, indices, errors, flagged = [], [], [], 0
    tokens = control.control_tokens(tokenizer)
    for i, record in enumerate(records, start=offset):
        try:
            messages, tools = validate_conversation(map_fn(record))
            messages, found = guard_control_tokens(messages, tokens, control_tokens)
            flagged += found and control_tokens == "warn"  # kept as they are: at risk
            rendered.append(template.render(messages, tokenizer, tools))
            indices.append(i)
        except RowError as exc:
            errors.append((i, exc))
        except XtunerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user map fn failing: report it per row
            errors.append((i, RowError(f"map fn raised {type(exc).__name__}: {exc}")))
    return ChunkResult(
        tokenize_rendered(rendered, tokenizer, max_length),
        np.array(indices, dtype=np.int64),
        errors,
        flagged,
    )


def _worker_chunk(bounds: tuple[int, int]) -> ChunkResult:
    w = _WORKER
    return _process_records(
        w["records"][bounds[0] : bounds[1]],
        w["tokenizer"],
        w["map_fn"],
        w["template"],
        w["max_length"],
        offset=bounds[0],
        control_tokens=w["control_tokens"],
    )


def _run(
    records: list[Any],
    tokenizer: Any,
    map_fn: MapFn,
    template: Template,
    max_length: int,
    num_proc: int,
    control_tokens: str = "warn",
) -> ChunkResult:
    if num_proc <= 1:
        return _process_records(
            records, tokenizer, map_fn, template, max_length, control_tokens=control_tokens
        )

    _WORKER.update(
        records=records,
        tokenizer=tokenizer,
        map_fn=map_fn,
        template=template,
        max_length=max_length,
        control_tokens=control_tokens,
    )  # inherited by forked
    # workers, never pickled
    chunks = [(i, min(i + CHUNK_ROWS, len(records))) for i in range(0, len(records), CHUNK_ROWS)]
    try:
        with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_worker_chunk, chunks))
    finally:
        _WORKER.clear()
    return ChunkResult(
        TokenizedBatch.concat([p.tokens for p in parts]),
        np.concatenate([p.indices for p in parts]),
        [e for p in parts for e in p.errors],
        sum(p.flagged for p in parts),
    )


# ---------------------------------------------------------------- cache keys


def _file_digest(path: str) -> str:
    p = Path(path).expanduser()
    digest = hashlib.sha256()
    if not p.exists():  # a hub id: keyed by name (the hub's cache holds its files)
        digest.update(path.encode())
        return digest.hexdigest()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _callable_digest(fn: Any) -> str:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}:{source}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = [tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((text + repr(extra)).encode()).hexdigest()


def cache_key(
    files: list[str],
    tokenizer: Any,
    map_fn: MapFn,
    template: Template,
    max_length: int,
    pack: bool,
    shuffle: bool,
    seed: int,
    skip_invalid: bool,
    control_tokens: str = "warn",
) -> str:
    template_id = (
        repr(template)
        if not hasattr(template, "tokenizer")
        else f"auto:{template.tokenizer.chat_template}"
    )
    parts = [
        CACHE_VERSION,
        *(_file_digest(f) for f in files),
        tokenizer_fingerprint(tokenizer),
        _callable_digest(map_fn),
        template_id,
        str(max_length),
        str(pack),
        str(shuffle),
        str(seed),
        str(skip_invalid),
        control_tokens,
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def save_processed(target: Path, result: ProcessedDataset) -> None:
    """The processed arrays and their statistics under ``target``, written atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    d = result.data
    save_file({f.name: getattr(d, f.name) for f in fields(d)}, str(tmp / "data.safetensors"))
    (tmp / "stats.json").write_text(json.dumps(asdict(result.stats), indent=1))
    try:
        os.replace(tmp, target)  # atomic; a concurrent writer of the same key may win, that's fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_processed(
    target: Path, data_type: type = PackedData, stats_type: type = DatasetStats
) -> ProcessedDataset | None:
    """What :func:`save_processed` wrote, or None when nothing is there."""
    if not (target / "stats.json").exists():
        return None
    arrays = load_file(str(target / "data.safetensors"))
    stats = stats_type(**json.loads((target / "stats.json").read_text()))
    stats.from_cache = True
    return ProcessedDataset(data_type(**arrays), stats)


def dataset_cache_dir() -> Path:
    """Processed datasets live here; override with ``XTUNER_LITE_DATA_CACHE``."""

    return Path(os.environ.get("XTUNER_LITE_DATA_CACHE") or cache_dir() / "datasets")


# ---------------------------------------------------------------- the pipeline


def resolve_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def resolve_template(
    template: str | Template | None, tokenizer: Any, tokenizer_ref: Any
) -> Template:
    if template is None:
        template = default_template_for(str(tokenizer_ref)) or "auto"
    return get_template(template, tokenizer)


def source_files(data_files: str | os.PathLike | list) -> list[str]:
    """The data files a ``data_files`` setting names (globs expanded); none is an error."""
    many = isinstance(data_files, (list, tuple))
    files = expand([str(f) for f in (data_files if many else [data_files])])
    if not files:
        raise XtunerError("train_dataset.data_files is empty")
    return files


def check_control_mode(control_tokens: str) -> None:
    if control_tokens not in control.MODES:
        raise XtunerError(
            f"train_dataset.control_tokens must be one of {control.MODES}, got {control_tokens!r}"
        )


def note_skip(stats: DatasetStats, skipped: Counter, where: str, reason: str) -> None:
    """Count a skipped row under its reason; keep the first 20 as examples."""
    skipped[reason] += 1
    if len(stats.skipped_examples) < 20:
        stats.skipped_examples.append(f"{where}: {reason}")


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of sample lengths, as the stats report them."""
    return {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
        "max": int(lengths.max()),
    }


def process_dataset(
    data_files: str | os.PathLike | list,
    tokenizer: Any,
    map_fn: str | MapFn = "alpaca",
    template: str | Template | None = None,
    max_length: int = 2048,
    pack: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    skip_invalid: bool = False,
    use_cache: bool = True,
    num_proc: int | None = None,
    control_tokens: str = "warn",
) -> ProcessedDataset:
    """Run the whole pipeline on one or more data sources and return packed rows and stats.

    ``tokenizer`` is a tokenizer or any model reference; ``template`` None picks the model's own
    (the embedded model's template, else ``auto``). Invalid rows raise a :class:`DataError`
    naming file, row and field, unless ``skip_invalid``, which counts them by reason instead.
    ``control_tokens``: what to do with rows whose message text contains a chat-control token
    (``<|im_start|>`` ...), which would otherwise forge turns: ``warn`` (count them, keep them
    as they are), ``escape`` (make the text plain) or ``skip`` (count and drop them).
    """
    files = source_files(data_files)
    check_control_mode(control_tokens)
    if max_length < 2:
        raise XtunerError(f"max_length must be at least 2, got {max_length}")
    tokenizer_ref, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
    fn = get_map_fn(map_fn)
    tmpl = resolve_template(template, tokenizer, tokenizer_ref)

    key = None
    if use_cache:
        key = cache_key(files, tokenizer, fn, tmpl, max_length, pack, shuffle, seed,
                        skip_invalid, control_tokens)  # fmt: skip
        cached = load_processed(dataset_cache_dir() / key)
        if cached is not None:
            return cached

    stats = DatasetStats(sources=files, max_length=max_length, packed=pack)
    skipped: Counter[str] = Counter()
    kept = [_tokenize_file(path, tokenizer, fn, tmpl, max_length, num_proc, skip_invalid,
                           control_tokens, stats, skipped) for path in files]  # fmt: skip
    stats.rows_skipped = dict(skipped)
    tokens = TokenizedBatch.concat(kept)
    if len(tokens.lengths) == 0:
        raise DataError(
            f"no usable rows left ({stats.rows_loaded} loaded, "
            f"{sum(skipped.values())} skipped: {dict(skipped)})",
            source=", ".join(files),
        )
    stats.samples = len(tokens.lengths)
    data = build_packed(tokens, max_length, pack, seed, shuffle)
    stats.rows = len(data)
    stats.tokens, stats.trained_tokens = data.num_tokens, data.num_trained_tokens
    stats.lengths = length_summary(data.sample_lengths)
    result = ProcessedDataset(data, stats)
    if key is not None:
        save_processed(dataset_cache_dir() / key, result)
    return result


def _tokenize_file(
    path: str, tokenizer: Any, fn: MapFn, tmpl: Template, max_length: int,
    num_proc: int | None, skip_invalid: bool, control_tokens: str,
    stats: DatasetStats, skipped: Counter[str],
) -> TokenizedBatch:  # fmt: skip
    """One file's rows mapped, rendered and tokenized; what is skipped counted in ``stats``
    and ``skipped`` (a bad row raises unless ``skip_invalid``)."""
    rows: Rows = load_rows(path, skip_invalid=skip_invalid)

    def skip(index: int, reason: str) -> None:
        note_skip(stats, skipped, f"{rows.source} {rows.locate(index)}", reason)

    stats.rows_loaded += len(rows) + len(rows.invalid)
    for where, reason in rows.invalid:
        note_skip(stats, skipped, f"{rows.source} {where}", reason)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(rows) >= PARALLEL_MIN_ROWS else 1
    result = _run(rows.records, tokenizer, fn, tmpl, max_length, num_proc, control_tokens)
    stats.rows_with_control_tokens += result.flagged
    for i, error in result.errors:
        if not skip_invalid and not error.skip:
            raise DataError(
                error.reason, source=rows.source, location=rows.locate(i), field=error.field
            )
        skip(i, error.reason + (f" (field {error.field!r})" if error.field else ""))
    trainable = result.tokens.trained_after_first() > 0
    for i in result.indices[~trainable]:
        skip(int(i), f"no trained token left after truncation to max_length={max_length}")
    tokens = result.tokens.select(trainable)
    stats.rows_truncated += int(tokens.truncated.sum())
    return tokens
