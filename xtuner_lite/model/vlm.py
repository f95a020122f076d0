"""Image-text models: transformers' own classes after loading, and XTuner's LLaVA composition.

Every image-text model is trained through one path: loaded with ``AutoModelForImageTextToText``
(LLaVA, Qwen2-VL, Idefics3/SmolVLM, InternVL, ... whichever transformers carries), its decoder
(``model.model``) takes ``pixel_values`` beside ``input_ids`` and returns the hidden states our
chunked loss reads, exactly as a causal LM's decoder does. XTuner's composition — any vision
encoder, an MLP projector, any causal LM we already train — is written as a standard
``LlavaForConditionalGeneration`` folder (:func:`compose_llava`), so transformers (and vLLM)
load what we train, and training it is the same path again.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    SiglipImageProcessorPil,
)

from xtuner_lite.config import settings_of
from xtuner_lite.data.images import IMAGE_TOKEN
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import is_image_text, parse_dtype
from xtuner_lite.model.attention import segments_of

# the parts of a LLaVA-family model (transformers' names)
VISION_TOWER, PROJECTOR, LANGUAGE_MODEL = "vision_tower", "multi_modal_projector", "language_model"


@dataclass(frozen=True)
class Parts:
    """Where a family keeps its vision tower, projector and language model (paths under the
    model's ``model``); the projector may sit inside the tower (Qwen2-VL's ``visual.merger``)."""

    tower: str = VISION_TOWER
    projector: str = PROJECTOR
    language_model: str = LANGUAGE_MODEL
    # parameters beside the projector that follow its switch in a full fine-tune (LLaVA-NeXT's
    # image_newline; a LoRA run leaves them as loaded: an adapter saves modules, not these)
    with_projector: tuple[str, ...] = ()


QWEN_VL_PARTS = Parts("visual", "visual.merger")
IDEFICS_PARTS = Parts("vision_model", "connector", "text_model")
LLAVA_NEXT_PARTS = Parts(with_projector=("image_newline",))
# families whose parts are not LLaVA's names (transformers' model_type)
PARTS = {
    "qwen2_vl": QWEN_VL_PARTS,
    "qwen2_5_vl": QWEN_VL_PARTS,
    "qwen3_vl": QWEN_VL_PARTS,
    "idefics3": IDEFICS_PARTS,
    "smolvlm": IDEFICS_PARTS,
    "llava_next": LLAVA_NEXT_PARTS,
}
# families whose models take an image's tiles with a leading batch axis, (batch, tiles, ...):
# the data and engine keep every image's tiles along the first axis, as the others take them
BATCHED_TILES = ("idefics3", "smolvlm")


def parts_of(model: torch.nn.Module | PretrainedConfig) -> Parts:
    """The part names of an image-text model (or its config)."""
    config = getattr(model, "config", model)
    return PARTS.get(getattr(config, "model_type", None), Parts())


def not_quantized(config: PretrainedConfig, quantize_tower: bool = False) -> list[str]:
    """What QLoRA leaves unquantized in an image-text model (transformers'
    ``llm_int8_skip_modules`` patterns, matched from a module name's start): the projector,
    the head (as in a causal LM) and, unless ``quantize_tower``, the vision tower."""
    names = parts_of(config)
    kept = [names.projector] + ([] if quantize_tower else [names.tower])
    return [rf"(?:.*\.)?{re.escape(name)}" for name in kept] + ["lm_head"]


@dataclass
class VisionSettings:
    """What trains in an image-text model (LLaMA-Factory's three freeze switches, and LoRA on
    the vision tower). A LoRA/QLoRA adapter goes on the language model; the projector, when
    not frozen, trains in full beside it (its weights are saved with the adapter)."""

    freeze_vision_tower: bool = True  # False: trained in full (LLaVA stage 1 of a new encoder)
    freeze_projector: bool = False  # False: trained in full, in LoRA runs too
    freeze_language_model: bool = False  # a full fine-tune only: LoRA leaves the base frozen
    lora_vision_tower: bool = False  # the adapter on the vision tower's linear layers too
    # QLoRA only: the frozen tower's linear layers in NF4 too (a large tower on an 8 GB card)
    quantize_vision_tower: bool = False

    def __post_init__(self) -> None:
        wrong = [
            f"model.vision.{key} must be true or false, got {getattr(self, key)!r}"
            for key in (
                "freeze_vision_tower",
                "freeze_projector",
                "freeze_language_model",
                "lora_vision_tower",
                "quantize_vision_tower",
            )  # fmt: skip
            if not isinstance(getattr(self, key), bool)
        ]
        if wrong:
            raise XtunerError("; ".join(wrong))

    @classmethod
    def from_config(cls, value: VisionSettings | dict | None) -> VisionSettings:
        """From a config's ``model.vision`` dict, naming an unknown or misspelt key."""
        return settings_of(cls, value, "model.vision")


def part(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The module at ``name`` (a dotted path such as a :class:`Parts` field) under the
    model's ``model`` (None if it has no such part)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = getattr(inner, "model", inner)
    for step in name.split("."):
        module = getattr(module, step, None)
    return module


def lora_targets(model: torch.nn.Module, settings: VisionSettings) -> str:
    """peft ``target_modules`` (a full-match regex) for every linear layer of the language
    model, and of the vision tower with ``lora_vision_tower``: never the projector (trained in
    full or frozen, even where it sits inside the tower) nor the head."""
    names = parts_of(model)
    parts = [names.language_model] + ([names.tower] if settings.lora_vision_tower else [])
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and any(f"{p}." in name for p in parts)
            and f"{names.projector}." not in name
        }
    )
    if not leaves:
        raise XtunerError(f"{type(model).__name__} has no linear layers under {parts}")
    where = "|".join(re.escape(p) for p in parts)
    skip = re.escape(f"{names.projector}.")
    return rf"(?!.*{skip}).*\.({where})\..*\.({'|'.join(map(re.escape, leaves))})"


def modules_to_save(model: torch.nn.Module, settings: VisionSettings) -> list[str]:
    """The parts a LoRA run trains in full (saved with the adapter)."""
    names = parts_of(model)
    full = [] if settings.freeze_projector else [names.projector]
    if not settings.freeze_vision_tower and not settings.lora_vision_tower:
        # a tower holding the projector is saved whole, the projector with it
        inside = names.projector.startswith(f"{names.tower}.")
        full = [p for p in full if not inside] + [names.tower]
    return full


def freeze_parts(model: torch.nn.Module, settings: VisionSettings) -> None:
    """A full fine-tune: stop gradients to the frozen parts (the tower first, so that a
    projector inside it follows its own switch)."""
    names = parts_of(model)
    frozen = {
        names.tower: settings.freeze_vision_tower,
        names.projector: settings.freeze_projector,
        names.language_model: settings.freeze_language_model,
    }
    for name, freeze in frozen.items():
        module = part(model, name)
        if module is not None:
            module.requires_grad_(not freeze)
    for name in names.with_projector:
        part(model, name).requires_grad_(not settings.freeze_projector)
    if settings.freeze_language_model:
        head = model.get_output_embeddings()
        if head is not None:
            head.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise XtunerError("model.vision freezes every part of the model: nothing would train")


def rope_index_of(model: torch.nn.Module) -> Any:
    """The model's own ``get_rope_index`` where its rotary positions follow its images' patch
    grids (Qwen2-VL's multimodal RoPE), else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(inner, "model", None), "get_rope_index", None)


def _on_grid(
    rope_index: Any, ids: torch.Tensor, token: int, grids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, length) rotary positions of one sequence ``ids`` whose image tokens are ``token``,
    its images' patch grids ``grids``, and its rotary offset for the tokens after it."""
    found, shift = rope_index(ids[None], mm_token_type_ids=(ids == token).int()[None],
                              image_grid_thw=grids)  # fmt: skip
    return found[:, 0], shift.view(())


def grid_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(4, batch, width) position ids of a packed batch for a model whose rotary positions
    follow its images' patch grids (Qwen2-VL's multimodal RoPE), or None for any other model:
    the per-sample text positions (which keep attention in each sample) and the three rotary
    axes, computed sample by sample by the model's own ``get_rope_index``."""
    rope_index = rope_index_of(model)
    if rope_index is None:
        return None
    text, ids = batch["position_ids"], batch["input_ids"]
    token = model.config.image_token_id
    grids = batch.get("image_grid_thw")
    merge = model.config.vision_config.spatial_merge_size**2
    sizes = [] if grids is None else (grids.prod(-1) // merge).tolist()
    axes = text[None].repeat(3, 1, 1)  # a sample without images: its text positions
    taken = 0
    for row, start, end in segments_of(batch["cu_seqlens"], *ids.shape):
        sample = ids[row, start:end]
        left, first = int((sample == token).sum()), taken
        while left > 0:  # this sample's images: the next ones, whose tokens add up to its own
            left, taken = left - sizes[taken], taken + 1
        if taken > first:
            axes[:, row, start:end] = _on_grid(rope_index, sample, token, grids[first:taken])[0]
    return torch.cat([text[None], axes])


def model_image_inputs(
    config: PretrainedConfig, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Image inputs (every image's tiles along the first axis) as the model takes them:
    Idefics3 / SmolVLM's in one batch of tiles (it drops padding tiles and keeps the order)."""
    if config.model_type in BATCHED_TILES:
        return {key: value[None] for key, value in inputs.items()}
    return inputs


def prompt_positions(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    images: list[dict[str, torch.Tensor] | None],
    cached: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of left-padded prompts run with a KV cache, and each row's rotary offset for
    its later tokens. ``ids``: (rows, width), the last ``width`` columns of ``mask``, the rows'
    attention mask over cached and new columns; ``images``: each row's image inputs (those of
    its cached tokens too); ``cached``: each row's tokens already in the cache (a prefix-cache
    hit), which ran at their positions in the whole prompt. For Qwen2-VL (3, rows, width), a
    row with images placed by the model's ``get_rope_index`` over its whole prompt (its image
    tokens on their patch grid) and offset by what that saves; for any other model
    (rows, width) and None."""
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    rope_index = rope_index_of(model)
    if rope_index is None:
        return positions, None
    axes = positions[None].repeat(3, 1, 1)
    delta = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    token = model.config.image_token_id
    for row, given in enumerate(images):
        if given is None:
            continue
        own = ids[row][mask[row, -width:].bool()]
        before = torch.tensor(cached[row] if cached else [], dtype=ids.dtype, device=ids.device)
        grids = given["image_grid_thw"].to(ids.device)
        found, delta[row] = _on_grid(rope_index, torch.cat([before, own]), token, grids)
        axes[:, row, width - len(own) :] = found[:, len(before) :]
    return axes, delta


def offset_positions(positions: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """(rows, length) positions of tokens after a prompt, as the model takes them: for Qwen2-VL
    (``delta``: each row's rotary offset, or each token's, (rows, length)) on all three rotary
    axes."""
    if delta is None:
        return positions
    return (positions + (delta[:, None] if delta.dim() == 1 else delta))[None].expand(3, -1, -1)


# a processor's own files, besides its tokenizer's (transformers' names)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def save_processor(source: str | Path, folder: Path, tokenizer: Any = None) -> None:
    """The processor of the image-text model at ``source`` (a local folder) written to
    ``folder``, around ``tokenizer`` and its chat template when given. Where transformers
    cannot build the whole processor (Qwen2-VL's has a video half that needs torchvision,
    which a CPU install lacks), its files are copied as they are: the tokenizer, saved beside
    them, carries the chat template."""
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (ImportError, AttributeError, ValueError):  # a part needs a package not installed
        processor = None
    if not isinstance(processor, ProcessorMixin):
        for name in PROCESSOR_FILES:
            if (Path(source) / name).exists():
                shutil.copyfile(Path(source) / name, Path(folder) / name)
        return
    if tokenizer is not None:
        processor.tokenizer = tokenizer
        processor.chat_template = tokenizer.chat_template
    processor.save_pretrained(folder)


def without_autograd_in_frozen_tower(model: torch.nn.Module, settings: VisionSettings) -> None:
    """Run a frozen vision tower (no adapter in it, not trained) without autograd, where the
    projector is not inside it: nothing it computes needs a gradient, but the hooks that let
    checkpointed layers pass gradients to an adapter (transformers and peft put one on every
    embedding) would make its checkpointed layers recompute and backpropagate. Its layers are
    not checkpointed either (call this after checkpointing is turned on): they keep nothing
    for backward. (Qwen2-VL's tower holds its merger: it keeps autograd.)"""
    names = parts_of(model)
    tower = part(model, names.tower)
    trained = settings.lora_vision_tower or not settings.freeze_vision_tower
    if tower is None or trained or names.projector.startswith(f"{names.tower}."):
        return
    # hooks, not a wrapped forward: a deep copy of the model keeps them (bound to the copy)
    tower.register_forward_pre_hook(_pause_autograd)
    tower.register_forward_hook(_resume_autograd, always_call=True)
    for module in tower.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False


def _pause_autograd(module: torch.nn.Module, args: Any) -> None:
    module._autograd_was_on = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _resume_autograd(module: torch.nn.Module, args: Any, output: Any) -> None:
    torch.set_grad_enabled(module._autograd_was_on)


# ------------------------------------------------------------------ LLaVA composition


def compose_llava(
    language_model: str | Path,
    vision_config: dict[str, Any] | PretrainedConfig | None,
    out_dir: str | Path,
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    projector_hidden_act: str = "gelu",
    vision_weights: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    vision_model: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Write a ``LlavaForConditionalGeneration`` folder: the causal LM at ``language_model``
    (its weights, tokenizer and chat template, with ``<image>`` added), a vision encoder of
    ``vision_config`` (a ``model_type`` such as ``siglip_vision_model`` or
    ``clip_vision_model`` and its sizes; weights from ``vision_weights`` or initialized at
    random with ``seed`` to be trained), or the pretrained encoder ``vision_model`` (a CLIP or
    SigLIP folder or hub id: its vision config and weights), and a randomly initialized
    two-layer MLP projector.
    Every patch feature is kept (``full``): a CLIP tower's class token is then one more image
    token. The processor resizes images to the encoder's ``image_size`` and normalizes with
    ``image_mean`` / ``image_std``. The folder's weights are stored in ``dtype``: bf16 for a
    model whose frozen parts train in bf16 (what hub checkpoints ship), since loading an fp32
    file as bf16 maps the whole fp32 file while it converts; fp32 (the default) for a tower or
    projector that starts from random weights and trains in full."""
    if vision_model is not None:
        source = AutoConfig.from_pretrained(vision_model)
        vision = getattr(source, "vision_config", None) or source
        _without_pooling_head(vision)
    elif vision_config is None:
        raise XtunerError("compose_llava needs a vision_config or a vision_model")
    else:
        vision = _vision_config(vision_config)
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= llm.config.vocab_size:
        # its embedding is never read: the image features take its place
        llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=llm.config,
        image_token_id=image_token_id,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=patches + int(vision.model_type == "clip_vision_model"),
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if vision_model is not None:
        tower = type(model.model.vision_tower).from_pretrained(vision_model, config=vision)
        vision_weights = tower.state_dict()
    if vision_weights is not None:
        model.model.vision_tower.load_state_dict(vision_weights)
    out = Path(out_dir)
    model.to(parse_dtype(dtype)).save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(
            size={"height": vision.image_size, "width": vision.image_size},
            image_mean=list(image_mean),
            image_std=list(image_std),
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(vision.model_type == "clip_vision_model"),
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    return out


def _vision_config(value: dict[str, Any] | PretrainedConfig) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    settings = dict(value)
    kind = settings.pop("model_type", "siglip_vision_model")
    if kind == "siglip_vision_model":
        settings.setdefault("vision_use_head", False)  # see _without_pooling_head
    try:
        return AutoConfig.for_model(kind, **settings)
    except ValueError as exc:
        raise XtunerError(f"vision_config.model_type {kind!r}: {exc}") from None


def _without_pooling_head(vision: PretrainedConfig) -> None:
    """A SigLIP tower without its attention-pooling head: LLaVA reads the patch features, never
    the pooled one, so the head would be weights held and an attention run for nothing."""
    if vision.model_type == "siglip_vision_model":
        vision.vision_use_head = False


__all__ = [
    "IMAGE_TOKEN",
    "LANGUAGE_MODEL",
    "PARTS",
    "PROJECTOR",
    "Parts",
    "VISION_TOWER",
    "VisionSettings",
    "compose_llava",
    "freeze_parts",
    "grid_positions",
    "is_image_text",
    "lora_targets",
    "model_image_inputs",
    "modules_to_save",
    "not_quantized",
    "offset_positions",
    "part",
    "parts_of",
    "rope_index_of",
    "without_autograd_in_frozen_tower",
    "prompt_positions",
    "save_processor",
]
