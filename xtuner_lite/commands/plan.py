"""``xtuner plan``: predict a training run's peak memory from the model's config alone.

Components: weights (quantized / frozen / trainable), gradients, optimizer state, the
activations autograd keeps for backward (every decoder layer, or only layer inputs under
gradient checkpointing plus the one layer being recomputed), the loss's logits (whole or in
chunks) and framework overhead. The activation count follows what autograd saves in a Hugging
Face Llama-style decoder layer under autocast (see ``layer_activation_bytes``); it is checked
against saved-tensor measurements of real runs in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig

from xtuner_lite.config import load_config
from xtuner_lite.data.image_text import GRID_FAMILIES, IMAGE_MAX_PIXELS, anyres_tokens
from xtuner_lite.errors import XtunerError
from xtuner_lite.hub import resolve_model_path
from xtuner_lite.model.attention import MATMUL_ATTENTION_MAX_LENGTH
from xtuner_lite.model.build import checkpointed_layers
from xtuner_lite.model.forward import loss_sum
from xtuner_lite.model.loss import loss_chunk_tokens
from xtuner_lite.model.vlm import VisionSettings
from xtuner_lite.objectives import build_objective
from xtuner_lite.training.runner import fp16_fallback
from xtuner_lite.values import CfgOptions, PositiveInt, Size, parse_size

GiB = 1024**3
MiB = 1024**2
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit + 8-bit absmax / 64 + fp32 / 16384
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# which linears read the same input tensor
INPUT_OF = {
    "q_proj": "attention",
    "k_proj": "attention",
    "v_proj": "attention",
    "o_proj": "attention output",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp hidden",
}


@dataclass
class VisionShape:
    """An image-text model's vision tower and projector: a ViT (CLIP, SigLIP) and LLaVA's MLP,
    or Qwen2-VL / Qwen2.5-VL's tower, whose patch merger is its projector."""

    hidden: int
    intermediate: int
    layers: int
    patches: int  # positions per image through the tower
    image_tokens: int  # positions per image in the language model
    channels: int
    patch: int
    text_hidden: int
    pooling_head: bool = False  # SigLIP's attention-pooling head (held, unused by LLaVA)
    class_token: bool = False  # CLIP's: a class embedding, its position and a norm before
    family: str = "vit"  # or qwen2_vl, qwen2_5_vl
    merge: int = 1  # Qwen2-VL: patches merged into one token (spatial_merge_size squared)
    temporal: int = 1  # Qwen2-VL: frames per patch (an image is repeated to fill them)
    tiles: int = 1  # LLaVA-NeXT: tower passes per image (its most tiles and the base tile)

    @classmethod
    def from_config(cls, config: Any, image_max_pixels: int | None = None) -> VisionShape:
        """``image_max_pixels``: a Qwen2-VL's largest image (its tokens follow the size)."""
        get = _getter(config)
        vision, text = _getter(get("vision_config")), _getter(get("text_config"))
        family = get("model_type")
        if family in GRID_FAMILIES:
            return cls._grid(vision, text("hidden_size"), family, image_max_pixels)
        if not all(vision(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "image_size", "patch_size")):  # fmt: skip
            raise XtunerError(
                "the vision config lacks hidden_size, intermediate_size, num_hidden_layers, "
                "image_size or patch_size"
            )
        size, patch = (_side(vision(k)) for k in ("image_size", "patch_size"))
        patches = (size // patch) ** 2
        clip = vision("model_type") == "clip_vision_model"
        tiles, tokens = 1, get("image_seq_length") or patches
        if family == "llava_next":
            tiles, tokens = _anyres_worst(get, size, patch, clip)
        return cls(
            vision("hidden_size"),
            vision("intermediate_size"),
            vision("num_hidden_layers"),
            patches,  # InternVL: per tile, and its tiles counted as images
            tokens,
            vision("num_channels", 3),
            patch,
            text("hidden_size"),
            vision("model_type") == "siglip_vision_model" and vision("vision_use_head", True),
            clip,
            tiles=tiles,
        )

    @classmethod
    def _grid(
        cls, vision: Callable[..., Any], text_hidden: int, family: str, pixels: int | None
    ) -> VisionShape:
        """Qwen2-VL (``embed_dim``, ``mlp_ratio``) or Qwen2.5-VL (``hidden_size``,
        ``intermediate_size``) at images of ``pixels`` (default: the data pipeline's bound)."""
        if family == "qwen2_vl":
            hidden = vision("embed_dim", 1280)
            intermediate = hidden * vision("mlp_ratio", 4)
        else:
            hidden, intermediate = vision("hidden_size", 1280), vision("intermediate_size", 3420)
        patch, merge = vision("patch_size", 14), vision("spatial_merge_size", 2) ** 2
        patches = (pixels or IMAGE_MAX_PIXELS) // patch**2 // merge * merge
        return cls(
            hidden,
            intermediate,
            vision("depth", 32),
            patches,
            patches // merge,
            vision("in_channels", 3),
            patch,
            text_hidden,
            family=family,
            merge=merge,
            temporal=vision("temporal_patch_size", 2),
        )

    def tower_params(self) -> int:
        """The tower without the projector: patch and position embeddings, per layer attention
        (q, k, v, o), MLP and two norms with biases, the final norm, and what CLIP or SigLIP
        adds; Qwen2-VL's fused qkv, LayerNorms, no position table; Qwen2.5-VL's gated MLP and
        RMSNorms."""
        h, i = self.hidden, self.intermediate
        if self.family != "vit":
            embed = self.channels * self.temporal * self.patch**2 * h  # a bias-free conv
            attention = 4 * (h * h + h)
            if self.family == "qwen2_vl":
                return embed + self.layers * (attention + 2 * h * i + i + h + 4 * h)
            return embed + self.layers * (attention + 3 * h * i + 2 * i + h + 2 * h)
        layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h
        head = h + 4 * (h * h + h) + 2 * h + 2 * h * i + i + h if self.pooling_head else 0
        embed = self.channels * self.patch**2 * h + self.patches * h + 2 * h  # + final norm
        embed += 4 * h if self.class_token else h  # CLIP: class, its position, pre-norm
        return embed + self.layers * layer + head

    def tower_linear_params(self) -> int:
        """The weights of the tower's linear layers (what QLoRA can quantize): attention's
        four projections and the MLP's two (a gated MLP's three); SigLIP's pooling head adds
        its attention output and MLP."""
        h, i = self.hidden, self.intermediate
        head = h * h + 2 * h * i if self.pooling_head else 0
        return self.layers * (4 * h * h + (3 if self.family == "qwen2_5_vl" else 2) * h * i) + head

    def projector_params(self) -> int:
        """LLaVA: two linear layers, vision width to text width, then text width to text
        width. Qwen2-VL's merger: a norm, then the merged patches' features (``merge`` ×
        vision width) through a layer of that width and one to the text width."""
        t = self.text_hidden
        if self.family != "vit":
            m = self.merge * self.hidden
            norm = 2 * self.hidden if self.family == "qwen2_vl" else self.hidden
            return norm + m * m + m + m * t + t
        return self.hidden * t + t + t * t + t

    def layer_activation_bytes(self, per: int, patches: int) -> int:
        """What one tower layer keeps for backward at ``per`` bytes per element: the two norms'
        inputs, q, k, v, the attention output, the MLP input, and its hidden layer twice (a
        gated MLP's three times)."""
        hidden_copies = 3 if self.family == "qwen2_5_vl" else 2
        return per * patches * (7 * self.hidden + hidden_copies * self.intermediate)


def _anyres_worst(get: Callable[..., Any], size: int, patch: int, clip: bool) -> tuple[int, int]:
    """LLaVA-NeXT's most tower passes and language-model tokens an image can take: the
    resolution of most tiles, plus the base tile; its tokens those of an image of that
    resolution's shape (no padding to cut)."""
    side = size // patch
    strategy = get("vision_feature_select_strategy", "default")
    tiles, tokens = 1, 0
    for height, width in get("image_grid_pinpoints") or [[size, size]]:
        rows, cols = side * (height // size), side * (width // size)
        tiles = max(tiles, (height // size) * (width // size) + 1)
        tokens = max(tokens, anyres_tokens(rows, cols, side, clip, strategy))
    return tiles, tokens


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    """A square image's or patch's side (InternVL gives [height, width])."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _getter(config: Any) -> Callable[..., Any]:
    """``get(key, default)`` over a config dict or object (None: nothing)."""
    if config is None:
        return lambda k, d=None: d
    if isinstance(config, dict):
        return lambda k, d=None: config.get(k, d)
    return lambda k, d=None: getattr(config, k, d)


@dataclass
class Shape:
    """The shape-defining fields of a decoder-only transformer config (an image-text model's
    language model, with its vision tower in ``vision``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    vision: VisionShape | None = None

    @classmethod
    def from_config(cls, config: Any, image_max_pixels: int | None = None) -> Shape:
        get = _getter(config)
        if get("vision_config") is not None:
            text = cls.from_config(get("text_config"))
            return replace(text, vision=VisionShape.from_config(config, image_max_pixels))
        heads = get("num_attention_heads")
        if (
            not all(
                get(k)
                for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
            )
            or not heads
        ):
            raise XtunerError(
                "the model config lacks hidden_size, intermediate_size, "
                "num_hidden_layers, num_attention_heads or vocab_size"
            )
        return cls(
            get("hidden_size"),
            get("intermediate_size"),
            get("num_hidden_layers"),
            heads,
            get("num_key_value_heads") or heads,
            get("head_dim") or get("hidden_size") // heads,
            get("vocab_size"),
            bool(get("tie_word_embeddings", False)),
            bool(get("attention_bias", get("model_type") == "qwen2")),
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return sum(a * b for a, b in self.linear_dims().values()) + bias

    def params(self) -> dict[str, int]:
        embed = self.vocab * self.hidden
        return {
            "linear": self.layers * self.layer_linear_params(),
            "norms": self.layers * 2 * self.hidden + self.hidden,
            "embed": embed,
            "head": 0 if self.tied else embed,
        }


@dataclass
class PlanSettings:
    method: str = "qlora"  # full | lora | qlora
    lora_r: int = 64
    lora_targets: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.05
    lora_dtype: str = "fp32"  # the adapter's weights and gradients
    base_dtype: str = "bf16"  # storage dtype of frozen / non-quantized weights
    compute_dtype: str = "bf16"  # autocast dtype (fp32: none)
    max_length: int = 2048
    batch_size: int = 1
    gradient_checkpointing: bool | int | float = True  # as build_model's
    offload: bool = False  # checkpointed layers' inputs in host memory (train.offload_activations)
    chunk_size: int | None = 1024  # loss chunk in tokens; None: whole logits
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    world_size: int = 1
    zero: int = 0  # 0 (plain data parallel), 1, 2, 3 (3 = FSDP full sharding)
    sequence_parallel: int = 1  # ranks sharing each row's tokens (Ulysses), of world_size
    explicit_mask: bool = False  # one block-masked attention call per packed row (eager,
    # remote-code models); otherwise attention runs sample by sample or varlen, maskless
    cpu: bool = False  # CPU kernels: per-sample attention as two matmuls keeping q/k/v up to
    # MATMUL_ATTENTION_MAX_LENGTH (fp32 SDPA for longer samples); LoRA dropout inside lora_A
    overhead_gib: float = 0.5  # CUDA context and allocator slack, not in max_memory_allocated
    dora: bool = False  # DoRA: a trained magnitude per output feature, a weight-sized transient
    # preference training: rows hold both sequences of their pairs (2 × max_length tokens);
    # reference: none (SFT, ORPO, SimPO) | live (adapter-disabled forward, no grad) | copy (a
    # frozen copy for full fine-tuning) | cached (log-probs read from disk: nothing)
    preference: bool = False
    reference: str = "none"
    reward_head: bool = False  # a reward model's one-score head (trained)
    # RL (GRPO): rows hold one completion each, ``sequences_per_item`` (G) per prompt; before
    # training, ``rollout_rows`` completions are sampled together with a KV cache of
    # ``max_length`` columns, and ``nograd_passes`` forwards (old log-probs, reference) run
    sequences_per_item: int = 1
    rollout_rows: int = 0
    rollout_new_tokens: int = 0  # of max_length, the completion's share
    nograd_passes: int = 0
    # an image-text model: what trains in its vision tower (frozen | lora | full), whether the
    # projector trains (in full, fp32), whether a full fine-tune freezes the language model
    # (LLaVA's stage 1), and images per row (0: as many as max_length holds, the worst case)
    vision_tower: str = "frozen"
    projector: bool = True
    freeze_language_model: bool = False
    images_per_row: int = 0
    quantize_vision_tower: bool = False  # QLoRA: the frozen tower's linear layers in NF4


# components alive only during forward/backward, or only during the optimizer step
BACKWARD = (
    "activations",
    "vision activations",
    "all-to-all buffers",
    "recomputed layer",
    "final norm",
    "logits and loss",
    "head gradient",
    "reference forward",
    "DoRA weight",
)
STEP = ("optimizer step",)
# alive only while rollouts are sampled and scored, before the step's forward/backward
ROLLOUT = ("rollout KV cache", "rollout logits", "no-grad forward")
HOST = ("offloaded to host",)  # pinned host memory, not the device's
# layer inputs on the device under offload: the one being copied out (forward), or the one in
# use and the one prefetched (backward)
OFFLOAD_IN_FLIGHT = 2
KV_GROW = 128  # the engine's cache grows by this many columns


@dataclass
class MemoryPlan:
    components: list[tuple[str, float, str]] = field(default_factory=list)  # name, bytes, how

    @property
    def total(self) -> float:
        """Peak: what is held throughout, plus the largest of the transients — forward /
        backward (activations, logits), the optimizer step and RL's rollouts — which never
        overlap."""
        transient = BACKWARD + STEP + ROLLOUT + HOST
        held = sum(b for n, b, _ in self.components if n not in transient)
        return held + max(sum(map(self.get, group)) for group in (BACKWARD, STEP, ROLLOUT))

    def get(self, name: str) -> float:
        return sum(b for n, b, _ in self.components if n == name)


def lora_params(shape: Shape, r: int, targets: tuple[str, ...]) -> int:
    dims = shape.linear_dims()
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise XtunerError(f"unknown LoRA target(s) {unknown}; known: {list(dims)}")
    return shape.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def layer_activation_bytes(shape: Shape, s: PlanSettings, tokens: int) -> float:
    """Bytes autograd saves for backward in one decoder layer for ``tokens`` tokens.

    Per token (Llama-family layers with ``model/lean_layers.py``): each RMSNorm keeps its input
    (in the hidden states' dtype, the base dtype) and a fp32 scale; SDPA keeps q (after
    rotary), k and v repeated to all heads, its output (c bytes each, 4 when it runs in fp32
    on CPU) and the log-sum-exp, while CPU's matmul attention keeps q, k and v (it recomputes
    the probabilities); the MLP keeps gate and up (c·I each). A frozen linear keeps
    nothing (only its weight is needed); a LoRA linear keeps A's output (c·r) and its input —
    once for the linears reading the same tensor, with its dropout mask as bits (CPU) — or, with
    a separate dropout layer (GPU), a mask (1 byte) and a dropped copy (c bytes) per input
    element for each; a trained linear keeps its input in the compute dtype. The fused LoRA
    product (``model/lean_lora.py``, :func:`lean_lora`) keeps its input in the compute dtype:
    a wider input is cast once per linear.
    """
    c = DTYPE_BYTES[s.compute_dtype]
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    if s.cpu and s.max_length <= MATMUL_ATTENTION_MAX_LENGTH:
        attention = c * (q + 2 * shape.kv_heads * shape.head_dim)
    else:
        attention = 4 * (4 if s.cpu else c) * q + 4 * shape.heads
    per_token = 2 * (DTYPE_BYTES[s.base_dtype] * h + 4) + attention + 2 * c * i
    if s.explicit_mask:
        per_token += c * s.max_length  # the block mask, cast per layer
    dims = shape.linear_dims()
    if s.method == "full":
        # inputs in the compute dtype, shared by q/k/v and by gate/up when already that dtype
        per_token += c * (h + q + h + i)
        if DTYPE_BYTES[s.base_dtype] != c:  # each of q/k/v, gate/up casts its own copy
            per_token += c * (2 * h + h)
    else:
        per_token += c * s.lora_r * len(s.lora_targets)  # A's outputs
        if s.lora_dropout > 0 and not s.cpu:  # a mask and a compute-dtype dropped copy each
            per_token += sum((1 + c) * dims[t][0] for t in s.lora_targets)
        else:
            per_token += _lora_input_bytes(dims, s, c, cast=lean_lora(s) or s.lora_dropout == 0)
            if s.lora_dropout > 0:  # CPU's fused dropout keeps each mask as bits
                per_token += sum(dims[t][0] for t in s.lora_targets) / 8
    return per_token * tokens


def lean_lora(s: PlanSettings) -> bool:
    """Whether the LoRA layers run the fused product of ``model/lean_lora.py``: plain LoRA on
    an unquantized base, without dropout or with the dropout fused into A (CPU)."""
    return s.method == "lora" and not s.dora and (s.cpu or s.lora_dropout == 0)


def _lora_input_bytes(
    dims: dict[str, tuple[int, int]], s: PlanSettings, c: int, cast: bool
) -> float:
    """Per token, the inputs LoRA's A products keep when no dropout layer copies them: hidden
    states in the base dtype (the MLP's inner product in the compute dtype), each tensor once
    for the linears reading it — but where each linear casts its input (``cast``: autocast
    without dropout, the fused product) a wider one is cast once per linear."""
    total, counted = 0.0, set()
    for target in s.lora_targets:
        source = INPUT_OF.get(target, target)
        size = c if source == "mlp hidden" else DTYPE_BYTES[s.base_dtype]
        if cast and size != c:
            total += c * dims[target][0]
        elif source not in counted:
            total += size * dims[target][0]
            counted.add(source)
    return total


def layer_weight_copies(shape: Shape, s: PlanSettings) -> float:
    """Autocast's compute-dtype copies of one layer's weights, kept for backward: of every
    linear stored in a wider dtype (fp32 master weights, an fp32 frozen base), and of the LoRA
    weights — but A's on CPU with dropout, whose fused product casts it again in backward.
    The fused LoRA product keeps both LoRA weights' copies and none of the frozen base's (cast
    again in backward). (4-bit layers keep their packed weights, not a dequantized copy.)"""
    c = DTYPE_BYTES[s.compute_dtype]
    if c == 4:
        return 0.0
    copies = 0.0
    lean = lean_lora(s)
    wide_base = s.method == "lora" and DTYPE_BYTES[s.base_dtype] != c
    if s.method == "full" or (wide_base and not lean):
        copies += c * shape.layer_linear_params()
    if s.method != "full":
        copies += c * lora_params(shape, s.lora_r, s.lora_targets) / shape.layers
        if s.cpu and s.lora_dropout > 0 and not lean:
            dims = shape.linear_dims()
            copies -= c * s.lora_r * sum(dims[t][0] for t in s.lora_targets)
    return copies


Component = tuple[str, float, str]


def plan_memory(shape: Shape, s: PlanSettings) -> MemoryPlan:
    """Peak training memory by component for one device."""
    if s.method not in ("full", "lora", "qlora"):
        raise XtunerError(f"method must be full, lora or qlora, got {s.method!r}")
    for key in ("base_dtype", "compute_dtype"):
        if getattr(s, key) not in DTYPE_BYTES:
            raise XtunerError(f"{key} must be one of {sorted(DTYPE_BYTES)}")
    weights, trainable = _weights(shape, s)
    if shape.vision is not None:
        held, trained = _vision_weights(shape.vision, s)
        weights, trainable = weights + held, trainable + trained
    tokens = -(-planned_tokens(s) // s.sequence_parallel)  # this rank's positions
    plan = MemoryPlan()
    plan.components += weights + _training_state(s, trainable)
    plan.components += _reference(shape, s, tokens)
    if s.rollout_rows:
        plan.components += _rollout_components(shape, s, tokens)
    plan.components += _activations(shape, s, tokens) + _loss(shape, s, tokens)
    if shape.vision is not None:
        plan.components.append(_vision_activations(shape.vision, s))
    if s.sequence_parallel > 1:
        plan.components.append(_all_to_all(shape, s, tokens))
    plan.components.append(("overhead", s.overhead_gib * GiB, "CUDA context, allocator slack"))
    return plan


def planned_tokens(s: PlanSettings) -> int:
    """Tokens in one micro-batch: rows of max_length, two sequences per preference unit, G
    completions per prompt for RL."""
    return s.batch_size * s.max_length * (2 if s.preference else s.sequences_per_item)


def _weights(shape: Shape, s: PlanSettings) -> tuple[list[Component], int]:
    """The held weights (sharded by ZeRO-3), and how many parameters are trained."""
    p = shape.params()
    shard = max(s.world_size, 1) if s.zero >= 3 else 1
    if s.method == "full" and s.freeze_language_model:
        frozen = DTYPE_BYTES[s.base_dtype] * sum(p.values())
        return [("weights", frozen / shard, "the frozen language model")], 0
    if s.method == "full":
        trainable = sum(p.values())
        return [("weights", 4 * trainable / shard, "fp32 master weights")], trainable
    base = DTYPE_BYTES[s.base_dtype]
    trainable = lora_params(shape, s.lora_r, s.lora_targets)
    if s.dora:
        dims = shape.linear_dims()
        trainable += shape.layers * sum(dims[t][1] for t in s.lora_targets)
    trainable += shape.hidden if s.reward_head else 0
    other = p["norms"] + p["embed"] + p["head"]
    if s.method == "qlora":
        frozen = NF4_BYTES_PER_PARAM * p["linear"] + base * other
        how = "NF4 + double-quant linears, the rest in the base dtype"
    else:
        frozen = base * (p["linear"] + other)
        how = "frozen base in the base dtype"
    adapter = DTYPE_BYTES[s.lora_dtype] * trainable / shard
    return [
        ("weights", frozen / shard, how),
        ("adapter", adapter, f"{s.lora_dtype} LoRA weights"),
    ], trainable


def _vision_weights(v: VisionShape, s: PlanSettings) -> tuple[list[Component], int]:
    """The vision tower (never quantized) and projector, and how many of their parameters
    train: a trained part in fp32, a frozen one in the base dtype, a LoRA adapter on the tower's
    linear layers in the adapter's dtype."""
    base, tower, projector = DTYPE_BYTES[s.base_dtype], v.tower_params(), v.projector_params()
    trained = (tower if s.vision_tower == "full" else 0) + (projector if s.projector else 0)
    frozen = base * tower
    if s.quantize_vision_tower:
        linear = v.tower_linear_params()
        frozen = NF4_BYTES_PER_PARAM * linear + base * (tower - linear)
    held = (frozen if s.vision_tower != "full" else 4 * tower) + (
        4 * projector if s.projector else base * projector
    )
    if s.vision_tower == "lora":
        h, i = v.hidden, v.intermediate
        adapter = v.layers * s.lora_r * (4 * 2 * h + 2 * (h + i))
        trained += adapter
        held += DTYPE_BYTES[s.lora_dtype] * adapter
    nf4 = " (NF4)" if s.quantize_vision_tower and s.vision_tower != "full" else ""
    how = f"tower {s.vision_tower}{nf4}, projector {'trained (fp32)' if s.projector else 'frozen'}"
    return [("vision tower and projector", held, how)], trained


def _vision_activations(v: VisionShape, s: PlanSettings) -> Component:
    """The images of a micro-batch through the tower: every layer's activations kept when the
    tower trains, else one layer's working set at a time; and the projector's input and hidden
    layer when it trains."""
    images = s.batch_size * (s.images_per_row or max(1, s.max_length // v.image_tokens))
    per = DTYPE_BYTES[s.compute_dtype]
    layer = v.layer_activation_bytes(per, v.patches * v.tiles * images)
    tower = layer * (v.layers if s.vision_tower != "frozen" else 1)
    projector = per * v.image_tokens * images * (v.hidden + 2 * v.text_hidden) if s.projector else 0
    kept = "every tower layer's" if s.vision_tower != "frozen" else "one tower layer's working set"
    return ("vision activations", tower + projector, f"{images} images: {kept}")


def _training_state(s: PlanSettings, trainable: int) -> list[Component]:
    """Gradients (sharded by ZeRO-2) and optimizer state (by ZeRO-1) of what is trained."""
    n = max(s.world_size, 1)
    grads_shard = n if s.zero >= 2 else 1
    state_shard = n if s.zero >= 1 else 1
    trained_bytes = 4 if s.method == "full" else DTYPE_BYTES[s.lora_dtype]  # weight, gradient
    state = 2 if "8bit" in s.optimizer else 8
    components = [
        ("gradients", trained_bytes * trainable / grads_shard,
         "fp32" if trained_bytes == 4 else s.lora_dtype),
        ("optimizer", state * trainable / state_shard,
         f"{s.optimizer}: {state} bytes per trained parameter"),
    ]  # fmt: skip
    if "8bit" not in s.optimizer:  # torch's foreach AdamW: sqrt(second moment) of every tensor
        components.append(("optimizer step", trained_bytes * trainable / state_shard,
                           "foreach AdamW's temporary, one second-moment-sized copy"))  # fmt: skip
    return components


def _reference(shape: Shape, s: PlanSettings, tokens: int) -> list[Component]:
    """A frozen reference copy, and the working set of the no-grad reference forward."""
    components = []
    if s.reference == "copy":
        components.append(("reference model", DTYPE_BYTES[s.base_dtype] * sum(
            shape.params().values()), "the frozen reference copy"))  # fmt: skip
    if s.reference in ("live", "copy"):
        components.append((
            "reference forward",
            layer_activation_bytes(shape, s, tokens) + DTYPE_BYTES[s.compute_dtype]
            * shape.hidden * tokens,
            "the no-grad reference pass: one layer's working set at a time",
        ))  # fmt: skip
    return components


def _residual_bytes(s: PlanSettings) -> int:
    """Bytes per element of the residual stream: the base dtype (LoRA), fp32 (full)."""
    return DTYPE_BYTES[s.base_dtype] if s.method != "full" else 4


def _activations(shape: Shape, s: PlanSettings, tokens: int) -> list[Component]:
    """What the layers keep for backward: every layer's activations, or the input of each
    checkpointed layer plus one layer rebuilt at a time (and DoRA's merged weight)."""
    components = []
    if s.dora:
        dims = shape.linear_dims()
        components.append((
            "DoRA weight",
            DTYPE_BYTES[s.compute_dtype] * max(dims[t][0] * dims[t][1] for t in s.lora_targets),
            "DoRA's merged weight of one linear, for its column norms",
        ))  # fmt: skip
    layer = layer_activation_bytes(shape, s, tokens) + layer_weight_copies(shape, s)
    res = _residual_bytes(s)
    recomputed = sum(checkpointed_layers(shape.layers, s.gradient_checkpointing or False))
    kept = shape.layers - recomputed
    if not recomputed:
        return [*components, ("activations", shape.layers * layer, "every layer's")]
    others = f", all of {kept} others'" if kept else ""
    one_input = res * shape.hidden * tokens
    if s.offload:
        components += [
            ("activations", min(recomputed, OFFLOAD_IN_FLIGHT) * one_input + kept * layer,
             f"{OFFLOAD_IN_FLIGHT} checkpointed layers' inputs in flight to or from the "
             f"host{others}"),
            ("offloaded to host", recomputed * one_input,
             f"the input of {recomputed} checkpointed layers, in pinned host memory"),
        ]  # fmt: skip
    else:
        components.append(("activations", recomputed * one_input + kept * layer,
                           f"the input of {recomputed} checkpointed layers{others}"))  # fmt: skip
    return [
        *components,
        ("recomputed layer", layer, "one layer's activations, rebuilt during backward"),
    ]


def _all_to_all(shape: Shape, s: PlanSettings, tokens: int) -> Component:
    """Sequence parallelism's exchange around one layer's attention: q, k, v and the output,
    each as a packed send copy and a received copy; key/value heads repeated to one per query
    head and all padded to a multiple of the group when the group does not divide them."""
    n = s.sequence_parallel
    heads, kv_heads = shape.heads, shape.kv_heads
    if heads % n or kv_heads % n:
        heads = kv_heads = -(-heads // n) * n
    per_token = DTYPE_BYTES[s.compute_dtype] * shape.head_dim * (2 * heads + 2 * kv_heads)
    return ("all-to-all buffers", 2 * per_token * tokens,
            f"q, k, v and output of one layer sent and received over {n} ranks")  # fmt: skip


def _loss(shape: Shape, s: PlanSettings, tokens: int) -> list[Component]:
    """The final norm, one loss chunk's fp32 logits, softmax and gradient, and (full) the head's
    gradient computed with the loss."""
    res = _residual_bytes(s)
    loss_tokens = min(s.chunk_size, tokens) if s.chunk_size else tokens
    components = [
        ("final norm", (res + DTYPE_BYTES[s.compute_dtype]) * shape.hidden * tokens,
         "the last norm's input and the loss's hidden input"),
        ("logits and loss", 3 * 4 * shape.vocab * loss_tokens + 4 * shape.hidden * tokens,
         f"fp32 logits, softmax and gradient of {loss_tokens} tokens, "
         "and the hidden-state gradient"),
    ]  # fmt: skip
    if s.method == "full":
        components.append(("head gradient", 4 * shape.vocab * shape.hidden,
                           "the output layer's gradient, computed with the loss"))  # fmt: skip
    return components


def _rollout_components(shape: Shape, s: PlanSettings, tokens: int) -> list:
    """The sampler's KV cache and logits, and the no-grad passes over the sampled batch."""
    # the engine's buffers: the prompt plus room grown KV_GROW columns at a time; while it
    # grows, the new keys are built before the old values are freed
    new = s.rollout_new_tokens or s.max_length
    columns = s.max_length - new + -(-new // KV_GROW) * KV_GROW
    weights = 4 if s.method == "full" else DTYPE_BYTES[s.base_dtype]
    per_column = 2 * shape.layers * shape.kv_heads * shape.head_dim * s.rollout_rows * weights
    kv = per_column * columns + (per_column * (columns - KV_GROW) / 2 if new > KV_GROW else 0)
    parts = [
        ("rollout KV cache", kv, f"keys and values of {s.rollout_rows} completions sampled "
         f"together, {columns} positions each, and the old half while it grows"),
        ("rollout logits", 3 * 4 * s.rollout_rows * shape.vocab,
         "fp32 next-token logits and the sampler's sorted copies, per row"),
    ]  # fmt: skip
    if s.nograd_passes:
        one = layer_activation_bytes(shape, s, tokens) + DTYPE_BYTES[s.compute_dtype] * (
            shape.hidden * tokens
        )
        logps = 4 * shape.vocab * (min(s.chunk_size, tokens) if s.chunk_size else tokens)
        parts.append(("no-grad forward", one + logps, f"{s.nograd_passes} pass(es) for old / "
                      "reference log-probs: one layer's working set at a time"))  # fmt: skip
    return parts


@dataclass(frozen=True)
class Knob:
    """One setting that lowers the plan: the config line to set, and its plan change."""

    line: str
    change: dict[str, Any]


# fp32 logits of one loss chunk, largest first: chunk sizes are derived from the vocabulary
LOSS_CHUNK_LOGITS = (512 * MiB, 256 * MiB, 128 * MiB)
MIN_LORA_RANK = 8


def knob_ladders(shape: Shape, s: PlanSettings) -> list[list[Knob]]:
    """What ``xtuner plan`` may turn, cheapest first by what it costs the run — each ladder's
    steps milder first: recomputation (speed only), smaller loss chunks (a few more, smaller
    head matmuls), activation offload (copies that overlap compute), the paged 8-bit optimizer
    (block-quantized Adam state), the adapter's weights in bf16 (rounded updates), a lower LoRA
    rank (less capacity), LoRA then QLoRA instead of full fine-tuning, ZeRO-3 over the devices
    there are, and shorter rows last (they change what is trained on)."""
    ladders: list[list[Knob]] = []
    if s.gradient_checkpointing not in (True, 1):
        ladders.append(
            [Knob("model.gradient_checkpointing=True", {"gradient_checkpointing": True})]
        )
    chunks = dict.fromkeys(loss_chunk_tokens(shape.vocab, b) for b in LOSS_CHUNK_LOGITS)
    ladders.append([Knob(f"train.chunk_size={c}", {"chunk_size": c})
                    for c in chunks if not s.chunk_size or c < s.chunk_size])  # fmt: skip
    if not s.offload:
        ladders.append([Knob("train.offload_activations=True", {"offload": True})])
    if "8bit" not in s.optimizer:
        ladders.append(
            [Knob("train.optimizer=paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"})]
        )
    if s.method != "full":
        # under fp16 (a GPU without bf16) what is trained stays fp32 for the loss scaler
        if DTYPE_BYTES[s.lora_dtype] == 4 and s.compute_dtype not in ("fp16", "float16"):
            ladders.append([Knob("model.lora_dtype=bf16", {"lora_dtype": "bf16"})])
        ranks = range(s.lora_r // 2, MIN_LORA_RANK - 1, -1)
        ladders.append([Knob(f"model.lora.r={r}", {"lora_r": r}) for r in ranks
                        if r & (r - 1) == 0])  # fmt: skip
    methods = {"full": ("lora", "qlora"), "lora": ("qlora",)}.get(s.method, ())
    ladders.append([Knob(f"model.method={m}", {"method": m}) for m in methods])
    if s.world_size > 1 and s.zero < 3:
        ladders.append([Knob("--fsdp (ZeRO-3)", {"zero": 3})])
    lengths = [s.max_length >> k for k in range(1, 8) if s.max_length >> k >= 256]
    ladders.append([Knob(f"train_dataset.max_length={n}", {"max_length": n}) for n in lengths])
    return [ladder for ladder in ladders if ladder]


def cheapest_fit(shape: Shape, s: PlanSettings, budget: float) -> list[Knob] | None:
    """The settings to change so the plan fits ``budget`` bytes: turn the knobs in cost order
    until it fits, then undo or soften each (costliest first) that it fits without."""
    ladders = knob_ladders(shape, s)

    def fits(choice: dict[int, int]) -> bool:
        changes = [ladders[i][j].change for i, j in sorted(choice.items())]
        return (
            plan_memory(shape, replace(s, **{k: v for c in changes for k, v in c.items()})).total
            <= budget
        )

    choice: dict[int, int] = {}
    for i, ladder in enumerate(ladders):
        for j in range(len(ladder)):
            choice[i] = j
            if fits(choice):
                return [ladders[i][j] for i, j in sorted(_softened(choice, fits).items())]
    return None


def _softened(choice: dict[int, int], fits: Callable[[dict[int, int]], bool]) -> dict[int, int]:
    """``choice`` with each knob, costliest first, undone or set to its mildest step that
    still fits."""
    for i in sorted(choice, reverse=True):
        for j in range(-1, choice[i]):
            trial = {k: v for k, v in choice.items() if k != i} | ({i: j} if j >= 0 else {})
            if fits(trial):
                choice = trial
                break
    return choice


def suggestions(shape: Shape, s: PlanSettings, budget: float) -> list[str]:
    """What would make the plan fit ``budget``: the cheapest settings to change on these
    devices, and — when those shorten the rows or nothing does — the smallest
    sequence-parallel group."""
    options = []
    knobs = cheapest_fit(shape, s, budget)
    if knobs is not None:
        options.append(" ".join(knob.line for knob in knobs))
    if knobs is None or any("max_length" in knob.line for knob in knobs):
        group = smallest_sequence_parallel(shape, s, budget)
        if group:
            options.append(group[0])
    return options


SEQUENCE_PARALLEL_SIZES = (2, 4, 8, 16, 32)  # they divide train.pad_to_multiple_of (32)


def smallest_sequence_parallel(
    shape: Shape, s: PlanSettings, budget: float
) -> tuple[str, dict[str, Any]] | None:
    """The smallest group (beyond the current one) sharing each row's tokens over which the
    plan fits ``budget`` per device, as it is or with its devices sharding the weights too
    (ZeRO-3 / FSDP): the suggestion and its change (None: no group does)."""
    for size in SEQUENCE_PARALLEL_SIZES:
        if size <= s.sequence_parallel or planned_tokens(s) < size:
            continue
        change = {"sequence_parallel": size, "world_size": max(s.world_size, size)}
        name = f"train.sequence_parallel_size={size} on {size} devices"
        for zero, how in ((s.zero, ""), (3, " with --fsdp")):
            if plan_memory(shape, replace(s, **change, zero=zero)).total <= budget:
                return name + how, {**change, "zero": zero}
    return None


def settings_from_config(cfg: Any, **overrides: Any) -> tuple[Shape, PlanSettings]:
    """The model shape and plan settings a training config implies (no weights loaded)."""
    model = dict(cfg["model"])
    train = dict(cfg.get("train", {}))
    data = dict(cfg.get("train_dataset", {}))
    pixels = data.get("image_max_pixels", IMAGE_MAX_PIXELS)
    if cfg.get("architecture"):
        shape = Shape.from_config(dict(cfg["architecture"]), pixels)
    else:
        path = resolve_model_path(str(model["pretrained"]))
        trust = bool(model.get("trust_remote_code", False))
        shape = Shape.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust), pixels)
    lora = dict(model.get("lora") or {})
    targets = lora.get("target_modules", "all-linear")
    autocast = train.get("dtype", "bf16")
    method = model.get("method", "lora")
    group = int(train.get("sequence_parallel_size", 1))  # its ranks are devices of the plan
    objective = build_objective(cfg.get("objective"), int(train.get("chunk_size", 1024)))
    settings = PlanSettings(
        method=method,
        lora_r=int(lora.get("r", 64)),
        lora_targets=LINEARS if targets == "all-linear" else tuple(targets),
        lora_dropout=float(lora.get("dropout", 0.1)),
        lora_dtype=model.get("lora_dtype", "fp32"),
        base_dtype=model.get("dtype", "fp32"),
        compute_dtype=autocast or "fp32",
        batch_size=int(train.get("batch_size", 1)),
        gradient_checkpointing=model.get("gradient_checkpointing", False),
        offload=bool(train.get("offload_activations", False)),
        chunk_size=int(train.get("chunk_size", 1024)),
        optimizer=train.get("optimizer", "adamw"),
        sequence_parallel=group,
        world_size=group,
        dora=bool(lora.get("use_dora", False)),
    )
    if shape.vision is not None:
        settings = replace(settings, **_vision_settings(dict(model.get("vision") or {})))
    settings = replace(settings, **objective.plan_settings(method, data, train))
    return shape, replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _vision_settings(vision: dict[str, Any]) -> dict[str, Any]:
    """PlanSettings of a config's ``model.vision`` (``VisionSettings``' defaults)."""
    settings = VisionSettings.from_config(vision)
    tower = "frozen" if settings.freeze_vision_tower else "full"
    return dict(
        vision_tower="lora" if settings.lora_vision_tower else tower,
        projector=not settings.freeze_projector,
        freeze_language_model=settings.freeze_language_model,
        quantize_vision_tower=settings.quantize_vision_tower,
    )


def print_plan(shape: Shape, s: PlanSettings, budget: float | None) -> bool:
    """Print the component table; with a budget, whether it fits and what would make it fit."""

    plan = plan_memory(shape, s)
    table = Table(
        title=f"{s.method} · max_length {s.max_length} × batch {s.batch_size} · "
        f"{s.world_size} device(s){f' ZeRO-{s.zero}' if s.zero else ''}"
        f"{f' · sequence parallel {s.sequence_parallel}' if s.sequence_parallel > 1 else ''}"
    )
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for name, size, how in plan.components:
        table.add_row(name, f"{size / GiB:.2f}", how)
    table.add_row(
        "total",
        f"{plan.total / GiB:.2f}",
        "peak per device: held + the largest transient (backward, optimizer step, rollouts)",
    )
    console = Console()
    console.print(table)
    if budget is None:
        return True
    fits = plan.total <= budget
    console.print(f"{'fits' if fits else 'does NOT fit'} in {budget / GiB:.1f} GiB")
    if not fits:
        options = suggestions(shape, s, budget)
        console.print(
            "would fit with: "
            + ("; or ".join(options) if options else "no change of these settings; more devices"),
            soft_wrap=True,  # config lines to copy: never broken across lines
        )
    return fits


def measure_saved_bytes(
    model: Any,
    batch: dict,
    compute_dtype: str = "bf16",
    chunk_size: int = 1024,
    loss: Callable[[Any, dict], Any] | None = None,
) -> int:
    """Bytes of the tensors autograd keeps for backward after one training forward (parameters
    excluded; each storage once): the activation memory the planner predicts, measured.
    ``loss(model, batch)``: an objective's loss sum (default: next-token cross-entropy)."""

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = DTYPE_BYTES[compute_dtype] == 2
    dtype = torch.float16 if compute_dtype in ("fp16", "float16") else torch.bfloat16
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(model.device.type, dtype=dtype, enabled=autocast),
    ):
        if loss is None:
            loss_sum(model, batch, chunk_size)
        else:
            loss(model, batch)
    return sum(seen.values())


def without_bf16(cfg: Any) -> list[str]:
    """Make ``cfg`` what `xtuner train` runs on a GPU without bf16 (:func:`fp16_fallback`, the
    train dtype defaulting as TrainSettings does); returns what changed."""
    train = dict(cfg.get("train", {}))
    model, train["dtype"], changed = fp16_fallback(dict(cfg["model"]), train.get("dtype", "bf16"))
    cfg["model"], cfg["train"] = model, train
    return changed


def plan(
    config: str,
    gpu_mem: Size | None = None,
    max_length: PositiveInt | None = None,
    batch_size: PositiveInt | None = None,
    devices: PositiveInt | None = None,
    zero: Literal[0, 1, 2, 3] | None = None,
    sequence_parallel: PositiveInt | None = None,
    no_bf16: bool = False,
    cfg_options: CfgOptions = None,
) -> int:
    """Predict a config's peak GPU memory by component.

    Predict peak training memory from the model's config alone (no weights): weights,
    gradients, optimizer, activations, loss. With --gpu-mem, say whether it fits (exit 3 if
    not) and what would.

    Args:
        config: config file or name
        gpu_mem: memory per device, e.g. 8GiB
        max_length: override the dataset's max_length
        batch_size: override train.batch_size
        devices: data-parallel devices (default 1)
        zero: ZeRO stage (3 = FSDP)
        sequence_parallel: devices sharing each row's tokens (train.sequence_parallel_size;
            --devices defaults to it)
        no_bf16: a GPU without bf16 (compute capability below 8.0: the 20 series, T4, V100):
            plan the fp16 training `xtuner train` falls back to there
        cfg_options: override config keys
    """
    cfg = load_config(config, cfg_options)
    if no_bf16:
        changed = ", ".join(without_bf16(cfg)) or "nothing changes"
        Console().print(f"without bf16: {changed}", soft_wrap=True)
    shape, settings = settings_from_config(
        cfg, max_length=max_length, batch_size=batch_size, zero=zero,
        sequence_parallel=sequence_parallel,
        world_size=devices or sequence_parallel,
    )  # fmt: skip
    if settings.world_size % settings.sequence_parallel:
        raise XtunerError(
            f"--sequence-parallel {settings.sequence_parallel} must divide --devices "
            f"{settings.world_size}"
        )
    fits = print_plan(shape, settings, parse_size(gpu_mem) if gpu_mem else None)
    return 0 if fits else 3
