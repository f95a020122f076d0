"""The 8 GB proof: QLoRA on 7B/8B shapes under an 8 GiB cap (issue 6). Needs a CUDA GPU.

Random-initialised models with the real shapes (no weights needed): written once as a bf16
safetensors folder, then loaded through ``build_model`` (NF4 + double quantization, LoRA r=64 on
every linear but the head, gradient checkpointing) and trained on packed random rows with the
chunked loss, under ``torch.cuda.set_per_process_memory_fraction`` equal to ``--cap-gib``.
Prints peak allocated memory and tokens/s per shape, and what ``xtuner plan`` predicted.
InternLM2-7B is run with its shapes in a Llama module (same layer structure; its own modelling
code needs the hub).

With ``--config``, a shipped recipe as it is: its architecture (model type and sizes) with random
weights, its LoRA rank, loss chunk, optimizer, adapter dtype, offload and row length (a DPO
recipe's row holds both sequences of a pair: measured as an SFT row of that many tokens, the
reference log-probabilities being cached), against its plan; an image-text recipe's rows hold as
many images of its planned size (random pixels) as the plan assumes, each image's tokens untrained.
``--offload on off`` runs both.
``--fp16``: as on a GPU without bf16 (fp16 autocast, loss scaling, fp16 frozen weights).

Run on a CUDA machine:
  python benchmarks/bench_8gb.py --config qwen2_5_7b_instruct_qlora_alpaca --offload on off
  python benchmarks/bench_8gb.py --shape llama2_7b internlm2_7b          # max_length 2048
  python benchmarks/bench_8gb.py --shape llama3_8b --max-length 4096
Smoke test of the script itself on CPU (tiny shape, no cap):
  python benchmarks/bench_8gb.py --shape tiny --device cpu --max-length 128 --steps 3
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from random_shapes import (
    SHAPES,
    image_rows,
    planned_gib,
    random_model_folder,
    train_and_measure,
)

from xtuner_lite.commands.plan import (
    GiB,
    plan_memory,
    planned_tokens,
    settings_from_config,
    without_bf16,
)
from xtuner_lite.config import load_config


def run_config(name: str, args: argparse.Namespace, offload: bool, last: bool) -> dict:
    """A shipped recipe with random weights of its architecture, against its plan (``last``:
    the config's last run, after which ``--delete`` deletes the weights)."""
    cfg = load_config(name)
    if args.fp16:  # what `xtuner train` does on a GPU without bf16, and `xtuner plan --no-bf16`
        without_bf16(cfg)
    shape, settings = settings_from_config(cfg, max_length=args.max_length or None)
    settings = replace(settings, offload=offload)
    tokens = planned_tokens(settings)
    architecture = dict(cfg["architecture"])
    text = dict(architecture.get("text_config") or architecture)
    key = "{}_{hidden_size}_{num_hidden_layers}_{vocab_size}".format(architecture["model_type"],
                                                                     **text)  # fmt: skip
    folder = random_model_folder(key, Path(args.work), tokens, architecture=architecture)
    rows, vision = None, None
    if shape.vision is not None:  # as many images as the plan assumes (its worst case)
        images = settings.images_per_row or max(1, tokens // shape.vision.image_tokens)
        pixels = cfg["train_dataset"].get("image_max_pixels")
        rows = image_rows(architecture, tokens, images, args.steps, pixels)
        vision = dict(cfg["model"].get("vision") or {})
    measured = train_and_measure(
        folder, method=settings.method, max_length=tokens, steps=args.steps,
        gradient_checkpointing=settings.gradient_checkpointing, chunk_size=settings.chunk_size,
        lora_r=settings.lora_r, optimizer=settings.optimizer, lora_dtype=settings.lora_dtype,
        device=args.device, cap_gib=args.cap_gib if args.device == "cuda" else None,
        offload=offload, fp16=args.fp16, rows=rows, vision=vision,
    )  # fmt: skip
    if args.delete and last:
        shutil.rmtree(folder)
    plan = plan_memory(shape, settings)
    return {
        "config": name,
        **measured,
        "planned_gib": round((plan.total - plan.get("overhead")) / GiB, 3),
        "plan_total_gib": round(plan.total / GiB, 3),
    }


def run(shape: str, args: argparse.Namespace) -> dict:
    folder = random_model_folder(shape, Path(args.work), args.max_length)
    settings = dict(
        method="qlora",
        max_length=args.max_length,
        gradient_checkpointing=True,
        chunk_size=args.chunk_size,
        lora_r=64,
        optimizer=args.optimizer,
        lora_dtype=args.lora_dtype,
    )
    result = {
        "shape": shape,
        **train_and_measure(
            folder,
            steps=args.steps,
            device=args.device,
            cap_gib=args.cap_gib if args.device == "cuda" else None,
            **settings,
        ),
    }
    result["planned_gib"] = round(planned_gib(folder, **settings), 3)
    if args.delete:
        shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", nargs="+", default=["llama2_7b", "internlm2_7b"], choices=list(SHAPES)
    )
    parser.add_argument("--config", nargs="+", default=[], help="shipped recipes (not --shape)")
    parser.add_argument("--offload", nargs="+", default=["on"], choices=["on", "off"],
                        help="with --config: activation offload on, off or both")  # fmt: skip
    parser.add_argument("--fp16", action="store_true", help="with --config: as without bf16")
    parser.add_argument("--max-length", type=int, default=None, help="default: 2048 / recipe's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"]
    )
    parser.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", default="work_dirs/bench_8gb", help="random weights go here")
    parser.add_argument("--delete", action="store_true", help="delete each shape's weights after")
    parser.add_argument("--results", help="also append each result to this .jsonl")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_8gb: needs a CUDA GPU (or --device cpu for a smoke test)")
    last = args.offload[-1]
    runs = [(c, lambda c=c, o=o: run_config(c, args, o == "on", o == last), {"offload": o == "on"})
            for c in args.config for o in args.offload]  # fmt: skip
    if not args.config:
        args.max_length = args.max_length or 2048
        runs = [(shape, lambda shape=shape: run(shape, args), {}) for shape in args.shape]
    for name, measure, how in runs:
        try:
            result = measure()
        except torch.OutOfMemoryError as exc:  # the proof failed: a result too
            result = {"name": name, **how, "out_of_memory": str(exc)[:200]}
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps({"check": "8gib_proof", **result}) + "\n")


if __name__ == "__main__":
    main()
