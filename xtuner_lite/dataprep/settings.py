"""The ``xtuner data prepare`` config: a pure-Python file (or dict) with four sections.

    inputs = dict(data_files=[...], kind="text" | "sft", text_key="text")
    stages = [dict(type="normalize"), dict(type="language", languages=["en"]), ...]
    output = "data/clean"
    run = dict(tasks=4, workers=2, executor="local")

Every problem (unknown section, stage or setting, wrong type) is collected and raised at once,
naming the key, before any work starts.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from xtuner_lite.config import find_config, resolve_data_files
from xtuner_lite.dataprep.reader import HTML, KINDS, SUFFIXES
from xtuner_lite.dataprep.stages import language_identifier
from xtuner_lite.errors import XtunerError, did_you_mean

SECTIONS = ("inputs", "stages", "output", "run")
EXECUTORS = ("local", "slurm", "ray")
RAY_KEYS = ("init", "cpus_per_task", "mem_per_cpu_gb")
# what `run.slurm` may set: datatrove's Slurm executor settings that are not ours to choose
SLURM_OWN = ("pipeline", "tasks", "depends", "depends_job_id", "logging_dir", "job_name",
             "skip_completed", "job_id_retriever", "job_id_position")  # fmt: skip
# datatrove's own quality filters, configured with their own keyword arguments
QUALITY_FILTERS = {
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}
TEXT_REWRITING = (
    "html_to_text",
    "normalize",
    "pii",
)  # stages that change the text (text inputs only)
DEDUP = ("exact_dedup", "minhash_dedup")


class PrepareConfigError(XtunerError):
    """Every problem found in a data-preparation config, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"data-preparation config {source} has {len(problems)} problem(s):\n{lines}"
        )


# The typed signatures below are the schema of each stage's settings.


def html_to_text(favour_precision: bool = True, timeout: float = 5.0) -> None:
    """Main text of HTML pages (trafilatura); must be the first stage."""


def normalize(form: str = "NFKC", collapse_spaces: bool = True) -> None:
    """Unicode normal form and whitespace."""


def language(languages: list = ("en",), min_score: float = 0.65) -> None:
    """Language identification (langid.py) keeping the listed ISO 639-1 codes."""


def pii(emails: bool = True, ips: bool = True, phones: bool = True) -> None:
    """Mask e-mail addresses, public IP addresses and phone numbers."""


def blocklist(words: list = (), words_file: str = "", max_hits: int = 0) -> None:
    """Drop documents with more than ``max_hits`` block-listed words or phrases."""


def decontaminate(
    tasks: list = (), files: list = (), data_root: str = "", ngram: int = 13, max_hits: int = 0
) -> None:
    """Drop documents sharing a word n-gram with evaluation tasks (their files under
    ``data_root``, as ``xtuner eval --data-root``) or files."""


def exact_dedup() -> None:
    """Keep one document of each group with identical (normalized) text."""


def minhash_dedup(
    ngram: int = 5, buckets: int = 14, hashes_per_bucket: int = 8, threshold: float = 0.0
) -> None:
    """Near-duplicate removal by MinHash LSH; ``threshold`` (0-1), when set, picks the bands."""


OWN_STAGES = {
    f.__name__: f
    for f in (
        html_to_text,
        normalize,
        language,
        pii,
        blocklist,
        decontaminate,
        exact_dedup,
        minhash_dedup,
    )
}
STAGE_TYPES = tuple(OWN_STAGES) + tuple(QUALITY_FILTERS)


@dataclass
class StageConfig:
    type: str
    settings: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        """Unique name within a run: ``3_language``."""
        return f"{self.index}_{self.type}"


@dataclass
class PrepareConfig:
    data_files: list[str]
    kind: str
    text_key: str
    stages: list[StageConfig]
    output: Path
    tasks: int = 4
    workers: int = 1
    executor: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output"] = str(self.output)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrepareConfig:
        stages = [StageConfig(**s) for s in raw["stages"]]
        return cls(**{**raw, "stages": stages, "output": Path(raw["output"])})


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or default is inspect.Parameter.empty:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _settings_problems(where: str, fn: Any, settings: dict[str, Any]) -> list[str]:
    params = {
        n: p
        for n, p in inspect.signature(fn).parameters.items()
        if n != "exclusion_writer" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    problems = []
    for key, value in settings.items():
        if key not in params:
            hint = get_close_matches(key, list(params), n=1)
            problems.append(
                f"{where}: unknown setting {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (accepted: {', '.join(params) or 'none'})"
            )
        elif not _type_ok(value, params[key].default):
            expected = type(params[key].default).__name__
            problems.append(f"{where}.{key}: expected {expected}, got {value!r}")
    return problems


def _language_problems(where: str, languages: Any) -> list[str]:
    """Every code must be one langid.py knows: an unknown one would silently keep nothing."""
    if not languages:
        return [f"{where}.languages: name at least one language code"]
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
        return []  # the type check reports it
    known = sorted(language_identifier().nb_classes)
    return [
        f"{where}.languages: unknown language code {code!r}{did_you_mean(str(code), known)} "
        f"(ISO 639-1 codes langid.py knows: {', '.join(known)})"
        for code in languages
        if code not in known
    ]


def _stage_problems(where: str, stage_type: str, settings: dict[str, Any]) -> list[str]:
    fn = OWN_STAGES.get(stage_type) or QUALITY_FILTERS[stage_type]
    problems = _settings_problems(where, fn, settings)
    if stage_type == "language":
        problems += _language_problems(where, settings.get("languages", ["en"]))
    if stage_type == "blocklist":
        if not settings.get("words") and not settings.get("words_file"):
            problems.append(f"{where}: give words=[...] or words_file=PATH")
        wf = settings.get("words_file")
        if wf and not Path(wf).is_file():
            problems.append(f"{where}.words_file: {wf} not found")
    if stage_type == "decontaminate" and not settings.get("tasks") and not settings.get("files"):
        problems.append(f"{where}: give tasks=[...] (evaluation task names) or files=[...]")
    if stage_type == "minhash_dedup":
        threshold = settings.get("threshold", 0.0)
        if _type_ok(threshold, 0.0) and not 0 <= threshold < 1:
            problems.append(f"{where}.threshold: must be in [0, 1), got {threshold}")
    timeout = settings.get("timeout", 1.0)
    if stage_type == "html_to_text" and _type_ok(timeout, 1.0) and timeout <= 0:
        problems.append(f"{where}.timeout: must be positive (seconds per page), got {timeout}")
    for key in ("ngram", "buckets", "hashes_per_bucket"):
        value = settings.get(key)
        if isinstance(value, int) and value < 1:
            problems.append(f"{where}.{key}: must be at least 1, got {value}")
    return problems


def _stages(raw: Any, kind: str, problems: list[str]) -> list[StageConfig]:
    if not isinstance(raw, (list, tuple)):
        problems.append(f"stages: expected a list of dict(type=...), got {type(raw).__name__}")
        return []
    stages = []
    for index, entry in enumerate(raw):
        where = f"stages[{index}]"
        if not isinstance(entry, dict) or "type" not in entry:
            problems.append(f"{where}: expected dict(type=..., ...), got {entry!r}")
            continue
        settings = {k: v for k, v in entry.items() if k != "type"}
        stage_type = entry["type"]
        if stage_type not in STAGE_TYPES:
            hint = get_close_matches(str(stage_type), STAGE_TYPES, n=1)
            problems.append(
                f"{where}.type: unknown stage {stage_type!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (stages: {', '.join(STAGE_TYPES)})"
            )
            continue
        where = f"{where} ({stage_type})"
        if kind == "sft" and stage_type in TEXT_REWRITING:
            problems.append(
                f"{where}: rewrites text, but SFT rows are written back as they are; "
                "on SFT data only filters and deduplication run"
            )
        problems += _stage_problems(where, stage_type, settings)
        stages.append(StageConfig(stage_type, settings, index))
    return stages


def _inputs(raw: Any, problems: list[str]) -> tuple[list[str], str, str]:
    if not isinstance(raw, dict):
        problems.append("inputs: expected dict(data_files=[...], kind='text'|'sft')")
        return [], "text", "text"
    for key in raw:
        if key not in ("data_files", "kind", "text_key"):
            problems.append(f"inputs: unknown key {key!r} (accepted: data_files, kind, text_key)")
    kind = raw.get("kind", "text")
    if kind not in KINDS:
        problems.append(f"inputs.kind: expected one of {KINDS}, got {kind!r}")
    files = raw.get("data_files")
    if not files:
        problems.append("inputs.data_files: name at least one file")
        return [], kind, raw.get("text_key", "text")
    files = [files] if isinstance(files, str) else list(files)
    expanded = []
    for ref in files:
        try:
            found = resolve_data_files(str(ref), "inputs.data_files")
        except XtunerError as exc:
            problems.append(str(exc))
            continue
        matches = sorted(Path().glob(found)) if any(c in found for c in "*?[") else [Path(found)]
        if not matches:
            problems.append(f"inputs.data_files: {ref} matches no file")
        for path in matches:
            if path.suffix.lower() not in SUFFIXES:
                problems.append(
                    f"inputs.data_files: {path}: unsupported type (read: {', '.join(SUFFIXES)})"
                )
            expanded.append(str(path))
    return expanded, kind, raw.get("text_key", "text")


def _html_problems(files: list[str], kind: str, stages: list[StageConfig]) -> list[str]:
    """HTML pages are turned into text first, by the first stage."""
    problems = []
    pages = [f for f in files if Path(f).suffix.lower() in HTML]
    first = stages[0].type if stages else None
    for stage in stages[1:]:
        if stage.type == "html_to_text":
            problems.append(f"stages[{stage.index}] (html_to_text): must be the first stage")
    if pages and kind == "sft":
        problems.append(f"inputs.data_files: {pages[0]} is an HTML page; pages are text, "
                        "not SFT rows (kind='text')")  # fmt: skip
    elif pages and first != "html_to_text":
        problems.append(f"inputs.data_files: {pages[0]} is an HTML page; make "
                        "dict(type='html_to_text') the first stage")  # fmt: skip
    if any(s.type == "html_to_text" for s in stages) and find_spec("trafilatura") is None:
        problems.append("html_to_text needs trafilatura: pip install 'xtuner_lite[data]'")
    return problems


def _run(raw: Any, problems: list[str]) -> dict[str, Any]:
    accepted = {"tasks": 4, "workers": 1, "executor": "local", "slurm": {}, "ray": {}}
    if raw is None:
        return accepted
    if not isinstance(raw, dict):
        problems.append("run: expected dict(tasks=..., workers=..., executor=...)")
        return accepted
    out = dict(accepted)
    for key, value in raw.items():
        if key not in accepted:
            hint = get_close_matches(key, list(accepted), n=1)
            problems.append(
                f"run: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        elif key in ("tasks", "workers") and not (_type_ok(value, 1) and value >= 1):
            problems.append(f"run.{key}: expected a positive integer, got {value!r}")
        elif key == "executor" and value not in EXECUTORS:
            problems.append(f"run.executor: expected one of {EXECUTORS}, got {value!r}")
        elif key == "slurm" and _slurm_problems(value):
            problems += _slurm_problems(value)
        elif key == "ray" and (not isinstance(value, dict) or set(value) - set(RAY_KEYS)):
            problems.append(f"run.ray: expected a dict with keys among {RAY_KEYS}, got {value!r}")
        else:
            out[key] = value
    return out


def _slurm_problems(value: Any) -> list[str]:
    if not isinstance(value, dict):
        return [f"run.slurm: expected dict(partition=..., time=...), got {value!r}"]
    params = inspect.signature(SlurmPipelineExecutor).parameters
    allowed = [n for n in params if n not in SLURM_OWN]
    problems = []
    for key in value:
        if key not in allowed:
            hint = get_close_matches(key, allowed, n=1)
            problems.append(f"run.slurm: unknown setting {key!r}"
                            + (f"; did you mean {hint[0]!r}?" if hint else ""))  # fmt: skip
    return problems


def parse_prepare_config(cfg: dict[str, Any], source: str = "<dict>") -> PrepareConfig:
    """Validated settings, or one :class:`PrepareConfigError` listing every problem."""
    problems: list[str] = []
    for key in cfg:
        if key not in SECTIONS and not key.startswith("_") and isinstance(cfg[key], (dict, list)):
            hint = get_close_matches(key, SECTIONS, n=1)
            problems.append(
                f"unknown section {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (sections: {', '.join(SECTIONS)})"
            )  # fmt: skip
    files, kind, text_key = _inputs(cfg.get("inputs"), problems)
    stages = _stages(cfg.get("stages", []), kind, problems)
    problems += _html_problems(files, kind, stages)
    run = _run(cfg.get("run"), problems)
    output = cfg.get("output")
    if not isinstance(output, (str, Path)) or not str(output):
        problems.append("output: name the folder to write to, e.g. output='data/clean'")
    if run["executor"] == "slurm" and not run["slurm"].get("partition"):
        problems.append("run.slurm.partition: the Slurm partition to submit to")
    if problems:
        raise PrepareConfigError(source, problems)
    return PrepareConfig(files, kind, text_key, stages, Path(output), source=source, **run)


def load_prepare_config(ref: str | dict, overrides: dict[str, Any] | None = None) -> PrepareConfig:
    """A config file (pure Python, read like the training configs) or dict, validated."""
    if isinstance(ref, dict):
        cfg, source = dict(ref), "<dict>"
    else:
        from mmengine.config import Config  # slow to import; only for config files

        path = find_config(ref)  # a path, or a bundled config's name
        try:
            cfg, source = Config.fromfile(str(path)).to_dict(), str(path)
        except Exception as exc:  # noqa: BLE001 - a config is user code: show its error
            raise XtunerError(
                f"could not load config {path}: {type(exc).__name__}: {exc}"
            ) from None
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    return parse_prepare_config(cfg, source)
