"""Images in conversations: the accepted row shapes, reading an image, and the store of the
processor's output, one entry per distinct image (by content hash).

A row names its images in one of three shapes, each with ``<image>`` where an image goes:
LLaVA's ``{"image": PATH or [PATHS], "conversations": [{"from", "value"}]}`` (an image with no
``<image>`` in the text goes before the first human turn, as LLaVA's own loader does),
LLaMA-Factory's ``{"messages": [...], "images": [PATHS]}``, and OpenAI content parts
(``{"type": "image_url", "image_url": {"url": DATA_URL or PATH}}`` beside text parts). Paths
are relative to ``image_folder`` (default: the data file's folder). Nothing is fetched: an
``http(s)`` URL is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from xtuner_lite.atomic import atomic_path
from xtuner_lite.data.map_fns import openai_map_fn, sharegpt_map_fn
from xtuner_lite.errors import RowError

IMAGE_TOKEN = "<image>"


def image_conversation(row: Any) -> tuple[dict, list[str]]:
    """(a conversation for ``validate_conversation``, the row's image references in the
    order of their ``<image>`` placeholders)."""
    if not isinstance(row, dict):
        raise RowError(f"an image row must be an object, got {type(row).__name__}")
    if "conversations" in row:
        images = _refs(row.get("image", row.get("images")), "image")
        conversation = sharegpt_map_fn(row)
        messages = conversation["messages"]
        placed = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if images and placed == 0:  # LLaVA's loader puts a lone image before the question
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise RowError("no human turn to put the image in", field="conversations")
            first["content"] = placed_before(first["content"], len(images))
        return conversation, images
    if "messages" in row:
        images = _refs(row.get("images"), "images")
        messages, parts = _content_parts(row["messages"])
        if parts and images:
            raise RowError("images both in content parts and in 'images'", field="images")
        return openai_map_fn({**row, "messages": messages}), images or parts
    raise RowError("an image row needs 'conversations' (LLaVA) or 'messages'")


def _refs(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise RowError("must be an image path or a list of them", field=field)
    return list(refs)


def placed_before(text: str, images: int, placeholder: str = IMAGE_TOKEN) -> str:
    """``text`` with ``images`` placeholders before it (LLaVA's order: the image, then the
    question), as content parts and attached images are placed in data, chat and serve;
    ``placeholder``: the model's own (Qwen2-VL's vision markers around its image pad)."""
    return placeholder * images + "\n" + text if images else text


def split_content(parts: list, field: str) -> tuple[str, list[str]]:
    """OpenAI content parts: (the text parts joined, the image parts' URLs)."""
    text, refs = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RowError("image_url needs a url", field=f"{field}[{i}]")
            refs.append(url)
        else:
            raise RowError(f"content parts must be text or image_url, got {kind!r}",
                           field=f"{field}[{i}]")  # fmt: skip
    return "".join(text), refs


def _content_parts(messages: Any) -> tuple[Any, list[str]]:
    """Messages with content-part lists turned into text with their images placed first."""
    if not isinstance(messages, list):
        return messages, []
    refs: list[str] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        text, found = split_content(content, f"messages[{i}].content")
        refs += found
        out.append({**message, "content": placed_before(text, len(found))})
    return out, refs


def read_image_bytes(ref: str, folder: Path) -> bytes:
    """The bytes of an image reference: a data URL, or a path (relative to ``folder``)."""
    if ref.startswith(("http://", "https://")):
        raise RowError(
            f"image {ref!r} is a remote URL, which is not fetched: give a data URL or a file",
            field="images",
        )
    if ref.startswith("data:"):
        header, _, data = ref.partition(",")
        if ";base64" not in header:
            raise RowError("an image data URL must be base64", field="images")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            raise RowError("an image data URL is not valid base64", field="images") from None
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else folder / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RowError(f"image {path}: {exc.strerror or exc}", field="images") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """An RGB image from its bytes; a truncated or unreadable file is an error naming it."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not in the middle of training
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise RowError(f"image {name} cannot be read: {exc}", field="images") from None
    return image.convert("RGB")


def display_name(ref: str) -> str:
    """How messages name an image reference (a data URL is not printed whole)."""
    return "(data URL)" if ref.startswith("data:") else ref


def load_image(ref: str, folder: Path) -> Image.Image:
    """The RGB image of a reference (a data URL, or a path relative to ``folder``)."""
    return decode_image(read_image_bytes(ref, folder), display_name(ref))


# what an image processor returns per image that the model takes (Qwen2-VL: its patches and
# their grid); everything else it returns (sizes, masks of other families) is not kept
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
STORE_FORMAT = "3"  # a change of what a stored file holds starts a new folder


# (image processor, image) -> (the image's model inputs, its layout)
Processing = Callable[[Any, Image.Image], tuple[dict[str, torch.Tensor], Any]]


class ImageStore:
    """The image processor's output for every distinct image, decoded once and kept on disk
    under ``folder`` (one file per image and processor setting): training reads each batch's
    images from there, so a dataset's images never have to fit in memory. An image used by
    several rows (or several times) is found by the hash of its bytes, and a later run of the
    same data finds its files. ``process`` makes an image's model inputs and its layout (what
    its token run is made from: its token count, or its tiles' rows and columns);
    ``layouts[i]`` holds image ``i``'s."""

    def __init__(self, image_processor: Any, folder: Path, process: Processing):
        self.image_processor = image_processor
        settings = (STORE_FORMAT + image_processor.to_json_string()).encode()
        self.folder = Path(folder) / hashlib.sha256(settings).hexdigest()[:16]
        self.process = process
        self.layouts: list[Any] = []
        self._index: dict[str, int] = {}
        self._files: list[Path] = []

    def add(self, ref: str, folder: Path) -> int:
        """The index of ``ref``'s processed inputs, processing the image if it is new."""
        data = read_image_bytes(ref, folder)
        key = hashlib.sha256(data).hexdigest()
        if key not in self._index:
            path = self.folder / f"{key}.pt"
            if path.exists():
                layout = torch.load(path, weights_only=True)["layout"]
            else:
                image = decode_image(data, display_name(ref))
                inputs, layout = self.process(self.image_processor, image)
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    inputs = {k: v.clone() for k, v in inputs.items()}
                    torch.save({"inputs": inputs, "layout": layout}, tmp)
            self._index[key] = len(self._files)
            self._files.append(path)
            self.layouts.append(layout)
        return self._index[key]

    def load(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The model inputs of those images, in that order (each input joined along its first
        axis, as the processor returns several images)."""
        files = [torch.load(self._files[i], weights_only=True) for i in indices]
        return join_images([f["inputs"] for f in files])

    def __len__(self) -> int:
        return len(self._files)


def process_images(image_processor: Any, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The model inputs of ``images`` (:data:`IMAGE_INPUTS` that the processor returns)."""
    out = image_processor(images=images, return_tensors="pt")
    return {k: out[k] for k in IMAGE_INPUTS if k in out}


def images_digest(images: dict[str, torch.Tensor] | None) -> str | None:
    """What tells a prompt's images apart (None: it has none): the hash of their inputs."""
    if images is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(images):
        digest.update(key.encode())
        digest.update(images[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def join_images(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several images' inputs as one (each input joined along its first axis)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


__all__ = [
    "IMAGE_INPUTS",
    "IMAGE_TOKEN",
    "ImageStore",
    "decode_image",
    "display_name",
    "image_conversation",
    "images_digest",
    "join_images",
    "load_image",
    "placed_before",
    "process_images",
    "read_image_bytes",
    "split_content",
]
