"""Adapter folders: what ``xtuner train`` writes beside a peft adapter, and loading one onto its
base with the checks that it belongs there (used by chat, serve, eval and merge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftModel

from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import load_model, load_tokenizer, resolve_model_path
from xtuner_lite.model.build import peft_wrapping

ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def architecture_of(config: Any) -> dict[str, Any]:
    """The shape-defining fields of a transformers config (recorded beside every adapter); an
    image-text model's are its language model's, under its own ``model_type``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(config if k == "model_type" else text, k, None) for k in ARCHITECTURE_KEYS}


def read_adapter_meta(adapter: str | Path) -> tuple[dict, dict]:
    """(peft adapter_config.json, xtuner_lite.json or {}) of an adapter folder."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise XtunerError(f"adapter folder {folder} does not exist")
    config_file = folder / "adapter_config.json"
    if not config_file.exists():
        raise XtunerError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    try:
        peft_cfg = json.loads(config_file.read_text())
        meta_file = folder / "xtuner_lite.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    except json.JSONDecodeError as exc:
        raise XtunerError(f"{folder}: invalid JSON ({exc})") from None
    return peft_cfg, meta


def _same_model(a: str, b: str) -> bool:

    if a == b:
        return True
    try:
        return Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()
    except XtunerError:
        return False


def _check_base(base: str, base_config: Any, peft_cfg: dict, meta: dict, adapter: Path) -> None:
    recorded = meta.get("architecture")
    if recorded:
        found = architecture_of(base_config)
        diff = {k: (v, found.get(k)) for k, v in recorded.items() if found.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: adapter {a!r} vs base {b!r}" for k, (a, b) in diff.items())
            raise XtunerError(
                f"adapter {adapter} was trained on a different model than {base} ({lines})"
            )
    name = meta.get("base_model") or peft_cfg.get("base_model_name_or_path")
    if name and not _same_model(str(name), base):
        raise XtunerError(
            f"adapter {adapter} was trained on {name!r}, not {base!r}; pass that "
            "base, or --any-base if this is the same model stored elsewhere"
        )


def load_adapted(
    base: str | None,
    adapter: str | Path,
    dtype: str = "float32",
    any_base: bool = False,
    **model_kwargs: Any,
):
    """(PeftModel on ``base``, tokenizer, adapter meta); clear errors on mismatch.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. a bitsandbytes config for chat); merging
    passes none, so the adapter lands on the unquantized base."""

    adapter = Path(adapter)
    peft_cfg, meta = read_adapter_meta(adapter)
    base = base or meta.get("base_model") or peft_cfg.get("base_model_name_or_path")
    if not base:
        raise XtunerError(f"adapter {adapter} does not record its base model; pass BASE")
    model = load_model(base, dtype=dtype, head=meta.get("head", "lm"), **model_kwargs)
    if not any_base:
        _check_base(str(base), model.config, peft_cfg, meta, adapter)
    try:
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(adapter), torch_device="cpu")
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XtunerError(f"adapter {adapter} does not fit base {base}: {first}") from None
    tokenizer_src = adapter if (adapter / "tokenizer_config.json").exists() else base
    model.eval()
    return model, load_tokenizer(tokenizer_src), {**meta, "base_model": str(base)}
