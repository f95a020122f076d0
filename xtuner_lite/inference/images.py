"""Images in a prompt for an image-text model: image placeholders expanded to the model's
image tokens and the images made into its inputs, as training's data pipeline does
(``data/image_text.py``), for ``chat --image`` and ``serve``'s image content parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, PretrainedConfig

from xtuner_lite.data.image_text import image_tokens
from xtuner_lite.data.images import join_images, load_image
from xtuner_lite.errors import RowError, XtunerError
from xtuner_lite.hub import is_image_text, resolve_model_path
from xtuner_lite.inference.loader import is_adapter


class ImageInput:
    """An image-text model's image tokens and image processor."""

    def __init__(self, model: str | Path | PretrainedConfig, tokenizer: Any,
                 processor: str | Path | None = None):  # fmt: skip
        """``model``: its folder (or config, with ``processor``: a folder holding its
        processor, such as a training result)."""
        self.tokens = image_tokens(model, tokenizer)
        self.processor = AutoImageProcessor.from_pretrained(processor or model)

    def prompt(
        self, ids: list[int], refs: list[str], folder: Path | None = None
    ) -> tuple[list[int], dict[str, torch.Tensor] | None]:
        """(``ids`` with each image token expanded, the images' model inputs or None);
        ``refs``: data URLs or paths (relative to ``folder``), one per placeholder."""
        placed = ids.count(self.tokens.token_id)
        if placed != len(refs):
            raise XtunerError(f"{placed} image placeholders for {len(refs)} images")
        if not refs:
            return ids, None
        try:
            images = [load_image(ref, folder or Path.cwd()) for ref in refs]
        except RowError as exc:
            raise XtunerError(exc.reason) from None
        inputs, layouts = zip(*(self.tokens.process(self.processor, image) for image in images))
        return self.tokens.expand(ids, list(layouts)), join_images(list(inputs))

    @property
    def placeholder(self) -> str:
        """The text an image becomes in a message (after escaping what the user typed)."""
        return self.tokens.placeholder


def image_input_for(
    model: Any, tokenizer: Any, ref: str, adapter: str | None = None
) -> ImageInput | None:
    """The image input of a loaded model (None: a text model); its processor is in a training
    result's folder (``adapter``, or ``ref`` when it is one), else the model's."""
    if model is None or not is_image_text(model.config):
        return None
    where = adapter or (ref if is_adapter(ref) else resolve_model_path(ref))
    return ImageInput(model.config, tokenizer, where)


__all__ = ["ImageInput", "image_input_for"]
