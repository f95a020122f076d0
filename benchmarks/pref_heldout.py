"""Held-out preference accuracy before and after preference training (issue 18's table).

A seeded 90/10 split of LLaMA-Factory's DPO demo; each method trains a LoRA adapter on the 90 %
(KTO on LLaMA-Factory's KTO demo, its own unpaired format) and is scored on the 10 %. Per pair:
the chosen-minus-rejected margin of the mean token log-probability (length-normalized, so every
method compares on one scale) and of the summed log-probability, whose change from before to
after is the DPO implicit reward margin against the untrained model (``implicit acc``: the share
of pairs where it is positive; the untrained model's is zero on every pair, so chance is 0.5;
its 95 % Wilson interval and the 95 % interval of the implicit margin itself are printed too). The
other interval is the paired 95 % normal interval of the per-pair change in the mean-log-prob
margin. The reward model is scored by its score margin (before: its
untrained head). Training truncates to ``--max-length``; scoring reads every held-out pair whole
unless ``--eval-length`` says otherwise, so a pair is judged on all of both responses.

    python benchmarks/pref_heldout.py --methods dpo orpo simpo kto reward --max-iters 20
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import torch

from xtuner_lite.adapters import load_adapted
from xtuner_lite.commands.train import train
from xtuner_lite.data.dataset import PreferenceDataset, collate_preference, share_prompts
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.evaluation.intervals import wilson
from xtuner_lite.model import build_model
from xtuner_lite.model.attention import can_branch, runs_segments
from xtuner_lite.model.logprobs import sequence_logps, sequence_scores
from xtuner_lite.objectives.preference.objective import score_head

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pref"
MODEL = "smollm2-135m-instruct"
ROWS_PER_STEP = 4  # the configs' effective batch: batch_size 1 x accumulative_counts 4
WHOLE = 8192  # SmolLM2's context: every held-out pair is scored whole


def split(path: Path, out: Path, seed: int) -> tuple[Path, Path]:
    rows = json.loads(path.read_text())
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * 0.9)
    train_file, held_file = out / "train.json", out / "heldout.json"
    train_file.write_text(json.dumps(rows[:cut]))
    held_file.write_text(json.dumps(rows[cut:]))
    return train_file, held_file


@torch.no_grad()
def margins(model, held: Path, max_length: int, reward: bool = False) -> dict[str, torch.Tensor]:
    """Per held-out pair: chosen minus rejected of the mean and summed token log-probability
    (or of a reward model's score)."""
    processed = process_preference_dataset(
        str(held), MODEL, max_length=max_length, pack=False, shuffle=False, use_cache=False
    )
    dataset = PreferenceDataset(processed.data, processed.stats)
    out: dict[str, list[torch.Tensor]] = {"mean": [], "sum": []}
    model.eval()
    for start in range(0, len(dataset), 4):
        batch = collate_preference(
            [dataset[i] for i in range(start, min(start + 4, len(dataset)))], 2, 32
        )
        if can_branch(model):  # as training runs them: each prompt once, no padding between
            batch = share_prompts(batch, 2, 32, one_row=runs_segments(model))
        if reward:
            scores = sequence_scores(model, score_head(model), batch)
            out["mean"].append(scores[0::2] - scores[1::2])
            out["sum"].append(scores[0::2] - scores[1::2])
            continue
        logps = sequence_logps(model, batch)
        out["mean"].append(logps.mean[0::2] - logps.mean[1::2])
        out["sum"].append(logps.total[0::2] - logps.total[1::2])
    return {k: torch.cat(v) for k, v in out.items()}


def interval(diff: torch.Tensor) -> tuple[float, float]:
    mean = float(diff.mean())
    half = 1.96 * float(diff.std()) / math.sqrt(len(diff))
    return mean - half, mean + half


def train_method(method: str, args, train_file: Path, work: Path) -> Path:
    options = {
        "train_dataset.max_length": args.max_length,
        "train.max_iters": args.max_iters,
        "train.epochs": None,
        "train.lr": args.lr,
        "train.batch_size": args.micro_batch,
        "train.accumulative_counts": ROWS_PER_STEP // args.micro_batch,
        "train.save_steps": 10_000,
        "train.log_interval": 5,
    }
    if method != "kto":
        options["train_dataset.data_files"] = str(train_file)
    else:
        options["train_dataset.data_files"] = str(SHARED / "llamafactory_kto_en_demo.json")
    return train(f"smollm2_135m_{method}_lora", work_dir=work / method, cfg_options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dpo", "orpo", "simpo", "kto", "reward"])
    parser.add_argument("--data", default=str(SHARED / "llamafactory_dpo_en_demo.json"))
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=1,
        choices=(1, 2, 4),
        help="rows per forward; accumulation makes up the rest of the 4 rows a step",
    )
    parser.add_argument(
        "--eval-length",
        type=int,
        default=WHOLE,
        help="tokens per held-out sequence when scoring (default: whole pairs, none truncated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pref_heldout_"))
    train_file, held = split(Path(args.data), work, args.seed)
    print(f"work dir: {work}", flush=True)
    before = margins(build_model(MODEL, method="full", dtype="fp32"), held, args.eval_length)
    rows = []
    for method in args.methods:
        adapter = train_method(method, args, train_file, work)
        model, _, _ = load_adapted(None, adapter)
        reward = method == "reward"
        after = margins(model, held, args.eval_length, reward)
        if reward:  # before: the same model with its untrained score head
            torch.manual_seed(args.seed)
            start = build_model(MODEL, method="lora", lora=dict(r=16, alpha=32), head="reward")
            base = margins(start, held, args.eval_length, reward=True)
        else:
            base = before
        low, high = interval(after["mean"] - base["mean"])
        implicit_margin = after["sum"] - base["sum"]
        implicit = float((implicit_margin > 0).float().mean())
        rows.append((method, base, after, low, high, implicit, implicit_margin))
        print(f"{method}: done", flush=True)
    print(f"\nheld-out pairs: {len(before['mean'])}; settings: {vars(args)}")
    print(f"{'method':7} {'acc before':>10} {'acc after':>9} {'margin before':>13} "
          f"{'margin after':>12} {'change, 95% CI':>22} {'implicit acc':>12} "
          f"{'implicit acc 95% CI':>19} {'implicit margin, 95% CI':>24}")  # fmt: skip
    for method, base, after, low, high, implicit, implicit_margin in rows:
        n = len(implicit_margin)
        acc_low, acc_high = wilson(int((implicit_margin > 0).sum()), n)
        m_low, m_high = interval(implicit_margin)
        acc_b, acc_a = (
            float((base["mean"] > 0).float().mean()),
            float((after["mean"] > 0).float().mean()),
        )
        print(f"{method:7} {acc_b:10.3f} {acc_a:9.3f} {float(base['mean'].mean()):+13.4f} "
              f"{float(after['mean'].mean()):+12.4f} [{low:+.4f}, {high:+.4f}] "
              f"{'-' if method == 'reward' else f'{implicit:.3f}':>12} "
              f"[{acc_low:.3f}, {acc_high:.3f}] [{m_low:+.3f}, {m_high:+.3f}]")  # fmt: skip


if __name__ == "__main__":
    main()
