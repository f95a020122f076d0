"""DPO-LoRA throughput and peak memory: xtuner_lite vs TRL's DPOTrainer, same work.

Same model (SmolLM2-135M-Instruct), LoRA (r=16, alpha=32, dropout 0.05, all linear layers),
the first ``--pairs`` pairs of LLaMA-Factory's DPO demo whose prompt fits in max_length (TRL drops
the others, so both sides train the same pairs) for one epoch, max_length per sequence,
pairs per optimizer step, sigmoid loss with beta 0.1, the adapter-disabled model as reference,
precision (fp32 on CPUs without native bf16, else bf16 autocast) and gradient checkpointing.
Each side runs in its own process (peak RSS is its own), the sides alternate, and the median of
``--repeats`` runs is printed. Sides: ``ours`` (one pair per row, as TRL), ``ours-packed``
(pairs packed into rows of 2 × max_length), ``ours-cached`` (packed, reference log-probs read
from the disk cache a previous run wrote: no reference forward), ``trl``.
Wall time includes dataset preparation and model loading on every side.

    python benchmarks/bench_dpo.py --pairs 16 --max-length 256 --repeats 3
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

from sides import report, run_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_FILE = SHARED / "pref" / "llamafactory_dpo_en_demo.json"
LORA = dict(r=16, alpha=32, dropout=0.05)
MODEL = "smollm2-135m-instruct"
SIDES = ("ours", "ours-packed", "ours-cached", "trl")


def prompt_messages(row: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]


def prompt_length(tokenizer, row: dict) -> int:
    ids = tokenizer.apply_chat_template(
        prompt_messages(row), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return len(ids)


def subset(opts: argparse.Namespace) -> Path:
    """The first ``--pairs`` rows whose rendered prompt is shorter than max_length (TRL drops a
    pair whose prompt fills it), written once per settings (the cache keys on the file)."""
    path = Path(tempfile.gettempdir()) / f"bench_dpo_{opts.pairs}_{opts.max_length}.json"
    if not path.exists():
        from xtuner_lite.hub import load_tokenizer

        tokenizer = load_tokenizer(MODEL)
        rows = json.loads(Path(opts.file).read_text())
        fits = [r for r in rows if prompt_length(tokenizer, r) < opts.max_length - 8]
        path.write_text(json.dumps(fits[: opts.pairs]))
    return path


def _our_checkpointing(opts: argparse.Namespace) -> bool | float:
    """Every layer recomputed (as TRL), none (``--checkpoint-fraction 0``) or that share."""
    if not opts.checkpointing or opts.checkpoint_fraction == 0:
        return False
    return opts.checkpoint_fraction or True


def run_ours(opts: argparse.Namespace, packed: bool, cached: bool) -> dict:
    from xtuner_lite import train

    cfg = dict(
        model=dict(
            pretrained=MODEL,
            method="lora",
            dtype="bf16",  # fp32 where the CPU has no native bf16 (as TRL gets below)
            lora=dict(**LORA, target_modules="all-linear"),
            gradient_checkpointing=_our_checkpointing(opts),
        ),
        train_dataset=dict(
            data_files=str(subset(opts)),
            tokenizer=MODEL,
            template="smollm2",
            max_length=opts.max_length,
            pack=packed,
        ),
        objective=dict(type="dpo", beta=0.1, precompute_reference=cached),
        train=dict(
            batch_size=opts.batch if not packed else max(1, opts.batch // 2),
            accumulative_counts=1,
            epochs=1,
            lr=5e-5,
            warmup_ratio=0.0,
            dtype="bf16",
            save_steps=10**9,
            log_interval=10**6,
            tensorboard=False,
        ),
    )
    start = time.perf_counter()
    train(cfg, work_dir=tempfile.mkdtemp(prefix="bench_dpo_ours_"))
    return {"seconds": time.perf_counter() - start, "pairs": opts.pairs}


def run_trl(opts: argparse.Namespace) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from xtuner_lite.hub import load_model, load_tokenizer
    from xtuner_lite.model.precision import cpu_has_fast_bf16

    tokenizer = load_tokenizer(MODEL)
    raw = json.loads(subset(opts).read_text())
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": prompt_messages(r),
                "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
            }
            for r in raw
        ]
    )
    bf16 = cpu_has_fast_bf16()
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_dpo_trl_"),
        use_cpu=True,
        bf16=bf16,
        max_length=opts.max_length,
        per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=5e-5,
        beta=0.1,
        loss_type=["sigmoid"],
        warmup_steps=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
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
    model = load_model(MODEL, dtype="bfloat16" if bf16 else "float32")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    # the pairs TRL kept after its own filtering: the rate counts trained pairs only
    return {"seconds": time.perf_counter() - start, "pairs": len(trainer.train_dataset)}


def run_one(side: str, opts: argparse.Namespace) -> dict:
    if side == "trl":
        return run_trl(opts)
    return run_ours(opts, packed=side != "ours", cached=side == "ours-cached")


def child(side: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--file", str(opts.file)]
    cmd += ["--pairs", str(opts.pairs), "--max-length", str(opts.max_length)]
    cmd += ["--batch", str(opts.batch)] + ([] if opts.checkpointing else ["--no-checkpointing"])
    cmd += (
        ["--checkpoint-fraction", str(opts.checkpoint_fraction)]
        if opts.checkpoint_fraction is not None
        else []
    )
    result = run_side(cmd, side)
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument(
        "--checkpoint-fraction",
        type=float,
        help="ours: recompute this share of the decoder layers, 0 for none (TRL recomputes all)",
    )
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:  # child process: one side, one JSON line on stdout
        report(run_one(opts.side, opts))
        return
    from xtuner_lite.hub import resolve_model_path

    resolve_model_path(MODEL, "bf16")  # one-time caches, outside the timings
    opts.pairs = len(json.loads(subset(opts).read_text()))
    if "ours-cached" in opts.sides:  # write the reference cache once, outside the timings
        child("ours-cached", opts)
    runs = [{side: child(side, opts) for side in opts.sides} for _ in range(opts.repeats)]
    share = opts.checkpoint_fraction
    print(
        f"SmolLM2-135M DPO-LoRA, {opts.pairs} pairs, {opts.batch} pairs per step, "
        f"max_length {opts.max_length} per sequence, checkpointing "
        f"{'on' if opts.checkpointing else 'off'}"
        f"{'' if share is None else f' (ours: {share} of layers)'}, "
        f"{os.cpu_count()} CPU threads"
    )
    print(f"{'side':12s} {'pairs':>6s} {'pairs/s (median)':>17s} {'peak RSS MiB':>13s} "
          f"{'vs trl speed':>13s} {'vs trl memory':>14s}")  # fmt: skip
    trl = "trl" in opts.sides
    for side in opts.sides:
        speed = statistics.median(r[side]["pairs_per_s"] for r in runs)
        rss = statistics.median(r[side]["peak_rss_mib"] for r in runs)
        ratios = ""
        if trl and side != "trl":  # each run's ratio against the trl run next to it
            s = statistics.median(r[side]["pairs_per_s"] / r["trl"]["pairs_per_s"] for r in runs)
            m = statistics.median(r[side]["peak_rss_mib"] / r["trl"]["peak_rss_mib"] for r in runs)
            ratios = f"{s:12.2f}x {m:13.2f}x"
        pairs = runs[0][side]["pairs"]
        print(f"{side:12s} {pairs:6d} {speed:17.3f} {rss:13.0f} {ratios}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
