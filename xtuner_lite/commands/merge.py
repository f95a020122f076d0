"""``xtuner merge``: LoRA/QLoRA adapter + base → one Hugging Face model folder.

The folder is what transformers, vLLM and LMDeploy load: safetensors shards, the tokenizer with
the chat template used in training written in as its ``chat_template``, and a generation config
whose EOS ids include the template's end-of-turn token, so every engine stops where our chat
stops. A QLoRA adapter is merged into the unquantized base (its 4-bit weights were a storage
format for training, not the model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from xtuner_lite.adapters import architecture_of
from xtuner_lite.atomic import atomic_path
from xtuner_lite.data.templates import ChatTemplate, get_template, renders_like, stop_token_ids
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import is_image_text, parse_dtype
from xtuner_lite.inference.loader import load_for_inference
from xtuner_lite.model.vlm import save_processor
from xtuner_lite.values import Size
from xtuner_lite.workdir import is_work_dir


def write_chat_files(
    folder: Path, tokenizer: Any, template_name: str | None, generation_config: Any
) -> list[int]:
    """Write the tokenizer with the training template and a generation config that stops at its
    end of turn; returns the stop token ids."""

    stops = write_tokenizer(folder, tokenizer, template_name)
    generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.save_pretrained(folder)
    return stops


def write_tokenizer(folder: Path, tokenizer: Any, template_name: str | None) -> list[int]:
    """The tokenizer with the training template as its chat template, so
    ``apply_chat_template`` renders conversations as training did; returns the stop ids."""
    template = get_template(template_name or "auto", tokenizer)
    # ``auto`` already is the tokenizer's own; so is a published template that renders as ours
    # (Llama-3.1's, Mistral v3's), which also renders tools the model's way
    if isinstance(template, ChatTemplate) and not renders_like(template, tokenizer):
        tokenizer.chat_template = template.to_jinja()
    tokenizer.save_pretrained(folder)
    return stop_token_ids(template, tokenizer)


def check_output(out: Path, inputs: list[str | Path], force: bool) -> None:
    """Refuse an output folder whose replacement would destroy trained work: one that is or
    contains an input (the adapter, a local base), or that is a training work dir; and an
    existing one without ``force``."""
    target = out.resolve()
    for ref in inputs:
        source = Path(ref).expanduser()
        if not source.exists():
            continue  # a hub id or an embedded name
        source = source.resolve()
        if target == source or target in source.parents:
            raise XtunerError(
                f"output {out} is or contains the input {ref}; writing it would "
                "delete that input: choose another output folder"
            )
    if is_work_dir(out):
        raise XtunerError(
            f"output {out} is a training work dir (checkpoints, logs, results); "
            "choose another output folder"
        )
    if out.exists() and not force:
        raise XtunerError(f"output folder {out} exists; pass --force to replace it")


def merge_adapter(
    base: str | None,
    adapter: str,
    out: str,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    max_shard_size: Size = "2GB",
    force: bool = False,
    any_base: bool = False,
) -> Path:
    """Merge a LoRA/QLoRA adapter into its base (HF folder).

    Merge an adapter into its unquantized base and write a Hugging Face folder with the
    training chat template and stop tokens.

    Args:
        base: base model (embedded name, folder or hub id); '-' (or None) means the base the
            adapter records
        adapter: peft adapter folder (e.g. WORK_DIR/adapter)
        out: output folder
        dtype: the merged weights' dtype
        max_shard_size: the largest safetensors file
        force: replace an existing output folder
        any_base: skip the check that BASE is the model the adapter was trained on
    """
    base = None if base == "-" else base
    out = Path(out)
    check_output(out, [adapter, *([base] if base else [])], force)
    target = parse_dtype(dtype)
    loaded = load_for_inference(base, adapter, check_base=not any_base, template_required=False)
    model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    with torch.no_grad():
        merged = model.merge_and_unload()
    merged = merged.to(target)
    merged.config.use_cache = True
    check_output(out, [adapter, meta["base_model"]], force)  # the base '-' stood for, too
    reward = meta.get("head") == "reward"
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if reward:  # a scorer generates nothing: the tokenizer with the training template only
            stops = write_tokenizer(tmp, tokenizer, meta.get("template"))
        else:
            stops = write_chat_files(tmp, tokenizer, meta.get("template"), merged.generation_config)
        if is_image_text(merged.config):  # its processor, with the training chat template
            save_processor(adapter, tmp, tokenizer)
        record = {
            "merged_from": {"base_model": meta["base_model"], "adapter": str(adapter)},
            "template": meta.get("template"),
            "stop_token_ids": stops,
            "dtype": dtype,
            "architecture": architecture_of(merged.config),
            "head": "reward" if reward else "lm",
        }
        (tmp / "xtuner_lite.json").write_text(json.dumps(record, indent=1))
    print(f"merged model written to {out}")
    return out
