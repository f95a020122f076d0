"""Build the model to train: full fine-tune, LoRA (peft) or QLoRA (bitsandbytes NF4 + peft)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from xtuner_lite.config import is_int, is_number, settings_of
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import parse_dtype, resolve_model_path, reward_model_from_pretrained
from xtuner_lite.model.attention import PACKED_SDPA, register_packed_sdpa
from xtuner_lite.model.dropout import fuse_lora_dropout
from xtuner_lite.model.lean_layers import use_lean_layers
from xtuner_lite.model.lean_lora import use_lean_lora
from xtuner_lite.model.vlm import (
    VisionSettings,
    freeze_parts,
    is_image_text,
    lora_targets,
    modules_to_save,
    not_quantized,
    without_autograd_in_frozen_tower,
)

Method = Literal["full", "lora", "qlora"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules='all-linear'`` means every linear but the head."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r) instead of alpha / r
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rules = [
            ("r", is_int(self.r) and self.r >= 1, "an integer >= 1"),
            ("alpha", is_number(self.alpha) and self.alpha > 0, "a number > 0"),
            ("dropout", is_number(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
            ("use_dora", isinstance(self.use_dora, bool), "true or false"),
            ("use_rslora", isinstance(self.use_rslora, bool), "true or false"),
            (
                "target_modules",
                isinstance(self.target_modules, str)
                or (
                    isinstance(self.target_modules, (list, tuple))
                    and self.target_modules
                    and all(isinstance(m, str) for m in self.target_modules)
                ),
                "'all-linear' or a list of module names",
            ),
        ]
        problems = [
            f"model.lora.{key} must be {accepted}, got {getattr(self, key)!r}"
            for key, ok, accepted in rules
            if not ok
        ]
        if problems:
            raise XtunerError("; ".join(problems))

    @classmethod
    def from_config(cls, value: LoraSettings | dict | None) -> LoraSettings:
        """From a config's ``model.lora`` dict, naming an unknown or misspelt key."""
        return settings_of(cls, value, "model.lora")


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Wrapping a model in peft: peft reads ``is_gradient_checkpointing``, which transformers
    5 deprecates with a FutureWarning on every run that a user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        yield


def disable_cpu_4bit_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights in eval-mode forwards on AVX512-BF16 CPUs.

    bitsandbytes 0.50 repacks a Linear4bit's weight for a faster CPU kernel the first time it runs
    a no-grad forward in eval mode; after that the LoRA layers above it get zero or no gradient.
    Returns how many layers were guarded.
    """
    import bitsandbytes as bnb  # only for 4-bit layers (a slow import)

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def checkpointed_layers(num_layers: int, setting: bool | int | float) -> list[bool]:
    """Which decoder layers recompute their activations in backward.

    ``True``: all; ``False``: none; an integer k >= 1: every k-th; a fraction 0 < f < 1: that
    share of the layers, spread evenly — the knob to fill the memory left over by full
    checkpointing (each layer kept saves its recomputation).
    """
    if setting is True or setting is False:
        return [setting] * num_layers
    if isinstance(setting, int) and setting >= 1:
        return [i % setting == 0 for i in range(num_layers)]
    if isinstance(setting, float) and 0.0 < setting <= 1.0:
        return [int((i + 1) * setting) > int(i * setting) for i in range(num_layers)]
    raise XtunerError(
        f"model.gradient_checkpointing must be true/false, an integer k >= 1 "
        f"(every k-th layer) or a fraction in (0, 1] of the layers, got {setting!r}"
    )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers checkpoints (its GradientCheckpointingLayer subclasses)."""

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def build_model(
    pretrained: str,
    method: Method = "lora",
    lora: LoraSettings | dict | None = None,
    dtype: str = "fp32",
    compute_dtype: str = "bf16",
    quant_storage: str = "uint8",
    gradient_checkpointing: bool | int | float = False,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device: str | None = None,
    lora_dtype: str = "fp32",
    head: Literal["lm", "reward"] = "lm",
    vision: VisionSettings | dict | None = None,
) -> torch.nn.Module:
    """Load ``pretrained`` (embedded name, folder or hub id) ready to train with ``method``.

    ``dtype`` is the storage dtype of the loaded weights: fp32 master weights for a full
    fine-tune; bf16 halves the frozen base of LoRA (adapter weights stay fp32, trained under
    autocast). ``compute_dtype`` is what the 4-bit layers dequantize to in QLoRA;
    ``quant_storage`` the dtype their packed 4-bit bytes are stored as: a float dtype (bf16,
    fp32) lets DeepSpeed ZeRO-3 and FSDP shard them like any other weight.
    ``gradient_checkpointing``: True recomputes every decoder layer in backward; an integer k
    recomputes every k-th layer only (torchtune's selective checkpointing), a fraction that
    share of the layers, trading memory for speed.
    ``lora_dtype``: the adapter's weights (and so gradients); fp32 by default, bf16 as the QLoRA
    paper's reference code does — half the adapter memory for large r on big models.
    ``device``: a CUDA device loads (and NF4-quantizes) the weights straight onto the GPU, layer
    by layer, instead of building the whole model in host memory first.
    ``head``: ``lm`` (a causal LM) or ``reward`` (a scalar score on the last token, trained
    with the adapter; set by a reward-model objective).
    ``vision``: for an image-text model (``model/vlm.py``), what trains besides the adapter
    (the projector by default) or, in a full fine-tune, which parts are frozen.
    """

    if method not in ("full", "lora", "qlora"):
        raise XtunerError(f"model.method must be 'full', 'lora' or 'qlora', got {method!r}")
    if head not in ("lm", "reward"):
        raise XtunerError(f"model.head must be 'lm' or 'reward', got {head!r}")
    asked = VisionSettings.from_config(vision)
    if asked.quantize_vision_tower and method != "qlora":
        raise XtunerError("model.vision.quantize_vision_tower applies to method='qlora'")
    model = _load_base(pretrained, method, dtype, compute_dtype, quant_storage,
                       attn_implementation, trust_remote_code, device, head,
                       asked.quantize_vision_tower)  # fmt: skip
    settings = asked if is_image_text(model.config) else None
    if vision is not None and settings is None:
        raise XtunerError(f"model.vision is set but {pretrained} is not an image-text model")
    if gradient_checkpointing:
        _checkpoint_layers(model, gradient_checkpointing, method)
    if settings is not None:
        without_autograd_in_frozen_tower(model, settings)
    if method == "full":
        if settings is not None:
            freeze_parts(model, settings)
        return model
    return _add_adapter(model, LoraSettings.from_config(lora), lora_dtype, head, settings)


def _load_base(
    pretrained: str, method: str, dtype: str, compute_dtype: str, quant_storage: str,
    attn_implementation: str, trust_remote_code: bool, device: str | None, head: str,
    quantize_vision_tower: bool = False,
) -> torch.nn.Module:  # fmt: skip
    """The base model with our lean layers and packed attention (NF4 4-bit for QLoRA: an
    image-text model's language model, and its vision tower with ``quantize_vision_tower``)."""
    # QLoRA quantizes from the stored (fp32) weights; LoRA/full load a bf16/fp16 copy directly
    path = resolve_model_path(pretrained, None if method == "qlora" else dtype)
    kwargs: dict[str, Any] = dict(
        dtype=parse_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    if device is not None and str(device).startswith("cuda"):
        kwargs["device_map"] = {"": device}
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_text = is_image_text(config)
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            # an image-text model: the language model is quantized (QLoRA's subject)
            llm_int8_skip_modules=not_quantized(config, quantize_vision_tower)
            if image_text
            else None,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
            bnb_4bit_quant_storage=torch.uint8
            if quant_storage == "uint8"
            else parse_dtype(quant_storage),
        )
    if head == "reward":
        model = reward_model_from_pretrained(path, **kwargs)
    elif image_text:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    use_lean_layers(model)
    canonical = resolve_model_path(pretrained)  # what adapters record as their base
    model.name_or_path = model.config._name_or_path = canonical
    if attn_implementation == "sdpa" and model.is_backend_compatible():
        # SDPA that attends sample by sample in packed rows; models with their own attention
        # code (remote code) keep SDPA and get the block mask. (An image-text model's vision
        # tower gets it too: without segments it is SDPA.)
        register_packed_sdpa()
        model.config._attn_implementation = PACKED_SDPA
    if method == "qlora":
        disable_cpu_4bit_repack(model)
    return model


def _checkpoint_layers(model: torch.nn.Module, setting: bool | int | float, method: str) -> None:
    """Recompute the chosen decoder layers in backward."""
    # reentrant: the first pass runs without autograd, so it leaves no graph nodes behind;
    # non-reentrant's small long-lived nodes split the heap's freed activation blocks
    # and raise the peak
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if method != "full":
        model.enable_input_require_grads()  # frozen embeddings: let checkpointed grads flow
    layers = decoder_layers(model)
    chosen = checkpointed_layers(len(layers), setting)
    if not all(chosen) and not layers:
        raise XtunerError(
            f"{type(model).__name__} has no transformers checkpointing layers; "
            "use model.gradient_checkpointing=True instead of a subset"
        )
    for layer, recompute in zip(layers, chosen):
        layer.gradient_checkpointing = recompute


def _add_adapter(
    model: torch.nn.Module, settings: LoraSettings, lora_dtype: str, head: str,
    vision: VisionSettings | None = None,
) -> torch.nn.Module:  # fmt: skip
    """The peft LoRA/DoRA adapter on the frozen base, with our fused dropout and lean LoRA.
    An image-text model: ``all-linear`` means the language model's linear layers (and the
    vision tower's with ``vision.lora_vision_tower``); the unfrozen parts train in full."""
    targets = settings.target_modules
    extra = dict(settings.extra)
    if vision is not None:
        if vision.freeze_language_model:
            raise XtunerError("model.vision.freeze_language_model applies to method='full'")
        if targets == "all-linear":
            targets = lora_targets(model, vision)
        extra.setdefault("modules_to_save", modules_to_save(model, vision) or None)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM" if head == "lm" else "SEQ_CLS",  # SEQ_CLS also trains the score
        **extra,
    )
    with peft_wrapping():
        model = get_peft_model(model, config)  # adapter weights are fp32 whatever the base dtype
    # what trains in full beside the adapter (an image-text model's projector) is copied from
    # the base in its dtype: it trains in the adapter's, as the adapter does
    if lora_dtype not in ("fp32", "float32") or vision is not None:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(parse_dtype(lora_dtype))
    fuse_lora_dropout(model)
    use_lean_lora(model)
    return model


def model_head(model: torch.nn.Module) -> str:
    """``reward`` for a sequence-classification (scalar score) model, else ``lm``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "reward" if getattr(inner, "score", None) is not None else "lm"


def skip_adapter_input_casts(model: torch.nn.Module) -> int:
    """Under autocast, stop peft casting each LoRA layer's input to the adapter's fp32 dtype.

    Autocast casts it back to the compute dtype for the matmul anyway; the two copies are pure
    overhead. Only valid when forwards run under autocast.
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            module.cast_input_dtype_enabled = False
            count += 1
    return count
