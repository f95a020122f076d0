"""Random-initialised models with real shapes, and one measured training run on them.

Shared by ``bench_8gb.py`` (the 8 GB proof) and ``plan_vs_cuda.py`` (the planner against
``torch.cuda.max_memory_allocated``): no weights are needed, only the shapes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

SHAPES = {
    "llama2_7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "internlm2_7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=92544,
    ),
    "llama3_8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # Qwen2.5-7B in Llama layers (its q/k/v biases omitted)
    "qwen2_5_7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    "smollm2_135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2_1_7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
# the models users pick today that share an older shape: the same layer sizes and vocabulary
SHAPES["internlm2_5_7b"] = SHAPES["internlm2_7b"]
SHAPES["llama3_1_8b"] = SHAPES["llama3_8b"]


def random_model_folder(
    shape: str, root: Path, max_length: int = 4096, architecture: dict | None = None
) -> Path:
    """A bf16 safetensors folder of a randomly initialised model: a Llama with ``shape``'s
    sizes, or ``architecture`` (a config's ``architecture`` dict: its model type and sizes; an
    image-text model's with its vision config) saved under ``shape`` (initialised on the GPU
    when there is one: seconds instead of minutes for a 7B)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    folder = root / shape
    if (folder / "config.json").exists():
        return folder
    sizes = dict(architecture) if architecture else {"model_type": "llama", **SHAPES[shape]}
    sizes = {"tie_word_embeddings": False, **sizes}
    image_text = "vision_config" in sizes
    if not image_text:
        longest = sizes.get("max_position_embeddings", 4096)
        sizes["max_position_embeddings"] = max(max_length, longest)
    config = AutoConfig.for_model(sizes.pop("model_type"), **sizes, torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
        model = auto.from_config(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def packed_rows(vocab: int, max_length: int, samples: int, steps: int) -> list[dict]:
    """One packed row per step: ``samples`` random samples, every token trained."""
    from xtuner_lite.data.dataset import collate_packed

    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (max_length,), generator=generator).tolist()
        cuts = sorted(
            torch.randperm(max_length - 1, generator=generator)[: samples - 1].add(1).tolist()
        )
        bounds = [0, *cuts, max_length]
        positions = [p for a, b in zip(bounds, bounds[1:]) for p in range(b - a)]
        rows.append(
            collate_packed(
                [{"input_ids": ids, "labels": ids, "position_ids": positions, "cu_seqlens": bounds}]
            )
        )
    return rows


def image_rows(
    architecture: dict, max_length: int, images: int, steps: int, image_max_pixels: int | None
) -> list[dict]:
    """One packed row per step for an image-text model: ``images`` samples, each an image's
    tokens (never trained) and random text, with random pixels of the planner's image shape
    (a LLaVA's fixed size; Qwen2-VL's patches of ``image_max_pixels``)."""
    from xtuner_lite.commands.plan import VisionShape
    from xtuner_lite.data.dataset import collate_packed

    vision = VisionShape.from_config(architecture, image_max_pixels)
    token = architecture.get("image_token_id", 32000)  # LlavaConfig's default
    vocab = architecture["text_config"]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps):
        ids = torch.randint(0, min(vocab, token), (max_length,), generator=generator)
        labels = ids.clone()
        bounds = torch.linspace(0, max_length, images + 1).long().tolist()
        for start in bounds[:-1]:
            ids[start : start + vision.image_tokens] = token
            labels[start : start + vision.image_tokens] = -100
        positions = [p for a, b in zip(bounds, bounds[1:]) for p in range(b - a)]
        batch = collate_packed([{"input_ids": ids.tolist(), "labels": labels.tolist(),
                                 "position_ids": positions, "cu_seqlens": bounds}])  # fmt: skip
        if vision.family == "vit":
            side = int(vision.patches**0.5) * vision.patch
            batch["pixel_values"] = torch.randn(images, vision.channels, side, side)
        else:
            side = int((vision.patches) ** 0.5)
            per_patch = vision.channels * vision.temporal * vision.patch**2
            batch["pixel_values"] = torch.randn(images * side * side, per_patch)
            batch["image_grid_thw"] = torch.tensor([[1, side, side]] * images)
        rows.append(batch)
    return rows


def train_and_measure(
    folder: Path,
    *,
    method: str,
    max_length: int,
    steps: int,
    gradient_checkpointing: bool = True,
    chunk_size: int = 1024,
    lora_r: int = 64,
    optimizer: str = "adamw",
    device: str = "cuda",
    cap_gib: float | None = None,
    lora_dtype: str = "fp32",
    offload: bool = False,
    fp16: bool = False,
    rows: list[dict] | None = None,
    vision: dict | None = None,
) -> dict:
    """Train ``steps`` steps on packed random rows under bf16 autocast (``fp16``: fp16 autocast
    with loss scaling and fp16 frozen weights, as on a GPU without bf16); the first step is
    warm-up for the timing. On CUDA: peak allocated / reserved over the steps (the weights,
    loaded before, included), optionally under a ``set_per_process_memory_fraction`` cap.
    ``offload``: the checkpointed layers' inputs in pinned host memory. ``rows``: the batches
    to train on (default: random text); ``vision``: an image-text model's ``model.vision``."""
    from xtuner_lite.model import build_model, skip_adapter_input_casts
    from xtuner_lite.model.offload import offload_activations
    from xtuner_lite.objectives.sft import SFTObjective
    from xtuner_lite.training.train_model import TrainModel

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(
            1.0 if cap_gib is None else min(1.0, cap_gib * 2**30 / total)
        )
        torch.cuda.reset_peak_memory_stats()
    half = "fp16" if fp16 else "bf16"
    llm = build_model(
        str(folder),
        method=method,
        dtype="fp32" if method == "full" else half,
        compute_dtype=half,
        lora=dict(r=lora_r, alpha=16, dropout=0.1),
        gradient_checkpointing=gradient_checkpointing,
        lora_dtype="fp32" if fp16 else lora_dtype,
        device=device if cuda else None,
        vision=vision,
    )
    skip_adapter_input_casts(llm)
    if offload:
        offload_activations(llm)
    model = TrainModel(llm, SFTObjective(chunk_size)).to(device)
    model.train()  # from_pretrained gives eval mode: no checkpointing, no dropout
    trained = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(trained, lr=1e-4)
    else:
        import bitsandbytes as bnb

        opt = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[
            optimizer
        ](trained, lr=1e-4)
    if rows is None:
        rows = packed_rows(llm.config.get_text_config().vocab_size, max_length, 4, steps)
    load_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], None
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    for step, batch in enumerate(rows):
        if step == 1:  # the first step pays for allocator warm-up and kernel selection
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16 if fp16 else torch.bfloat16):
            loss = model(batch)
        trained_tokens = int((batch["labels"][:, 1:] != -100).sum())
        scaler.scale(loss / trained_tokens).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / trained_tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start if start else float("nan")
    result = {
        "method": method,
        "max_length": max_length,
        "steps": steps,
        "checkpointing": gradient_checkpointing,
        "chunk_size": chunk_size,
        "optimizer": optimizer,
        "lora_dtype": "fp32" if fp16 else lora_dtype,
        "offload": offload,
        "dtype": half,
        "tokens_per_sec": round(max_length * (steps - 1) / seconds, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }
    if cuda:
        result.update(
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
            load_peak_gib=round(load_peak / 2**30, 3),
            device=torch.cuda.get_device_name(0),
        )
        if cap_gib is not None:
            result["cap_gib"] = cap_gib
    del model, llm, opt
    if cuda:
        torch.cuda.empty_cache()
    return result


def planned_gib(
    shape: str | Path,
    *,
    method: str,
    max_length: int,
    gradient_checkpointing: bool,
    chunk_size: int,
    lora_r: int,
    optimizer: str,
    explicit_mask: bool = False,
    lora_dtype: str = "fp32",
) -> float:
    """What ``xtuner plan`` predicts for ``train_and_measure``'s run on a shape (a name in
    ``SHAPES`` or a model folder), without the fixed CUDA-context overhead (which
    ``max_memory_allocated`` does not count)."""
    from xtuner_lite.commands.plan import GiB, PlanSettings, Shape, plan_memory

    if str(shape) in SHAPES:
        config = {"tie_word_embeddings": False, **SHAPES[str(shape)]}
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(shape)
    plan = plan_memory(
        Shape.from_config(config),
        PlanSettings(
            method=method,
            lora_r=lora_r,
            lora_dropout=0.1,
            base_dtype="fp32" if method == "full" else "bf16",
            compute_dtype="bf16",
            max_length=max_length,
            gradient_checkpointing=gradient_checkpointing,
            chunk_size=chunk_size,
            optimizer=optimizer,
            explicit_mask=explicit_mask,
            lora_dtype=lora_dtype,
        ),
    )
    return (plan.total - plan.get("overhead")) / GiB
