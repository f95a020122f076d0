"""Training checkpoints: their keys, how they are written, read, found, kept and set aside.

The one owner of checkpoint I/O for one process and for DDP / FSDP2 (DeepSpeed writes its own
folders through its engine).

- Safe to read: a checkpoint holds tensors and plain Python data only. The few objects mmengine
  puts in it (numpy scalars and arrays, its ``HistoryBuffer``) are turned into tensors and tagged
  dicts before saving, so loading uses torch's ``weights_only`` unpickler with no allow-list and
  a crafted ``.pth`` cannot run code; anything else is refused with :class:`CheckpointError`.
- Atomic: written under a temporary name and renamed (``xtuner_lite.atomic``).
- Found inside the work dir: ``--resume auto`` takes the newest complete ``iter_N.pth`` in it
  (never an absolute path recorded elsewhere), falling back past unreadable ones.
- Kept until replaced: older checkpoints are deleted only after a newer one is complete *and*
  the step after it produced a finite loss, so a divergence never leaves only diverged weights.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from xtuner_lite.atomic import atomic_path, remove, write_text
from xtuner_lite.errors import XtunerError
from xtuner_lite.workdir import DIVERGED_SUFFIX, LAST_CHECKPOINT, checkpoints

# the keys of a checkpoint, named once
STATE_DICT = "state_dict"
OPTIMIZER = "optimizer"
PARAM_SCHEDULERS = "param_schedulers"
MESSAGE_HUB = "message_hub"
META = "meta"
RNG_STATES = "rng_states"  # one RNG state per rank (a list of one in a single process)

_HISTORY = "__history_buffer__"


class CheckpointError(XtunerError):
    """A checkpoint that cannot be read, or that is not a training checkpoint."""


# ------------------------------------------------------------------ plain data in, plain data out
def to_plain(obj: Any) -> Any:
    """``obj`` with numpy values and mmengine's HistoryBuffers turned into tensors and tagged
    dicts, so that torch's ``weights_only`` unpickler reads it back."""
    if isinstance(obj, HistoryBuffer):
        return {
            _HISTORY: obj.max_length,
            "log": torch.from_numpy(np.asarray(obj._log_history)),
            "count": torch.from_numpy(np.asarray(obj._count_history)),
        }
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = to_plain(value)
        if hasattr(obj, "_metadata"):  # a module state dict's version info
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain` for what mmengine reads back (its HistoryBuffers)."""
    if isinstance(obj, dict):
        if _HISTORY in obj:
            return HistoryBuffer(obj["log"].numpy(), obj["count"].numpy(), obj[_HISTORY])
        for key, value in obj.items():
            obj[key] = from_plain(value)
    elif isinstance(obj, list):
        obj[:] = [from_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ reading and writing
def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically, in the plain form :func:`load` accepts."""
    with atomic_path(path) as tmp:
        torch.save(to_plain(state), tmp)


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint without unpickling arbitrary objects; clear errors for a
    missing, truncated, foreign or code-carrying file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder (a DeepSpeed checkpoint); resume it with "
            "--deepspeed, or convert it with `xtuner convert` under DeepSpeed"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than "
            f"tensors and plain data{what}, which could run code when "
            "unpickled; xtuner_lite checkpoints never do"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or not a checkpoint ({first})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get(STATE_DICT), dict):
        raise CheckpointError(
            f"{path} is not an xtuner_lite training checkpoint (no {STATE_DICT!r})"
        )
    return from_plain(state)


def load_trained_weights(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Load a checkpoint's weights: it holds the trained weights only, so every trained weight
    must be there and nothing the model lacks (frozen base weights are expected to be absent;
    mmengine's loader reports each of them as missing)."""
    state = {re.sub(r"^module\.", "", key): value for key, value in state_dict.items()}
    named = dict(model.named_parameters())
    known = set(named) | {name for name, _ in model.named_buffers()}
    missing = sorted(n for n, p in named.items() if p.requires_grad and n not in state)
    unexpected = sorted(state.keys() - known)
    if missing or unexpected:
        detail = (
            f"{len(missing)} trained weights missing (e.g. {missing[:2]})"
            if missing
            else f"{len(unexpected)} weights this model does not have (e.g. {unexpected[:2]})"
        )
        raise CheckpointError(f"checkpoint {source} does not fit this model and config: {detail}")
    model.load_state_dict(state, strict=False)


def verify(path: str | Path) -> None:
    """Before any model is built: ``path`` is a complete checkpoint holding nothing that could
    run code when unpickled (reads its index and pickle, not its tensors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (cut off while being "
            "written, or not a training checkpoint)"
        )
    if path.is_dir():
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle inside a complete archive
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from None
    if unsafe:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than "
            f"tensors and plain data ({', '.join(unsafe[:3])}), which could "
            "run code when unpickled; xtuner_lite checkpoints never do"
        )


def is_complete(path: Path) -> bool:
    """Cheap check that a checkpoint was written to the end (a torch file is a zip archive
    whose index sits at the end; a DeepSpeed folder is only ever published complete)."""
    if path.is_dir():
        return any(path.iterdir())
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# ------------------------------------------------------------------ the checkpoints of a work dir
def latest(work_dir: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint in ``work_dir`` (None when there is none); unreadable
    newer ones are named through ``warn`` and passed over."""
    skipped = []
    for _, path in reversed(checkpoints(work_dir)):
        if is_complete(path):
            if skipped:
                warn(
                    f"{', '.join(skipped)} unreadable (cut off while being written?); "
                    f"resuming from {path.name} instead"
                )
            return path
        skipped.append(path.name)
    return None


def resume_point(
    work_dir: str | Path, resume: bool | str | Path, warn: Callable[[str], None] = print
) -> Path | None:
    """The checkpoint to resume from, verified before any model is built: ``True`` (``--resume
    auto``) the newest complete one inside ``work_dir``, a path that checkpoint, else None."""
    if not resume:
        return None
    found = latest(work_dir, warn=warn) if resume is True else Path(resume)
    if found is None:
        warn(f"--resume auto: no checkpoint in {work_dir}; starting from scratch")
    else:
        verify(found)
    return found


def record_latest(work_dir: str | Path, path: str | Path) -> None:
    """mmengine's ``last_checkpoint`` file, naming the checkpoint relative to the work dir (a
    moved or copied work dir must never point back at the original)."""
    write_text(Path(work_dir) / LAST_CHECKPOINT, Path(path).name)


def prune(work_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (``keep`` < 1 keeps all); delete older
    ones and any cut off mid-write (an incomplete newer file must never count as one of the
    kept, or the last good one would go)."""
    if keep < 1:
        return []
    removed, kept = [], 0
    for _, path in reversed(checkpoints(work_dir)):
        if is_complete(path) and kept < keep:
            kept += 1
            continue
        remove(path)
        removed.append(path)
    return removed


def set_aside(work_dir: str | Path, from_step: int) -> list[Path]:
    """Rename checkpoints of ``from_step`` and later to ``iter_N.pth.diverged`` (kept for
    inspection, ignored by resume); returns the new paths."""
    moved = []
    for step, path in checkpoints(work_dir):
        if step >= from_step:
            target = path.with_name(path.name + DIVERGED_SUFFIX)
            remove(target)
            path.rename(target)
            moved.append(target)
    newest = latest(work_dir, warn=lambda _: None)
    if newest is not None:
        record_latest(work_dir, newest)
    else:
        remove(Path(work_dir) / LAST_CHECKPOINT)
    return moved


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every trained weight of ``module`` (this process's shard of it) is finite."""
    for param in module.parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2 shard
            if not bool(torch.isfinite(local).all()):
                return False
    return True
