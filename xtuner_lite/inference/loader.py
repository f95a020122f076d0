"""One loader for every inference path (chat, serve, eval, merge): a model reference in —
embedded name, local folder, hub id, adapter folder on its recorded base, merged or trained
folder — model, tokenizer, chat template and where a turn ends out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import BitsAndBytesConfig

from xtuner_lite.adapters import load_adapted, read_adapter_meta
from xtuner_lite.data.templates import Template, get_template, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import default_template_for, load_model, load_tokenizer

RECORD_FILE = "xtuner_lite.json"  # what training and merge record beside their weights


@dataclass
class LoadedModel:
    """A loaded model (None when only the tokenizer was wanted), its tokenizer, the template it
    chats in (None: a base model without one, raw prompts only) and what training recorded."""

    name: str
    model: Any
    tokenizer: Any
    template: Template | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stop_ids(self) -> list[int]:
        if self.template is None:
            return [self.tokenizer.eos_token_id]
        return stop_token_ids(self.template, self.tokenizer)


def quantization_kwargs(bits: int | None) -> dict[str, Any]:
    """from_pretrained kwargs for 4/8-bit weights through bitsandbytes (None: full precision)."""
    if bits is None:
        return {}
    if bits not in (4, 8):
        raise XtunerError(f"--bits must be 4 or 8, got {bits}")
    if bits == 4:
        return {
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        }
    # LLM.int8 multiplies in fp16: load the rest in fp16 too rather than cast at every layer
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": "float16"}


def is_adapter(ref: str | Path | None) -> bool:
    return ref is not None and (Path(ref) / "adapter_config.json").exists()


def recorded(ref: str | Path | None) -> dict[str, Any]:
    """What ``xtuner train`` / ``merge`` recorded in a folder (empty for anything else)."""
    path = Path(ref) / RECORD_FILE if ref is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def template_name(explicit: str | None, meta: dict[str, Any], base: str | None) -> str:
    """The template chain, written once: an explicit choice, else the one recorded in training,
    else the embedded model's own, else the tokenizer's (``auto``)."""
    return explicit or meta.get("template") or default_template_for(str(base)) or "auto"


def load_for_inference(
    ref: str | None,
    adapter: str | Path | None = None,
    template: str | None = None,
    *,
    dtype: str = "float32",
    bits: int | None = None,
    weights: bool = True,
    check_base: bool = False,
    template_required: bool = True,
) -> LoadedModel:
    """Load ``ref`` (or ``adapter`` on ``ref``; an adapter folder as ``ref`` stands on the base
    it records). ``weights=False``: tokenizer and template only (another engine holds the
    model); ``check_base``: refuse a base the adapter was not trained on;
    ``template_required=False``: no template is not an error (evaluating a base model)."""
    if adapter is None and is_adapter(ref):
        ref, adapter = None, ref
    kwargs = {"dtype": dtype, **quantization_kwargs(bits)}
    if adapter is not None and not weights:
        peft_cfg, meta = read_adapter_meta(adapter)
        base = ref or meta.get("base_model") or peft_cfg.get("base_model_name_or_path")
        own = (Path(adapter) / "tokenizer_config.json").exists()
        llm, tokenizer = None, load_tokenizer(adapter if own else base)
    elif adapter is not None:
        llm, tokenizer, meta = load_adapted(ref, adapter, any_base=not check_base, **kwargs)
        base = meta["base_model"]
    else:
        meta, base = recorded(ref), ref
        llm = load_model(ref, head=meta.get("head", "lm"), **kwargs).eval() if weights else None
        tokenizer = load_tokenizer(ref)
    try:
        chat = get_template(template_name(template, meta, base), tokenizer)
    except XtunerError:
        if template_required or template:
            raise
        chat = None
    return LoadedModel(str(adapter or ref), llm, tokenizer, chat, {**meta, "base_model": base})


__all__ = ["LoadedModel", "load_for_inference", "quantization_kwargs", "template_name"]
