"""Our evaluator vs lm-evaluation-harness on the same multiple-choice task, model and prompt.

ARC-Easy (llm-foundry's local copy, 2,376 questions by default) with SmolLM2-135M-Instruct in
fp32 on CPU: lm-eval's HF model through a local-file task, ours through a task spec with the same
prompt. Wall time includes loading the model on both sides. Prints both accuracies, how many
questions got the same prediction, and the time ratio.
Run: python benchmarks/bench_eval.py [--limit N] [--data ../shared/data/eval/...jsonl]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SPEC = dict(name="bench_mcq", prompt="{query}\nAnswer:", answer="gold")


def run_lm_eval(model_path: str, data: Path, batch_size: int) -> tuple[dict, list, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from xtuner_lite.evaluation import TaskSpec
    from xtuner_lite.evaluation.lm_eval_task import to_lm_eval_yaml

    with tempfile.TemporaryDirectory() as folder:
        spec = TaskSpec(data=str(data), **SPEC)
        Path(folder, "bench_mcq.yaml").write_text(to_lm_eval_yaml(spec, data))
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_path},dtype=float32",
            tasks=["bench_mcq"],
            task_manager=TaskManager(include_path=folder),
            batch_size=batch_size,
            device="cpu",
            log_samples=True,
        )
        seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["bench_mcq"], key=lambda s: s["doc_id"])
    preds = [
        max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
        for s in samples
    ]
    return out["results"]["bench_mcq"], preds, seconds


def run_ours(model_ref: str, data: Path) -> tuple[dict, list, float]:
    from xtuner_lite.evaluation import TaskSpec, evaluate_model, load_for_eval

    start = time.perf_counter()
    model = load_for_eval(model_ref)
    spec = TaskSpec(data=str(data), **SPEC)
    result = evaluate_model(model, [spec])["bench_mcq"]
    return result.metrics, [s["pred"] for s in result.samples], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/data/eval/llmfoundry_arc_easy.jsonl")
    )
    parser.add_argument("--limit", type=int, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    args = parser.parse_args()
    from xtuner_lite.hub import resolve_model_path

    model_path = resolve_model_path("smollm2-135m-instruct")
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as folder:
        if args.limit:
            subset = Path(folder, data.name)
            subset.write_text("".join(data.read_text().splitlines(True)[: args.limit]))
            data = subset
        theirs, their_preds, their_s = run_lm_eval(model_path, data, args.batch_size)
        ours, our_preds, our_s = run_ours("smollm2-135m-instruct", data)
    same = sum(a == b for a, b in zip(our_preds, their_preds))
    print(f"questions: {len(our_preds)}")
    print(
        f"lm-eval : acc {theirs['acc,none'] * 100:.2f}  acc_norm "
        f"{theirs['acc_norm,none'] * 100:.2f}  {their_s:.1f} s"
    )
    print(
        f"xtuner  : acc {ours['acc'] * 100:.2f}  acc_norm {ours['acc_norm'] * 100:.2f}  "
        f"{our_s:.1f} s"
    )
    print(f"same prediction on {same}/{len(our_preds)} questions; speed-up {their_s / our_s:.2f}x")


if __name__ == "__main__":
    main()
