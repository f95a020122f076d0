"""The 8 GB proof: QLoRA on 7B/8B shapes under an 8 GiB cap (issue 6). Needs a CUDA GPU.

Random-initialised models with the real shapes (no weights needed): written once as a bf16
safetensors folder, then loaded through ``build_model`` (NF4 + double quantization, LoRA r=64 on
every linear but the head, gradient checkpointing) and trained on packed random rows with the
chunked loss, under ``torch.cuda.set_per_process_memory_fraction`` equal to ``--cap-gib``.
Prints peak allocated memory and tokens/s per shape, and what ``xtuner plan`` predicted.
InternLM2-7B is run with its shapes in a Llama module (same layer structure; its own modelling
code needs the hub).

Run on a CUDA machine:
  python benchmarks/bench_8gb.py --shape llama2_7b internlm2_7b          # max_length 2048
  python benchmarks/bench_8gb.py --shape llama3_8b --max-length 4096
Smoke test of the script itself on CPU (tiny shape, no cap):
  python benchmarks/bench_8gb.py --shape tiny --device cpu --max-length 128 --steps 3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from random_shapes import SHAPES, planned_gib, random_model_folder, train_and_measure


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
    parser.add_argument("--max-length", type=int, default=2048)
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
    for shape in args.shape:
        try:
            result = run(shape, args)
        except torch.OutOfMemoryError as exc:  # the proof failed: a result too
            result = {"shape": shape, "check": "8gib_proof", "out_of_memory": str(exc)[:200]}
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps({"check": "8gib_proof", **result}) + "\n")


if __name__ == "__main__":
    main()
