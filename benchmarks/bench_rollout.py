"""What a GRPO rollout token costs against plain inference of the same model.

Both sides sample the same completions count with the bundled engine, all rows together, a fixed
``--new-tokens`` each (no stop tokens, so both generate exactly the same number of tokens):
``lora`` from SmolLM2-135M-Instruct with a LoRA adapter on every linear layer (r=16), as GRPO
samples from the policy it trains (merged into the packed weights for the rollout where the
engine packs them); ``plain`` from the model alone, as ``xtuner chat`` / ``serve`` do. Each
side runs in its own process, alternating, median of ``--repeats``; generated tokens per second,
model loading excluded. ``--context-tokens N`` puts a passage of about N tokens (the dataset's
other questions) in a system message before each question, as an RL task over a document does:
a group's prompt is then long, and held once for all its completions.

    python benchmarks/bench_rollout.py --rows 16 --new-tokens 96 --repeats 3
    python benchmarks/bench_rollout.py --rows 32 --context-tokens 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from sides import report, run_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "xtuner_lite" / "examples" / "data" / "arithmetic_train.jsonl"
MODEL = "smollm2-135m-instruct"
SIDES = ("lora", "plain")


def with_context(prompts: list, tokenizer, template, tokens: int) -> list:
    """Each prompt with a system message of about ``tokens`` tokens of the other questions."""
    from xtuner_lite.objectives.grpo.prompts import Prompt

    questions = [p.row["question"] for p in prompts]
    passage = tokenizer.decode(tokenizer(" ".join(questions[-64:]))["input_ids"][:tokens])
    out = []
    for p in prompts:
        messages = [{"role": "system", "content": passage},
                    {"role": "user", "content": p.row["question"]}]  # fmt: skip
        ids = tokenizer(template.render_prompt(messages, tokenizer), add_special_tokens=False)
        out.append(Prompt(ids["input_ids"], p.row, p.where))
    return out


def run(side: str, rows: int, new_tokens: int, context_tokens: int = 0) -> tuple[float, float]:
    """(generated tokens per second, seconds)."""
    import torch

    from xtuner_lite.data.templates import get_template
    from xtuner_lite.hub import load_tokenizer
    from xtuner_lite.inference.sampling import SamplingParams
    from xtuner_lite.model import build_model
    from xtuner_lite.objectives.grpo.prompts import process_prompt_dataset
    from xtuner_lite.objectives.grpo.rollout import sample_completions

    method = "lora" if side == "lora" else "full"
    lora = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    model = build_model(MODEL, method=method, dtype="fp32", lora=lora)
    if side == "lora":  # a trained adapter: B is not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
    tokenizer = load_tokenizer(MODEL)
    template = get_template("smollm2")
    prompts, _ = process_prompt_dataset(str(PROMPTS), tokenizer, template)
    if context_tokens:
        prompts = with_context(prompts, tokenizer, template, context_tokens)
    groups = rows // 4
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7)
    _, stats = sample_completions(
        model, tokenizer, prompts[:groups], list(range(groups)), params, 4, (0, 0)
    )
    return stats.tokens / stats.seconds, stats.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="completions sampled together")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument(
        "--context-tokens", type=int, default=0, help="a passage of this many tokens first"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        speed, seconds = run(opts.side, opts.rows, opts.new_tokens, opts.context_tokens)
        report({"tokens_per_s": speed, "seconds": seconds})
        return
    results = {side: [] for side in SIDES}
    for _ in range(opts.repeats):
        for side in SIDES:
            cmd = [sys.executable, __file__, "--side", side, "--rows", str(opts.rows)]
            cmd += ["--new-tokens", str(opts.new_tokens)]
            cmd += ["--context-tokens", str(opts.context_tokens)]
            results[side].append(run_side(cmd, side)["tokens_per_s"])
    started = time.strftime("%Y-%m-%d")
    lora, plain = (statistics.median(results[s]) for s in SIDES)
    print(f"{started}: {opts.rows} rows x {opts.new_tokens} new tokens, prompts of "
          f"{opts.context_tokens} context tokens + a question, SmolLM2-135M fp32, "
          f"{os.cpu_count()} CPU threads")  # fmt: skip
    print(
        f"plain inference {plain:.1f} tok/s; LoRA rollouts {lora:.1f} tok/s; "
        f"a rollout token costs {plain / lora:.2f}x a plain one"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
