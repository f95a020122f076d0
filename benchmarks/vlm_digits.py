"""The vision-language CPU demo, measured: held-out accuracy of the digits LLaVA before
training, after stage 1 and after stage 2, with 95 % Wilson intervals and each stage's wall time.

Writes the data and the composed model (``xtuner_lite/examples/digits.py``) under
``WORK/work_dirs/llava_digits``, runs the two bundled configs with ``xtuner train`` from
``WORK`` (their paths are relative to it), and answers every held-out question greedily with
transformers' own ``generate`` on the saved folders (stage 2: the adapter through peft), the
prompt rendered with the training template. ``--grid`` draws held-out digits with the final
model's answers.

    python benchmarks/vlm_digits.py --work /tmp/llava_digits --grid docs/images/llava_digits.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

from xtuner_lite.data.images import join_images
from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.examples import digits
from xtuner_lite.hub import load_tokenizer
from xtuner_lite.inference.images import ImageInput
from xtuner_lite.model.vlm import model_image_inputs

STAGES = ("smollm2_135m_llava_digits_pretrain", "smollm2_135m_llava_digits_finetune")


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def load(folder: Path, adapter: Path | None = None) -> torch.nn.Module:
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def answers(model, folder: Path, rows: list[dict], images: Path, batch: int = 64) -> list[str]:
    """The greedy reply to each row's question (its image), as training renders the prompt
    and as ``xtuner chat --image`` expands it."""
    tokenizer = load_tokenizer(str(folder))
    template = get_template("smollm2")
    reader = ImageInput(folder, tokenizer)
    stops = stop_token_ids(template, tokenizer)
    replies = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        prompts, pixels = [], []
        for row in chunk:
            question = row["conversations"][0]["value"]
            text = template.render_prompt([{"role": "user", "content": question}], tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, shown = reader.prompt(ids, [row["image"]], images)
            prompts.append(ids)
            pixels.append(shown)
        width = max(map(len, prompts))
        ids = torch.tensor([[stops[0]] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        images = model_image_inputs(model.config, join_images(pixels))
        out = model.generate(input_ids=ids, attention_mask=mask, **images,
                             max_new_tokens=8, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])  # fmt: skip
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


def score(rows: list[dict], replies: list[str]) -> dict[str, tuple[int, int]]:
    """(correct, total) per question kind."""
    result: dict[str, list[int]] = {}
    for row, reply in zip(rows, replies):
        hit = digits.is_correct(row["kind"], row["digit"], reply)
        counts = result.setdefault(row["kind"], [0, 0])
        counts[0] += hit
        counts[1] += 1
    return {kind: (c, n) for kind, (c, n) in result.items()}


def train(stage: str, work: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "xtuner_lite.cli", "train", stage]
    subprocess.run(cmd, cwd=work, check=True)
    return time.perf_counter() - start


def grid(path: Path, rows: list[dict], replies: list[str], images: Path, count: int = 24) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [(r, a) for r, a in zip(rows, replies) if r["kind"] == "digit"][:count]
    columns = 8
    fig, axes = plt.subplots(len(shown) // columns, columns, figsize=(columns * 1.3, 5))
    for ax, (row, reply) in zip(axes.flat, shown):
        ax.imshow(Image.open(images / row["image"]), cmap="gray_r")
        ok = digits.is_correct("digit", row["digit"], reply)
        ax.set_title(reply.strip()[:12], fontsize=8, color="green" if ok else "red")
        ax.axis("off")
    fig.suptitle("Held-out digits: the stage-2 model's answer to 'What digit is this?'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(name: str, scores: dict[str, tuple[int, int]]) -> None:
    for kind, (correct, total) in scores.items():
        low, high = wilson(correct, total)
        share = f"{correct / total:.3f} [{low:.3f}, {high:.3f}] ({correct}/{total})"
        print(f"{name:>14} {kind:>7}: {share}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work_dirs/vlm_digits_bench"))
    parser.add_argument("--grid", type=Path, help="save a grid of held-out answers here")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    work = opts.work.resolve()
    data = work / "work_dirs" / "llava_digits"
    data.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _, test = digits.write_data(data)
    composed = digits.compose(data)
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    images = data
    results = {"before": score(rows, answers(load(composed), composed, rows, images))}
    report("before", results["before"])
    seconds = {STAGES[0]: train(STAGES[0], work)}
    stage1 = work / "work_dirs" / STAGES[0] / "model"
    results["stage 1"] = score(rows, answers(load(stage1), stage1, rows, images))
    report("after stage 1", results["stage 1"])
    seconds[STAGES[1]] = train(STAGES[1], work)
    adapter = work / "work_dirs" / STAGES[1] / "adapter"
    final = answers(load(stage1, adapter), stage1, rows, images)
    results["stage 2"] = score(rows, final)
    report("after stage 2", results["stage 2"])
    print(json.dumps({"results": results, "train_seconds": seconds,
                      "total_seconds": time.perf_counter() - start}))  # fmt: skip
    if opts.grid:
        grid(opts.grid, rows, final, images)


if __name__ == "__main__":
    main()
