"""Write docs/config.md from the code: the typed signatures are the config schema.

Run: python scripts/config_reference.py > docs/config.md  (a test checks the page is current)
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from xtuner_lite.data.image_text import process_image_dataset
from xtuner_lite.data.pipeline import process_dataset
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.model.build import LoraSettings, build_model
from xtuner_lite.model.vlm import VisionSettings
from xtuner_lite.objectives import OBJECTIVES
from xtuner_lite.objectives.grpo.prompts import process_prompt_dataset
from xtuner_lite.training.runner import TrainSettings

INTRO = """# Config reference

A config is a pure-Python mmengine file defining `model`, `train_dataset` and `train` dicts
(and optionally `objective`, `seed` and `work_dir`); the bundled ones compose them from
`xtuner_lite/configs/_base_/`. Each dict is the keyword arguments of one typed function or
dataclass, so this page is generated from the code (`python scripts/config_reference.py`), and an
unknown or misspelt key is refused with the closest accepted one. Override any key on the
command line: `--cfg-options train.lr=1e-4 train_dataset.max_length=1024`.
"""


def _comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in a dataclass's source."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _default(value) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    return f"`{value!r}`"


def _table(rows: list[tuple[str, str, str]], third: str = "meaning") -> str:
    out = [f"| key | default | {third} |", "|---|---|---|"]
    out += [f"| `{k}` | {d} | {m.replace('|', '&#124;')} |" for k, d, m in rows]
    return "\n".join(out) + "\n"


def _function_section(title: str, fn, skip: tuple[str, ...] = ()) -> str:
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in skip]
    rows = [(p.name, _default(p.default), f"`{p.annotation}`") for p in params]
    doc = inspect.cleandoc(fn.__doc__ or "")
    return f"## {title}\n\n{_table(rows, 'type')}\n{doc}\n"


def _dataclass_section(title: str, cls) -> str:
    comments = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
        )
        rows.append((f.name, _default(default), comments.get(f.name, "")))
    doc = inspect.cleandoc(cls.__doc__ or "")
    return f"## {title}\n\n{doc}\n\n{_table(rows)}"


OBJECTIVE_INTRO = """## objective

Absent (or `type="sft"`): next-token SFT. Otherwise `type` names a preference objective or
`grpo` and the other keys are its settings below (checked where the objective declares them,
every problem at once); `train_dataset` then takes the preference keys or the prompt keys
above. GRPO's `rewards` are built-in rewards
(`dict(type="numeric_answer" | "format" | "length_penalty" | "code_tests", weight=..., ...)`),
callables `f(row, completion) -> float` or dotted paths to them (`dict(fn=..., weight=...)`).
`precompute_reference=True` (objectives with a reference model) computes the reference
log-probabilities once before training and caches them on disk, so training runs no reference
forward.
"""


def _objective_sections() -> str:
    parts = [OBJECTIVE_INTRO]
    for name, cls in OBJECTIVES.items():
        params = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "chunk_size")
        ]
        rows = [(p.name, _default(p.default), f"`{p.annotation}`") for p in params]
        doc = inspect.cleandoc(cls.__doc__ or "")
        none = "No settings (the loss chunk is `train.chunk_size`).\n"
        table = _table(rows, "type") if rows else none
        parts.append(f'### `type="{name}"`\n\n{doc}\n\n{table}')
    return "\n".join(parts)


def reference() -> str:
    return "\n".join(
        [
            INTRO,
            _function_section("model: `build_model`", build_model, skip=("device",)),
            _dataclass_section("model.lora: `LoraSettings`", LoraSettings),
            _dataclass_section(
                "model.vision (image-text models): `VisionSettings`", VisionSettings
            ),
            _function_section("train_dataset: `process_dataset`", process_dataset),
            _function_section(
                "train_dataset (objective vlm_sft): `process_image_dataset`",
                process_image_dataset,
            ),
            _function_section(
                "train_dataset (preference objectives): `process_preference_dataset`",
                process_preference_dataset,
            ),
            _function_section(
                "train_dataset (objective grpo): `process_prompt_dataset`",
                process_prompt_dataset,
            ),
            _objective_sections(),
            _dataclass_section("train: `TrainSettings`", TrainSettings),
        ]
    )


if __name__ == "__main__":
    print(reference(), end="")
