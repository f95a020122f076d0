"""Held-out preference accuracy before and after preference training (issue 18's table).

A seeded 90/10 split of LLaMA-Factory's DPO demo; each method trains a LoRA adapter on the 90 %
and is scored on the 10 %: per pair, the chosen-minus-rejected margin of the mean token
log-probability (length-normalized, so methods with and without a reference compare), and
whether it is positive. Before = the untrained model, after = with the adapter. The interval is
the paired 95 % normal interval of the per-pair change in margin.

    python benchmarks/pref_heldout.py --methods dpo simpo --max-iters 30 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from xtuner_lite.data.dataset import PreferenceDataset, collate_preference
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.model import build_model
from xtuner_lite.model.logprobs import sequence_logps
from xtuner_lite.training import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pref"
CONFIGS = {
    "dpo": "smollm2_135m_dpo_lora",
    "orpo": "smollm2_135m_orpo_lora",
    "simpo": "smollm2_135m_simpo_lora",
}
MODEL = "smollm2-135m-instruct"


def split(path: Path, out: Path, seed: int) -> tuple[Path, Path]:
    rows = json.loads(path.read_text())
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * 0.9)
    train_file, held_file = out / "train.json", out / "heldout.json"
    train_file.write_text(json.dumps(rows[:cut]))
    held_file.write_text(json.dumps(rows[cut:]))
    return train_file, held_file


@torch.no_grad()
def margins(model, held: Path, max_length: int) -> torch.Tensor:
    """Per held-out pair: mean token log-prob of chosen minus rejected."""
    processed = process_preference_dataset(
        str(held), MODEL, max_length=max_length, pack=False, shuffle=False, use_cache=False
    )
    dataset = PreferenceDataset(processed.data, processed.stats)
    out = []
    model.eval()
    for start in range(0, len(dataset), 4):
        rows = [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
        logps = sequence_logps(model, collate_preference(rows, 2, 32))
        out.append(logps.mean[0::2] - logps.mean[1::2])
    return torch.cat(out)


def interval(diff: torch.Tensor) -> tuple[float, float]:
    mean = float(diff.mean())
    half = 1.96 * float(diff.std()) / math.sqrt(len(diff))
    return mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dpo", "orpo", "simpo"])
    parser.add_argument("--data", default=str(SHARED / "llamafactory_dpo_en_demo.json"))
    parser.add_argument("--max-iters", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pref_heldout_"))
    train_file, held = split(Path(args.data), work, args.seed)
    base = build_model(MODEL, method="full", dtype="fp32")
    before = margins(base, held, args.max_length)
    print(f"held-out pairs: {len(before)}; before: accuracy {(before > 0).float().mean():.3f}, "
          f"mean margin {before.mean():+.4f}")  # fmt: skip
    rows = []
    for method in args.methods:
        adapter = train(
            CONFIGS[method],
            work_dir=work / method,
            cfg_options={
                "train_dataset.data_files": str(train_file),
                "train_dataset.max_length": args.max_length,
                "train.max_iters": args.max_iters,
                "train.epochs": None,
                "train.lr": args.lr,
                "train.save_steps": 10_000,
            },
        )
        model = PeftModel.from_pretrained(build_model(MODEL, method="full", dtype="fp32"), adapter)
        after = margins(model, held, args.max_length)
        low, high = interval(after - before)
        rows.append((method, float((after > 0).float().mean()), float(after.mean()), low, high))
    print(f"\n{'method':8} {'acc before':>10} {'acc after':>9} {'margin before':>13} "
          f"{'margin after':>12} {'change 95% CI':>22}")  # fmt: skip
    acc_before, margin_before = float((before > 0).float().mean()), float(before.mean())
    for method, acc, margin, low, high in rows:
        print(f"{method:8} {acc_before:10.3f} {acc:9.3f} {margin_before:+13.4f} "
              f"{margin:+12.4f} [{low:+.4f}, {high:+.4f}]")  # fmt: skip
    print(f"\nsettings: {vars(args)}")


if __name__ == "__main__":
    main()
