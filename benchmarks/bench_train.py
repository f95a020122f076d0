"""LoRA training throughput and peak memory: xtuner_lite vs TRL's SFTTrainer, same work.

Same model (SmolLM2-135M-Instruct, frozen base loaded in bf16 on both sides), LoRA (r=16,
alpha=32, dropout 0.05, all linear layers, fp32 adapter weights), data file, max_length, packing,
micro-batch 1 × accumulation, bf16 autocast on CPU, steps, and gradient checkpointing (on by
default, as in TRL's SFTConfig; ``--no-checkpointing`` turns it off on both sides).
Each side runs in its own process so peak RSS is its own. Prints real (non-padding) tokens/s,
peak RSS and the ratios. Run: python benchmarks/bench_train.py [--steps 8] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sides import report, run_side, train_ours

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_FILE = SHARED / "sft" / "llamafactory_alpaca_en_demo.json"
LORA = dict(r=16, alpha=32, dropout=0.05)


def run_ours(opts: argparse.Namespace) -> dict:
    cfg = dict(
        model=dict(
            pretrained="smollm2-135m-instruct",
            method="lora",
            dtype="bf16",
            lora=dict(**LORA, target_modules="all-linear"),
            gradient_checkpointing=(opts.checkpoint_fraction or opts.checkpoint_every)
            if opts.checkpointing
            else False,
        ),
        train_dataset=dict(
            data_files=str(opts.file),
            tokenizer="smollm2-135m-instruct",
            map_fn="alpaca",
            template="smollm2",
            max_length=opts.max_length,
        ),
        train=dict(
            batch_size=1,
            accumulative_counts=opts.accum,
            max_iters=opts.steps,
            lr=2e-4,
            warmup_ratio=0.0,
            chunk_size=opts.chunk_size,
            dtype="bf16",
            save_steps=10**9,
            log_interval=10**6,
            tensorboard=False,
        ),
    )
    return train_ours(cfg, "bench_ours_")


def run_trl(opts: argparse.Namespace) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from xtuner_lite.hub import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    raw = datasets.load_dataset("json", data_files=str(opts.file), split="train")

    def to_prompt_completion(row):
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    ds = raw.map(to_prompt_completion, remove_columns=raw.column_names)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        use_cpu=True,
        bf16=True,
        packing=True,
        max_length=opts.max_length,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=opts.accum,
        max_steps=opts.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen=True,
        completion_only_loss=True,
        gradient_checkpointing=opts.checkpointing,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    start = time.perf_counter()
    model = load_model("smollm2-135m-instruct", dtype="bfloat16")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="turn gradient checkpointing off on both sides (TRL's default is on)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="ours: recompute every k-th decoder layer (TRL recomputes all)",
    )
    parser.add_argument(
        "--checkpoint-fraction",
        type=float,
        help="ours: recompute this share of the decoder layers (overrides --checkpoint-every)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=128,
        help="ours: tokens per loss chunk (fp32 logits live one chunk at a time)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run both sides this many times, alternating; print the median",
    )
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:  # child process: one side, one JSON line on stdout
        report((run_ours if opts.side == "ours" else run_trl)(opts))
        return
    from xtuner_lite.hub import resolve_model_path

    resolve_model_path("smollm2-135m-instruct", "bf16")  # one-time caches, outside the timings
    runs = []
    for _ in range(opts.repeats):  # the sides alternate, so a slow spell of a shared machine
        results = {}  # hits both, and each pair gives its own ratio
        for side in ("ours", "trl"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--file",
                str(opts.file),
                "--max-length",
                str(opts.max_length),
                "--steps",
                str(opts.steps),
                "--accum",
                str(opts.accum),
                "--checkpoint-every",
                str(opts.checkpoint_every),
                "--checkpoint-fraction",
                str(opts.checkpoint_fraction or 0),
                "--chunk-size",
                str(opts.chunk_size),
            ]
            cmd += [] if opts.checkpointing else ["--no-checkpointing"]
            results[side] = run_side(cmd, side)
            results[side]["tokens_per_s"] = results[side]["tokens"] / results[side]["seconds"]
        runs.append(results)
    print(
        f"SmolLM2-135M LoRA, {opts.steps} steps × 1 × {opts.accum} rows of ≤{opts.max_length} "
        f"packed tokens, bf16 autocast, checkpointing {'on' if opts.checkpointing else 'off'}, "
        f"{os.cpu_count()} CPU threads; wall time includes "
        "dataset preparation and model loading for both"
    )
    print(
        f"{'run':4s} {'':6s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} "
        f"{'peak RSS MiB':>13s} {'speed ratio':>12s} {'memory ratio':>13s}"
    )
    speed, memory = [], []
    for i, results in enumerate(runs, 1):
        ours, trl = results["ours"], results["trl"]
        speed.append(ours["tokens_per_s"] / trl["tokens_per_s"])
        memory.append(ours["peak_rss_mib"] / trl["peak_rss_mib"])
        for side, r in results.items():
            ratios = f"{speed[-1]:11.2f}x {memory[-1]:12.2f}x" if side == "ours" else ""
            print(
                f"{i:<4d} {side:6s} {r['tokens']:8.0f} {r['seconds']:8.1f} "
                f"{r['tokens_per_s']:9.1f} {r['peak_rss_mib']:13.0f} {ratios}"
            )
    print(
        f"throughput ratio (ours / trl): median {statistics.median(speed):.2f}x "
        f"(range {min(speed):.2f}-{max(speed):.2f}x over {len(runs)} runs)"
    )
    print(
        f"peak memory ratio (ours / trl): median {statistics.median(memory):.2f}x "
        f"(range {min(memory):.2f}-{max(memory):.2f}x)"
    )
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
