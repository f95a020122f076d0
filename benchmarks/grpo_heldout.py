"""Held-out accuracy (greedy) of SmolLM2-135M-Instruct on the seeded arithmetic word problems,
before and after a short GRPO-LoRA run, with 95 % Wilson intervals and the paired difference.

    python benchmarks/grpo_heldout.py --max-iters 20 --plot  # train, then evaluate both
    python benchmarks/grpo_heldout.py --eval-only --limit 100  # the untrained model only

The training run is the bundled ``smollm2_135m_grpo_arithmetic`` config; its reward curve is
drawn to ``docs/images/grpo_reward.png`` with ``--plot``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xtuner_lite.commands.plot_log import plot_log
from xtuner_lite.commands.train import train
from xtuner_lite.data.templates import stop_token_ids
from xtuner_lite.evaluation.intervals import paired_difference, wilson
from xtuner_lite.inference.engine import InferenceEngine
from xtuner_lite.inference.loader import load_for_inference
from xtuner_lite.inference.sampling import SamplingParams
from xtuner_lite.objectives.grpo.prompts import process_prompt_dataset
from xtuner_lite.objectives.grpo.rewards import numeric_answer

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "xtuner_lite" / "examples" / "data" / "arithmetic_test.jsonl"
CONFIG = "smollm2_135m_grpo_arithmetic"


def correct(model: str, adapter: str | None, limit: int, max_new_tokens: int) -> list[float]:
    """1.0 / 0.0 per held-out question, greedy decoding."""
    loaded = load_for_inference(model, adapter)
    prompts, _ = process_prompt_dataset(str(TEST), loaded.tokenizer, loaded.template)
    prompts = prompts[:limit]
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids(loaded.template, loaded.tokenizer),
        stop_words=loaded.template.stop_words(loaded.tokenizer),
    )
    engine = InferenceEngine(loaded.model, loaded.tokenizer)
    requests = engine.generate([p.ids for p in prompts], params)
    reward = numeric_answer()
    return [reward(p.row, r.text) for p, r in zip(prompts, requests)]


def summary(name: str, hits: list[float]) -> str:
    low, high = wilson(int(sum(hits)), len(hits))
    return f"{name}: {sum(hits) / len(hits):.3f} [{low:.3f}, {high:.3f}] (n={len(hits)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--work-dir", default="work_dirs/grpo_heldout")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    before = correct(args.model, None, args.limit, args.max_new_tokens)
    print(summary("before", before), flush=True)
    if args.eval_only:
        return
    adapter = train(
        CONFIG,
        work_dir=args.work_dir,
        overwrite=True,
        cfg_options={"train.max_iters": args.max_iters},
    )
    after = correct(args.model, str(adapter), args.limit, args.max_new_tokens)
    print(summary("before", before))
    print(summary("after", after))
    mean, low, high = paired_difference(before, after)
    print(f"paired change: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    if args.plot:
        plot_log(args.work_dir, ROOT / "docs" / "images" / "grpo_reward.png", metric="reward")


if __name__ == "__main__":
    main()
