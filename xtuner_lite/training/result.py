"""The result of a training: a standard peft adapter (or HF model) folder that ``xtuner merge``,
``chat`` and ``serve`` read, written atomically by ``xtuner train`` and ``xtuner convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xtuner_lite.adapters import architecture_of
from xtuner_lite.atomic import atomic_path
from xtuner_lite.data.image_text import IMAGE_MAX_PIXELS, image_processor
from xtuner_lite.hub import resolve_model_path
from xtuner_lite.model.build import model_head
from xtuner_lite.model.vlm import is_image_text, save_processor


def _final_save(
    llm,
    tokenizer,
    out: Path,
    state_dict: dict | None,
    meta: dict[str, Any],
    image_max_pixels: int | None = IMAGE_MAX_PIXELS,
) -> None:
    """A standard peft adapter (or HF model) folder, plus the tokenizer (an image-text model:
    its processor, with the image bound training used) and how it was trained.
    ``state_dict`` holds the weights when the model itself is sharded (ZeRO-3, FSDP2)."""
    with atomic_path(out) as tmp:
        llm.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if is_image_text(llm.config):
            base = resolve_model_path(meta["base_model"])
            save_processor(base, tmp)
            image_processor(base, llm.config, image_max_pixels).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "xtuner_lite.json").write_text(json.dumps(meta, indent=1, default=str))


def save_result(
    llm,
    tokenizer,
    template,
    cfg: dict,
    out: Path,
    seed: int | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write the trained adapter (or full model) with what ``xtuner merge``/``chat`` need:
    base model name, architecture, template, stop words and the training settings."""
    model_cfg, data_cfg = dict(cfg["model"]), dict(cfg["train_dataset"])
    _final_save(
        llm,
        tokenizer,
        out,
        state_dict,
        {
            "base_model": str(model_cfg["pretrained"]),
            "method": model_cfg.get("method", "lora"),
            "architecture": architecture_of(llm.config),
            "template": template.name,
            "stop_words": template.stop_words(tokenizer),
            "max_length": data_cfg.get("max_length"),
            "train": dict(cfg["train"]),
            "objective": dict(cfg.get("objective") or {"type": "sft"}),
            "head": model_head(llm),
            "seed": cfg.get("seed", 0) if seed is None else seed,
        },
        data_cfg.get("image_max_pixels", IMAGE_MAX_PIXELS),
    )
