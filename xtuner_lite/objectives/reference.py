"""The reference model's log-probabilities: live (the base under a disabled adapter, or a frozen
copy for full fine-tuning) or precomputed once and cached on disk.

A LoRA/QLoRA reference costs no memory: it is the trained model with its adapter switched off.
With ``precompute_reference`` every sequence's reference log-probability is computed once before
training, stored next to the dataset cache keyed by the data's tokens and the reference model,
and training runs no reference forward at all (TRL recomputes them every run).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xtuner_lite.atomic import atomic_path
from xtuner_lite.data.pipeline import dataset_cache_dir
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.logprobs import SequenceLogps, sequence_logps, token_owner


class Reference:
    """Where reference log-probabilities come from during training.

    ``model``: a frozen copy (full fine-tuning); None: the trained model with its adapter
    disabled. A batch carrying ``ref_logps`` (the cache) is used as it is.
    """

    def __init__(self, model: torch.nn.Module | None = None, chunk_size: int = 1024):
        self.model = model
        self.chunk_size = chunk_size
        if model is not None:
            model.requires_grad_(False)
            model.eval()

    def disabled(self, llm: torch.nn.Module) -> AbstractContextManager:
        """The context in which ``llm`` computes as the reference."""
        if self.model is None and hasattr(llm, "disable_adapter"):
            return llm.disable_adapter()
        return nullcontext()

    @torch.no_grad()
    def logps(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        if "ref_logps" in batch:
            tokens = torch.bincount(token_owner(batch), minlength=int(batch["num_sequences"]))
            return SequenceLogps(batch["ref_logps"].float(), tokens)
        if self.model is None:
            if not hasattr(llm, "disable_adapter"):
                raise RuntimeError("a full fine-tune needs a frozen reference model copy")
            with llm.disable_adapter():
                return sequence_logps(llm, batch, self.chunk_size)
        model = self.model
        device = next(llm.parameters()).device
        if next(model.parameters()).device != device:
            model.to(device)
        return sequence_logps(model, batch, self.chunk_size)


def model_fingerprint(model_cfg: dict[str, Any]) -> str:
    """The reference model's identity: its settings and, for a local folder, its files' names,
    sizes and modification times (hashing a 7B model's weights would take minutes)."""
    parts = [repr(sorted((k, repr(v)) for k, v in model_cfg.items() if k != "lora"))]
    path = Path(str(model_cfg.get("pretrained", ""))).expanduser()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def data_fingerprint(data: Any) -> str:
    """The processed data's identity: its tokens, labels and layout."""
    digest = hashlib.sha256()
    for name in ("input_ids", "labels", "sample_lengths", "row_sizes"):
        digest.update(np.ascontiguousarray(getattr(data, name)).tobytes())
    return digest.hexdigest()


def cache_path(data: Any, model_cfg: dict[str, Any], dtype: str | None) -> Path:
    key = hashlib.sha256(
        f"{data_fingerprint(data)}:{model_fingerprint(model_cfg)}:{dtype}".encode()
    ).hexdigest()[:24]
    return dataset_cache_dir() / f"reference-{key}.safetensors"


@torch.no_grad()
def compute_reference(
    llm: torch.nn.Module,
    reference: Reference,
    dataset: Any,
    pad_token_id: int,
    batch_size: int,
    device: str,
    autocast_dtype: torch.dtype | None = None,
    arrange: Callable[[dict], dict] | None = None,
) -> torch.Tensor:
    """Every sequence's reference log-probability sum, in storage order (one pass, no grad);
    ``arrange`` lays each collated batch out as training will (shared prompts)."""
    totals = torch.zeros(int(len(dataset.data.sample_lengths)), dtype=torch.float32)
    was_training = llm.training
    llm.eval()
    saved, dataset.reference = dataset.reference, None
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in dataset.collate(rows, pad_token_id, 32).items()}
            if arrange is not None:
                batch = arrange(batch)
            autocast = (
                torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype)
                if autocast_dtype is not None
                else nullcontext()
            )
            with autocast:
                logps = reference.logps(llm, batch).total.float().cpu()
            first = rows[0]["first_sequence"]
            totals[first : first + len(logps)] = logps
    finally:
        dataset.reference = saved
        llm.train(was_training)
    return totals


def check_reference(
    totals: torch.Tensor, sequences: int, source: str, remedy: str = ""
) -> torch.Tensor:
    """The reference log-probs must be one finite number per sequence; a NaN would surface
    later as a NaN loss and be blamed on the learning rate."""
    if tuple(totals.shape) != (sequences,):
        raise XtunerError(
            f"{source} holds {tuple(totals.shape)} values for {sequences} sequences{remedy}"
        )
    bad = (~torch.isfinite(totals)).nonzero().flatten()
    if len(bad):
        raise XtunerError(
            f"{source}: {len(bad)} of {sequences} sequence log-probabilities are not finite "
            f"(first: sequence {int(bad[0])}, {float(totals[bad[0]])}){remedy}"
        )
    return totals


def cached_reference(path: Path, sequences: int) -> torch.Tensor | None:
    """The cached reference log-probs, None where there is no cache; a cache that cannot be
    read, or holds the wrong number of values or a non-finite one, is an error naming it."""
    if not path.exists():
        return None
    source, remedy = f"the reference log-prob cache {path}", "; delete it to compute it again"
    try:
        totals = load_file(str(path))["ref_logps"]
    except (SafetensorError, KeyError, OSError) as exc:
        raise XtunerError(
            f"{source} cannot be read ({type(exc).__name__}: {exc}){remedy}"
        ) from None
    return check_reference(totals, sequences, source, remedy)


def save_reference(path: Path, totals: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"ref_logps": totals.contiguous()}, str(tmp))


__all__ = [
    "Reference",
    "cache_path",
    "cached_reference",
    "check_reference",
    "compute_reference",
    "save_reference",
]
