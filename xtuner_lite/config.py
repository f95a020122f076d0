"""Config files: pure-Python mmengine configs, found by path or by name among the bundled ones
(``xtuner_lite/configs``, shipped in the wheel), and the data paths they name."""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from xtuner_lite.errors import XtunerError

PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_ROOT / "configs"
# example data shipped in the package; a bundled config names it "examples/data/<file>"
BUNDLED_DATA = PACKAGE_ROOT
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
SECTIONS = (
    "model",
    "train_dataset",
    "train",
    "objective",
    "seed",
    "work_dir",
)  # what a config defines


def find_config(ref: str) -> Path:
    """A config path, or a name like ``smollm2_135m_alpaca_lora`` looked up under configs/."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    name = path.stem if path.suffix == ".py" else str(ref)
    matches = [p for p in CONFIG_ROOT.rglob("*.py") if p.stem == name and "_base_" not in p.parts]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise XtunerError(f"config name {ref!r} is ambiguous: {[str(m) for m in matches]}")
    names = [p.stem for p in CONFIG_ROOT.rglob("*.py") if "_base_" not in p.parts]
    hint = get_close_matches(name, names, n=1)
    raise XtunerError(
        f"config {ref!r} is neither a file nor a known config name"
        + (f"; did you mean {hint[0]!r}?" if hint else "; see `xtuner list-cfg`")
    )


def parse_cfg_options(items: list[str] | None) -> dict[str, Any]:
    """``key.sub=value`` pairs; values are parsed as Python literals where they can be."""

    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise XtunerError(f"--cfg-options expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def load_config(ref: str, cfg_options: list[str] | dict | None = None):
    """Load an mmengine config by path or name and apply ``--cfg-options`` overrides."""
    from mmengine.config import Config  # slow to import; the setting checks here are not

    path = find_config(ref)
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # noqa: BLE001 - a config is user code: show its error with its path
        raise XtunerError(f"could not load config {path}: {type(exc).__name__}: {exc}") from None
    options = cfg_options if isinstance(cfg_options, dict) else parse_cfg_options(cfg_options)
    for key in options:
        head = key.split(".")[0]
        if head not in cfg:
            hint = get_close_matches(head, list(cfg.keys()), n=1)
            raise XtunerError(
                f"--cfg-options: config {path} has no key {head!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
    if options:
        cfg.merge_from_dict(options)
    check_sections(cfg, path)
    return cfg


def check_sections(cfg: Any, path: Path) -> None:
    """Refuse a top-level dict whose name is a misspelt section (``trian = dict(...)`` would
    otherwise be ignored while the base config's ``train`` is used). Other top-level names are
    the user's own variables and stay allowed."""
    for key in cfg.keys():
        if key in SECTIONS or not isinstance(cfg[key], dict):
            continue
        hint = get_close_matches(key, SECTIONS, n=1, cutoff=0.75)
        if hint:
            raise XtunerError(
                f"config {path}: unknown top-level dict {key!r}; did you mean {hint[0]!r}?"
            )


def resolve_data_files(data_files: Any, key: str = "train_dataset.data_files") -> Any:
    """Each relative data path as it is under the current directory, else as bundled with the
    package (``examples/data/...``); a local file found in neither is an error naming it and
    the option that points at a copy. Hub dataset ids pass unchanged."""
    if data_files is None:
        return None
    many = isinstance(data_files, (list, tuple))
    resolved = [_resolve_data_path(str(ref), key) for ref in (data_files if many else [data_files])]
    return resolved if many else resolved[0]


def _resolve_data_path(ref: str, key: str) -> str:
    path = Path(ref).expanduser()
    if path.exists() or any(c in ref for c in "*?["):
        return ref
    if not path.is_absolute() and (BUNDLED_DATA / path).exists():
        return str(BUNDLED_DATA / path)
    if path.suffix.lower() in DATA_SUFFIXES or ref.startswith((".", "/", "~")):
        raise XtunerError(
            f"{key}: {ref} not found (relative to {Path.cwd()}, nor bundled "
            f"with xtuner_lite); point at your copy with --cfg-options "
            f"{key}=PATH"
        )
    return ref  # a hub dataset id


def is_int(value: Any) -> bool:
    """An integer setting (``True``/``False`` are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float setting (not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def settings_of(cls: type, value: Any, where: str) -> Any:
    """A settings dataclass from a config's dict (or the settings themselves; None: the
    defaults), naming an unknown or misspelt key."""
    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, dict):
        raise XtunerError(f"{where} must be a dict, got {type(value).__name__}")
    check_kwargs(cls, dict(value or {}), where)
    return cls(**(value or {}))


def check_kwargs(fn: Callable, kwargs: dict[str, Any], where: str) -> None:
    """Refuse config keys that ``fn`` does not take, naming the key and the closest match."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            hint = get_close_matches(key, list(params), n=1)
            raise XtunerError(
                f"{where}: unknown key {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (accepted: {', '.join(params)})"
            )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and n not in kwargs
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise XtunerError(f"{where}: missing required key(s) {missing}")
