"""The memory planner against ``torch.cuda.max_memory_allocated`` (issue 6). Needs a CUDA GPU.

Random-initialised models with real shapes (``random_shapes.py``), trained a few steps through
``build_model`` + ``TrainModel`` under bf16 autocast for full / LoRA / QLoRA, with and without
gradient checkpointing, at several lengths; each row prints the planned peak (without the fixed
CUDA context, which the allocator does not count) beside the measured peak allocated.
Run: python benchmarks/plan_vs_cuda.py [--shapes smollm2_135m smollm2_1_7b llama2_7b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from random_shapes import SHAPES, planned_gib, random_model_folder, train_and_measure

# (method, checkpointing, max_length, optimizer) per shape; a 7B is only planned for QLoRA/LoRA
CASES = {
    "small": [
        (m, ck, n, "adamw")
        for m in ("full", "lora", "qlora")
        for ck in (False, True)
        for n in (512, 2048)
    ]
    + [("lora", True, 2048, "adamw_8bit")],
    "large": [
        ("qlora", True, 2048, "adamw"),
        ("qlora", False, 1024, "adamw"),
        ("lora", True, 2048, "adamw"),
        ("qlora", True, 4096, "paged_adamw_8bit"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["smollm2_135m", "smollm2_1_7b"], choices=list(SHAPES)
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="work_dirs/plan_vs_cuda", help="random weights go here")
    parser.add_argument("--delete", action="store_true", help="delete each shape's weights after")
    parser.add_argument("--results", help="also append each measurement to this .jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("plan_vs_cuda: needs a CUDA GPU")
    logging.disable(logging.WARNING)
    print(
        "| shape | method | checkpointing | max_length | optimizer | planned GiB | "
        "measured GiB | error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        folder = random_model_folder(shape, Path(args.work))
        large = SHAPES[shape]["hidden_size"] >= 4096
        for method, ckpt, length, optimizer in CASES["large" if large else "small"]:
            settings = dict(
                method=method,
                max_length=length,
                gradient_checkpointing=ckpt,
                chunk_size=1024,
                lora_r=64,
                optimizer=optimizer,
            )
            planned = planned_gib(folder, **settings)
            try:
                measured = train_and_measure(folder, steps=args.steps, **settings)
            except torch.OutOfMemoryError:
                print(
                    f"| {shape} | {method} | {ckpt} | {length} | {optimizer} | "
                    f"{planned:.2f} | out of memory | |",
                    flush=True,
                )
                torch.cuda.empty_cache()
                continue
            peak = measured["peak_allocated_gib"]
            print(
                f"| {shape} | {method} | {'on' if ckpt else 'off'} | {length} | {optimizer} | "
                f"{planned:.2f} | {peak:.2f} | {planned / peak - 1:+.1%} |",
                flush=True,
            )
            print("   " + json.dumps(measured), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(
                        json.dumps({"check": "plan_vs_cuda", "planned_gib": planned, **measured})
                        + "\n"
                    )
        if args.delete:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
