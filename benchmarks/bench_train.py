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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_FILE = SHARED / "sft" / "llamafactory_alpaca_en_demo.json"
LORA = dict(r=16, alpha=32, dropout=0.05)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(opts: argparse.Namespace) -> dict:
    from xtuner_lite import train

    work = tempfile.mkdtemp(prefix="bench_ours_")
    cfg = dict(
        model=dict(pretrained="smollm2-135m-instruct", method="lora", dtype="bf16",
                   lora=dict(**LORA, target_modules="all-linear"),
                   gradient_checkpointing=opts.checkpoint_every if opts.checkpointing else False),
        train_dataset=dict(data_files=str(opts.file), tokenizer="smollm2-135m-instruct",
                           map_fn="alpaca", template="smollm2", max_length=opts.max_length),
        train=dict(batch_size=1, accumulative_counts=opts.accum, max_iters=opts.steps, lr=2e-4,
                   warmup_ratio=0.0, chunk_size=opts.chunk_size,
                   dtype="bf16", save_steps=10**9, log_interval=10**6, tensorboard=False))
    start = time.perf_counter()
    train(cfg, work_dir=work)
    seconds = time.perf_counter() - start
    tokens = sum(json.loads(line)["tokens"] for line in open(Path(work) / "loss.jsonl"))
    return {"seconds": seconds, "tokens": tokens}


def run_trl(opts: argparse.Namespace) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from xtuner_lite.hub import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    raw = datasets.load_dataset("json", data_files=str(opts.file), split="train")

    def to_prompt_completion(row):
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": row["output"]}]}

    ds = raw.map(to_prompt_completion, remove_columns=raw.column_names)
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, bf16=True,
                     packing=True, max_length=opts.max_length, per_device_train_batch_size=1,
                     gradient_accumulation_steps=opts.accum, max_steps=opts.steps,
                     learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0,
                     logging_steps=10**6, save_strategy="no", report_to=[],
                     include_num_input_tokens_seen=True, completion_only_loss=True,
                     gradient_checkpointing=opts.checkpointing,
                     dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    start = time.perf_counter()
    model = load_model("smollm2-135m-instruct", dtype="bfloat16")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="turn gradient checkpointing off on both sides (TRL's default is on)")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="ours: recompute every k-th decoder layer (TRL recomputes all)")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="ours: tokens per loss chunk (fp32 logits live one chunk at a time)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:  # child process: one side, one JSON line on stdout
        result = (run_ours if opts.side == "ours" else run_trl)(opts)
        result["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--file", str(opts.file),
               "--max-length", str(opts.max_length), "--steps", str(opts.steps),
               "--accum", str(opts.accum), "--checkpoint-every", str(opts.checkpoint_every),
               "--chunk-size", str(opts.chunk_size)]
        cmd += [] if opts.checkpointing else ["--no-checkpointing"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
    print(f"SmolLM2-135M LoRA, {opts.steps} steps × 1 × {opts.accum} rows of ≤{opts.max_length} "
          f"packed tokens, bf16 autocast, checkpointing {'on' if opts.checkpointing else 'off'}, "
          f"{os.cpu_count()} CPU threads; wall time includes "
          "dataset preparation and model loading for both")
    print(f"{'':12s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MiB':>13s}")
    for side, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{side:12s} {r['tokens']:8.0f} {r['seconds']:8.1f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_mib']:13.0f}")
    ours, trl = results["ours"], results["trl"]
    print(f"throughput ratio (ours / trl): {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    print(f"peak memory ratio (ours / trl): {ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
