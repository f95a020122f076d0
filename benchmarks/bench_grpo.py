"""GRPO-LoRA throughput and peak memory: xtuner_lite vs TRL's GRPOTrainer, same work.

Same model (SmolLM2-135M-Instruct), LoRA (r=16, alpha=32, no dropout, all linear layers), the
seeded arithmetic prompts (``xtuner_lite/examples/data/arithmetic_train.jsonl``), G completions
per prompt, ``--prompts`` prompts per optimizer step, max completion length, sampling
(temperature 0.7), rewards (exact final number, weight 1; "#### N" final line, weight 0.2),
GRPO's per-sequence loss without KL, precision (fp32 on CPUs without native bf16), no gradient
checkpointing. TRL runs its default generation path (``model.generate``, no vLLM). Each side runs
``--steps`` optimizer steps in its own process (peak RSS is its own); the sides alternate and the
median of ``--repeats`` runs is printed. Wall time includes model loading on both sides (imports
excluded on both). Both sample, so their completions (and lengths) differ: the mean completion
length of each side is printed next to its speed.

    python benchmarks/bench_grpo.py --steps 4 --repeats 3
    python benchmarks/bench_grpo.py --steps 4 --repeats 3 --generations 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sides import report, run_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "xtuner_lite" / "examples" / "data" / "arithmetic_train.jsonl"
MODEL = "smollm2-135m-instruct"
LORA = dict(r=16, alpha=32, dropout=0.0)
FINAL_LINE = r"####\s*-?\d+\s*$"
SIDES = ("ours", "trl")


def run_ours(opts: argparse.Namespace) -> dict:
    from xtuner_lite import train

    cfg = dict(
        model=dict(pretrained=MODEL, method="lora", dtype="bf16",
                   lora=dict(**LORA, target_modules="all-linear")),
        train_dataset=dict(data_files=str(PROMPTS), tokenizer=MODEL, template="smollm2",
                           map_fn="question"),
        objective=dict(
            type="grpo",
            rewards=[dict(type="numeric_answer", weight=1.0),
                     dict(type="format", pattern=FINAL_LINE, weight=0.2)],
            num_generations=opts.generations, max_new_tokens=opts.max_new_tokens,
            temperature=0.7, beta=0.0, aggregation="grpo",
        ),
        train=dict(batch_size=opts.prompts, accumulative_counts=1, max_iters=opts.steps,
                   epochs=None, lr=1e-5, warmup_ratio=0.0, dtype="bf16", save_steps=10**9,
                   log_interval=10**6, tensorboard=False),
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_ours_"))
    start = time.perf_counter()
    train(cfg, work_dir=work)
    seconds = time.perf_counter() - start
    logs = [json.loads(x) for x in (work / "loss.jsonl").read_text().splitlines()]
    length = statistics.mean(r["completion/length"] for r in logs)
    return {"seconds": seconds, "steps": len(logs), "completion_length": length}


def _final_number(text: str) -> str | None:
    from xtuner_lite.objectives.grpo.rewards import extract_answer

    value = extract_answer(text)
    return None if value is None else str(value)


def run_trl(opts: argparse.Namespace) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from xtuner_lite.hub import load_model, load_tokenizer
    from xtuner_lite.model.precision import cpu_has_fast_bf16

    rows = [json.loads(x) for x in PROMPTS.read_text().splitlines()]
    ds = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
         for r in rows]
    )  # fmt: skip

    def numeric_answer(completions, answer, **_):
        texts = [c[0]["content"] for c in completions]
        return [1.0 if _final_number(t) == str(a) else 0.0 for t, a in zip(texts, answer)]

    def final_line(completions, **_):
        pattern = re.compile(FINAL_LINE, re.DOTALL)
        return [1.0 if pattern.search(c[0]["content"]) else 0.0 for c in completions]

    bf16 = cpu_has_fast_bf16()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"),
        use_cpu=True,
        bf16=bf16,
        per_device_train_batch_size=opts.prompts * opts.generations,
        gradient_accumulation_steps=1,
        num_generations=opts.generations,
        max_completion_length=opts.max_new_tokens,
        temperature=0.7,
        beta=0.0,
        loss_type="grpo",
        reward_weights=[1.0, 0.2],
        max_steps=opts.steps,
        learning_rate=1e-5,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    start = time.perf_counter()
    model = load_model(MODEL, dtype="bfloat16" if bf16 else "float32")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[numeric_answer, final_line],
        args=args,
        train_dataset=ds,
        processing_class=load_tokenizer(MODEL),
        peft_config=peft_config,
    )
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    length = statistics.mean(r["completions/mean_length"] for r in logs)
    return {"seconds": seconds, "steps": trainer.state.global_step, "completion_length": length}


def child(side: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(opts.steps)]
    cmd += ["--prompts", str(opts.prompts), "--generations", str(opts.generations)]
    cmd += ["--max-new-tokens", str(opts.max_new_tokens)]
    result = run_side(cmd, side)
    result["steps_per_s"] = result["steps"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument(
        "--generations",
        type=int,
        default=8,
        help="G, completions per prompt (8: TRL's default, the bundled config's)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:  # child process: one side, one JSON line on stdout
        report(run_ours(opts) if opts.side == "ours" else run_trl(opts))
        return
    from xtuner_lite.hub import resolve_model_path

    resolve_model_path(MODEL, "bf16")  # one-time caches, outside the timings
    runs = [{side: child(side, opts) for side in opts.sides} for _ in range(opts.repeats)]
    print(
        f"SmolLM2-135M GRPO-LoRA, {opts.steps} steps of {opts.prompts} prompts x "
        f"{opts.generations} completions, max {opts.max_new_tokens} new tokens, "
        f"{os.cpu_count()} CPU threads"
    )
    print(f"{'side':6s} {'steps/s (median)':>17s} {'completion len':>15s} {'peak RSS MiB':>13s} "
          f"{'vs trl speed':>13s} {'vs trl memory':>14s}")  # fmt: skip
    for side in opts.sides:
        speed = statistics.median(r[side]["steps_per_s"] for r in runs)
        length = statistics.median(r[side]["completion_length"] for r in runs)
        rss = statistics.median(r[side]["peak_rss_mib"] for r in runs)
        ratios = ""
        if "trl" in opts.sides and side != "trl":  # each run against the trl run next to it
            s = statistics.median(r[side]["steps_per_s"] / r["trl"]["steps_per_s"] for r in runs)
            m = statistics.median(r[side]["peak_rss_mib"] / r["trl"]["peak_rss_mib"] for r in runs)
            ratios = f"{s:12.2f}x {m:13.2f}x"
        print(f"{side:6s} {speed:17.4f} {length:15.1f} {rss:13.0f} {ratios}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
