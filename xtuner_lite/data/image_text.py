"""The SFT pipeline for conversations with images: the text stages as for SFT (map → chat
template → tokenize, labels on assistant text), then each ``<image>`` token expanded to the
model's image-token count, then whole samples packed.

An image's tokens are never trained and never split: a packed row never cuts a sample, and a
sample whose images would be cut by ``max_length`` is skipped and counted (text after its last
image is truncated as SFT truncates). A missing, unreadable or truncated image is an error naming
the file and row, or a counted skip with ``skip_invalid``. Each distinct image is decoded and
run through the model's image processor once, its output kept on disk (``data/images.py``).

These families are supported: a fixed image-token count (LLaVA and our compositions,
``image_seq_length`` in their config); a fixed count per tile, an image cropped into as many tiles
as its shape asks (InternVL: ``<img><IMG_CONTEXT></img>``, the context token repeated); and a count
that follows the image's patch grid (Qwen2-VL / Qwen2.5-VL: an image keeps its aspect ratio,
``<image>`` becomes ``<|vision_start|><|image_pad|><|vision_end|>`` and the pad token is repeated
per merged patch). Idefics3 / SmolVLM's image becomes the text of its rows and columns of tiles;
LLaVA-NeXT's count follows the tiles its size picks. Other families are refused with that reason.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.smolvlm.processing_smolvlm import (
    get_image_prompt_string as split_image_text,  # Idefics3 writes the same
)

from xtuner_lite.data.dataset import collate_packed
from xtuner_lite.data.images import (
    IMAGE_INPUTS,
    IMAGE_TOKEN,
    ImageStore,
    image_conversation,
    process_images,
)
from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.data.loaders import load_rows
from xtuner_lite.data.map_fns import validate_conversation
from xtuner_lite.data.packing import PackedData, arrange, pack_indices
from xtuner_lite.data.pipeline import (
    DatasetStats,
    dataset_cache_dir,
    length_summary,
    note_skip,
    resolve_template,
    resolve_tokenizer,
    source_files,
)
from xtuner_lite.data.tokenize import TokenizedBatch, tokenize_rendered
from xtuner_lite.errors import DataError, RowError, XtunerError


@dataclass
class ImageData:
    """Packed rows (``PackedData``) and, per sample in storage order, its images' indices in
    ``images`` (the processor's output of each distinct image, on disk)."""

    rows: PackedData
    sample_images: list[list[int]]
    images: ImageStore

    def __post_init__(self) -> None:
        self._row_starts = np.concatenate([[0], np.cumsum(self.rows.row_sizes)])

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict[str, Any]:
        """A packed row, with the indices of its images in the order of their tokens."""
        first, last = self._row_starts[i], self._row_starts[i + 1]
        images = [j for sample in self.sample_images[first:last] for j in sample]
        return {**self.rows.row(i), "images": images}


@dataclass
class ProcessedImageDataset:
    data: ImageData
    stats: DatasetStats


# what stands for an image's token run while samples are tokenized: its token count (LLaVA,
# InternVL, Qwen2-VL) or its rows and columns of tiles (Idefics3)
Layout = int | tuple[int, int]


@dataclass
class ImageTokens:
    """What the tokenizer and model say about images: the token an image's features take the
    place of, the text an image becomes in a message, and the tokens an image takes."""

    token_id: int
    placeholder: str  # ``<image>`` (LLaVA), ``<|vision_start|><|image_pad|><|vision_end|>``
    # an image's token count from its processed inputs (None: Idefics3's, from its text)
    count: Callable[[dict[str, torch.Tensor]], int] | None = None
    # Idefics3: the text of an image cropped into (rows, columns) tiles and the tokenizer
    tiles_text: Callable[[int, int], str] | None = None
    tokenizer: Any = None
    _runs: dict = field(default_factory=dict, repr=False)

    def process(self, image_processor: Any, image: Any) -> tuple[dict[str, torch.Tensor], Layout]:
        """One image's model inputs (tiles along the first axis) and its layout."""
        if self.tiles_text is None:
            inputs = process_images(image_processor, [image])
            if inputs["pixel_values"].dim() == 5:  # LLaVA-NeXT's (1, tiles, ...): one image
                inputs["pixel_values"] = inputs["pixel_values"][0]
            return inputs, self.count(inputs)
        out = image_processor(images=[image], return_tensors="pt", return_row_col_info=True)
        inputs = {k: out[k][0] for k in IMAGE_INPUTS if k in out}  # (1, tiles, ...) → (tiles,)
        return inputs, (int(out["rows"][0][0]), int(out["cols"][0][0]))

    def run(self, layout: Layout) -> list[int]:
        """The ids an image's placeholder token becomes."""
        if self.tiles_text is None:
            return [self.token_id] * layout
        if layout not in self._runs:  # (one per tile arrangement: computed once)
            text = self.tiles_text(*layout)
            self._runs[layout] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._runs[layout]

    def in_text(self, text: str) -> str:
        """``text`` with each ``<image>`` written as the model's own placeholder."""
        return text.replace(IMAGE_TOKEN, self.placeholder)

    def expand(self, ids: list[int], layouts: list[Layout]) -> list[int]:
        """``ids`` with each image token replaced by its image's run, in order."""
        return self.expand_labelled(np.asarray(ids), np.asarray(ids), layouts)[0].tolist()

    def expand_labelled(
        self, ids: np.ndarray, labels: np.ndarray, layouts: list[Layout]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, which positions are an image's) with each image token replaced by its
        image's run, never trained."""
        at = np.flatnonzero(ids == self.token_id)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        start = 0
        for where, layout in zip(at, layouts):
            run = np.asarray(self.run(layout), dtype=ids.dtype)
            parts.append((ids[start:where], labels[start:where], np.zeros(where - start, bool)))
            parts.append(
                (run, np.full(len(run), IGNORE_INDEX, labels.dtype), np.ones(len(run), bool))
            )
            start = where + 1
        parts.append((ids[start:], labels[start:], np.zeros(len(ids) - start, bool)))
        return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


# families whose image-token count follows the image's patch grid (transformers' model_type)
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# families with a fixed count per tile (``image_seq_length``): LLaVA (and our compositions),
# one tile per image; InternVL, the tiles its processor crops an image into
TILE_FAMILIES = ("llava", "internvl")
# an InternVL image between its markers (its tokenizer names them; these are InternVL's own)
INTERNVL_MARKERS = ("<img>", "</img>")
# families that crop an image into rows and columns of tiles, each tile's tokens after a row and
# column token, and a thumbnail's after them (Idefics3, SmolVLM)
SPLIT_FAMILIES = ("idefics3", "smolvlm")
# families that pick an image's tiles by its size and aspect (LLaVA-NeXT's "any resolution")
ANYRES_FAMILIES = ("llava_next",)
SUPPORTED = TILE_FAMILIES + GRID_FAMILIES + SPLIT_FAMILIES + ANYRES_FAMILIES


# the most pixels an image keeps (resized down, aspect kept) in families whose image-token
# count follows the image's size: LLaMA-Factory's default, about 750 tokens at Qwen2-VL's 28
# pixels per token; the hub's processors allow 12.8 million (16,384 tokens)
IMAGE_MAX_PIXELS = 768 * 768


def image_processor(
    source: str | Path, config: PretrainedConfig, max_pixels: int | None = IMAGE_MAX_PIXELS
) -> Any:
    """The image processor at ``source`` (a folder or hub id) for the model of ``config``; in a
    grid family, images of more than ``max_pixels`` pixels are resized down to it (None: the
    processor's own bound). Other families resize every image to one size anyway."""
    processor = AutoImageProcessor.from_pretrained(source)
    if config.model_type not in GRID_FAMILIES or max_pixels is None:
        return processor
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise XtunerError(f"image_max_pixels must be a positive integer, got {max_pixels!r}")
    if max_pixels < processor.size["longest_edge"]:  # Qwen2-VL's name for its pixel bound
        processor = AutoImageProcessor.from_pretrained(source, max_pixels=max_pixels)
    return processor


def image_tokens(model: str | Path | PretrainedConfig, tokenizer: Any) -> ImageTokens:
    """The image token, placeholder text and image-token count of ``model`` (a folder, a hub
    id or its config)."""
    config = model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(model)
    family = config.model_type
    per_tile = getattr(config, "image_seq_length", None) if family in TILE_FAMILIES else None
    if family in SPLIT_FAMILIES:
        return _split_tokens(config, tokenizer)
    if family in GRID_FAMILIES:
        count = functools.partial(_grid_count, config.vision_config.spatial_merge_size**2)
    elif family in ANYRES_FAMILIES:
        count = _anyres_count(config)
    elif per_tile:
        count = functools.partial(_tile_count, int(per_tile))
    else:
        raise XtunerError(
            f"{model}: {type(config).__name__} ({family}) is not supported yet; image-text "
            f"families supported: {', '.join(SUPPORTED)}"
        )
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else None
    if token is None or token_id == tokenizer.unk_token_id:
        raise XtunerError(f"{model}: the tokenizer has no image token ({token_id})")
    around = [getattr(config, f"vision_{end}_token_id", None) for end in ("start", "end")]
    if all(t is not None for t in around):  # Qwen2-VL: the image between its two markers
        start, end = tokenizer.convert_ids_to_tokens(around)
        token = f"{start}{token}{end}"
    elif family == "internvl":
        start = getattr(tokenizer, "start_image_token", None) or INTERNVL_MARKERS[0]
        end = getattr(tokenizer, "end_image_token", None) or INTERNVL_MARKERS[1]
        token = f"{start}{token}{end}"
    return ImageTokens(int(token_id), token, count)


def _tile_count(per_tile: int, inputs: dict[str, torch.Tensor]) -> int:
    """LLaVA (an image is one tile) and InternVL (its pixel values one per tile)."""
    return per_tile * inputs["pixel_values"].shape[0]


def _grid_count(merge: int, inputs: dict[str, torch.Tensor]) -> int:
    """Qwen2-VL: one token per ``merge`` patches of the image's grid."""
    return int(inputs["image_grid_thw"].prod()) // merge


def _anyres_count(config: PretrainedConfig) -> Callable[[dict[str, torch.Tensor]], int]:
    """LLaVA-NeXT's image-token count of an image's inputs (its original size): the patches of
    the tiles its best-fitting resolution holds, less the padding around the image (aspect
    kept), a newline token per row of them, and the base tile's patches (a CLIP tower's class
    token among them; the default feature selection drops the first)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size  # patches along a tile's side
    clip = vision.model_type == "clip_vision_model"

    def count(inputs: dict[str, torch.Tensor]) -> int:
        height, width = (int(v) for v in inputs["image_sizes"][0])
        best = select_best_resolution((height, width), config.image_grid_pinpoints)
        rows, cols = (side * (b // vision.image_size) for b in best)
        if width / height > cols / rows:  # wider than the grid: rows of padding above and below
            rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
        return anyres_tokens(rows, cols, side, clip, config.vision_feature_select_strategy)

    return count


def anyres_tokens(rows: int, cols: int, side: int, clip: bool, strategy: str | None) -> int:
    """LLaVA-NeXT's image-token count: its tiles' ``rows`` × ``cols`` patches (the padding
    around the image cut), a newline token per row of them, and the base tile's ``side`` ×
    ``side`` patches (a CLIP tower's class token among them; the ``default`` feature selection
    drops the first)."""
    return rows * cols + rows + side * side + int(clip) - int(strategy == "default")


def _split_tokens(config: PretrainedConfig, tokenizer: Any) -> ImageTokens:
    """Idefics3 / SmolVLM: an image's text is its tiles' (each after its row and column token,
    between fake image tokens) and the thumbnail's (after the global image token), as
    transformers' processor writes it; a tile's tokens are its patches, pixel-shuffled."""
    vision = config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    tiles_text = functools.partial(
        split_image_text,
        image_seq_len=per_tile,
        fake_token_around_image=getattr(tokenizer, "fake_image_token", None)
        or "<fake_token_around_image>",
        image_token=token,
        global_image_token=getattr(tokenizer, "global_image_token", None) or "<global-img>",
    )
    return ImageTokens(config.image_token_id, token, tiles_text=tiles_text, tokenizer=tokenizer)


def process_image_dataset(
    data_files: str | list,
    tokenizer: Any,
    processor: str,
    template: Any = None,
    max_length: int = 2048,
    pack: bool = True,
    seed: int = 0,
    image_folder: str | None = None,
    skip_invalid: bool = False,
    image_max_pixels: int | None = IMAGE_MAX_PIXELS,
) -> ProcessedImageDataset:
    """Image conversations (``data/images.py`` lists the row shapes) as packed rows.

    ``processor``: the model whose image processor and image-token count apply (the folder or
    hub id being trained). ``image_folder``: where relative image paths start (default: each
    data file's folder). ``image_max_pixels``: Qwen2-VL's images are resized down to at most
    this many pixels (its tokens follow an image's size; None: the processor's own bound)."""
    files = source_files(data_files)
    tokenizer_ref, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
    template = resolve_template(template, tokenizer, tokenizer_ref)
    config = AutoConfig.from_pretrained(processor)
    images = image_tokens(config, tokenizer)
    store = ImageStore(image_processor(processor, config, image_max_pixels),
                       dataset_cache_dir() / "images", images.process)  # fmt: skip
    stats = DatasetStats(sources=files, max_length=max_length, packed=pack)
    skipped: Counter[str] = Counter()
    parts: list[TokenizedBatch] = []
    sample_images: list[list[int]] = []
    for path in files:
        folder = Path(image_folder) if image_folder else Path(path).expanduser().parent
        _read_file(path, folder, tokenizer, template, images, store, max_length, skip_invalid,
                   stats, skipped, parts, sample_images)  # fmt: skip
    stats.rows_skipped = dict(skipped)
    if not parts:
        raise DataError(f"no usable rows left ({dict(skipped)})", source=", ".join(files))
    tokens = TokenizedBatch.concat(parts)
    order = (
        pack_indices(tokens.lengths.tolist(), max_length, seed)
        if pack
        else [[i] for i in np.random.default_rng(seed).permutation(len(parts)).tolist()]
    )
    packed = arrange(tokens, order)
    stats.samples, stats.rows = len(parts), len(packed)
    stats.tokens, stats.trained_tokens = packed.num_tokens, packed.num_trained_tokens
    stats.lengths = length_summary(packed.sample_lengths)
    in_order = [sample_images[i] for row in order for i in row]
    return ProcessedImageDataset(ImageData(packed, in_order, store), stats)


def _read_file(
    path: str, folder: Path, tokenizer: Any, template: Any, images: ImageTokens,
    store: ImageStore, max_length: int, skip_invalid: bool, stats: DatasetStats,
    skipped: Counter[str], parts: list[TokenizedBatch], sample_images: list[list[int]],
) -> None:  # fmt: skip
    """One file's rows appended to ``parts`` (tokens) and ``sample_images`` (their images'
    indices in ``store``); a bad row raises naming it, or is counted with ``skip_invalid``."""
    rows = load_rows(path, skip_invalid=skip_invalid)
    stats.rows_loaded += len(rows) + len(rows.invalid)
    for where, reason in rows.invalid:
        note_skip(stats, skipped, f"{rows.source} {where}", reason)
    for index, row in enumerate(rows.records):
        try:
            conversation, refs = image_conversation(row)
            found = [store.add(ref, folder) for ref in refs]
            layouts = [store.layouts[i] for i in found]
            tokens = _sample(conversation, layouts, tokenizer, template, images, max_length)
        except RowError as exc:
            if not (skip_invalid or exc.skip):
                raise DataError(exc.reason, rows.source, rows.locate(index), exc.field) from None
            note_skip(stats, skipped, f"{rows.source} {rows.locate(index)}", exc.reason)
            continue
        parts.append(tokens)
        sample_images.append(found)
        stats.rows_truncated += int(tokens.truncated[0])


def _sample(
    conversation: dict, layouts: list[Layout], tokenizer: Any, template: Any,
    images: ImageTokens, max_length: int,
) -> TokenizedBatch:  # fmt: skip
    """One conversation tokenized with its images' tokens expanded (``layouts``: each image's,
    in placeholder order)."""
    messages, tools = validate_conversation(conversation)
    placed = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placed != len(layouts):
        raise RowError(f"{placed} {IMAGE_TOKEN} placeholders for {len(layouts)} images", "images")
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "assistant"):
        raise RowError(f"an assistant turn holds {IMAGE_TOKEN}: images are inputs", "messages")
    messages = [{**m, "content": images.in_text(m["content"])} for m in messages]
    tokens = tokenize_rendered([template.render(messages, tokenizer, tools)], tokenizer, None)
    ids, labels = tokens.input_ids, tokens.labels
    if int((ids == images.token_id).sum()) != len(layouts):
        raise RowError(f"the tokenizer split {images.placeholder}: it must be special tokens")
    ids, labels, is_image = images.expand_labelled(ids, labels, layouts)
    truncated = len(ids) > max_length
    if truncated:
        if is_image[max_length:].any():
            raise RowError(
                f"its image tokens reach past max_length={max_length} (an image is never cut)",
                skip=True,
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if not (labels[1:] != IGNORE_INDEX).any():
        raise RowError(f"no trained token left after truncation to max_length={max_length}",
                       skip=True)  # fmt: skip
    return TokenizedBatch(ids, labels, np.array([len(ids)]), np.array([truncated]))


class ImageTextDataset(torch.utils.data.Dataset):
    """Packed rows with images; its ``collate`` adds the rows' pixel values in token order."""

    def __init__(self, data: ImageData, stats: DatasetStats):
        self.data, self.stats = data, stats

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data.row(i)

    def collate(
        self, rows: list[dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int = 1
    ) -> dict[str, torch.Tensor]:
        batch = collate_packed(rows, pad_token_id, pad_to_multiple_of)
        index = [j for r in rows for j in r["images"]]
        if index:
            batch.update(self.data.images.load(index))
        return batch


__all__ = [
    "ANYRES_FAMILIES",
    "GRID_FAMILIES",
    "SPLIT_FAMILIES",
    "TILE_FAMILIES",
    "IMAGE_MAX_PIXELS",
    "ImageData",
    "ImageTextDataset",
    "ImageTokens",
    "Layout",
    "ProcessedImageDataset",
    "anyres_tokens",
    "image_processor",
    "image_tokens",
    "process_image_dataset",
]
