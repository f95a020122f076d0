"""The vision-language CPU demo: a LLaVA that learns to read handwritten digits.

No pretrained vision weights can be downloaded everywhere, so the whole LLaVA recipe runs on
real images that ship with scikit-learn (``load_digits``: 1,797 handwritten digits, 8×8 grey
levels): a small SigLIP-shaped vision encoder of ours, initialized at random and trained in
stage 1 together with the projector (the LLM frozen), SmolLM2-135M-Instruct as the LLM, then
LoRA on the LLM in stage 2. Two kinds of question about each image ("What digit is this?",
"Is this digit even?") on a seeded train / held-out split.

    python -m xtuner_lite.examples.digits work_dirs/llava_digits   # data and composed model
    xtuner train smollm2_135m_llava_digits_pretrain                # stage 1
    xtuner train smollm2_135m_llava_digits_finetune                # stage 2
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from xtuner_lite.data.images import IMAGE_TOKEN
from xtuner_lite.hub import resolve_model_path
from xtuner_lite.model.vlm import compose_llava

LANGUAGE_MODEL = "smollm2-135m-instruct"
# 16×16 inputs (the 8×8 digits upscaled by the processor) in 4×4 patches: 16 image tokens
VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    # unused by LLaVA; kept so that a seed composes the model docs/vision.md measured
    vision_use_head=True,
)
QUESTIONS = {"digit": "What digit is this?", "parity": "Is this digit even?"}


def reply(kind: str, digit: int) -> str:
    """The trained answer to a question of ``kind`` about ``digit``."""
    if kind == "digit":
        return f"It is {digit}."
    return "Yes, it is even." if digit % 2 == 0 else "No, it is odd."


def is_correct(kind: str, digit: int, text: str) -> bool:
    """Whether a generated reply answers right: the first digit it writes, or yes / no."""
    if kind == "digit":
        found = re.search(r"\d", text)
        return found is not None and int(found.group()) == digit
    said = text.strip().lower()
    return said.startswith("yes" if digit % 2 == 0 else "no")


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded indices of the training and held-out digits."""
    order = np.random.default_rng(seed).permutation(len(load_digits().target))
    test = int(len(order) * test_fraction)
    return order[test:], order[:test]


def write_data(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Each digit as a PNG under ``out/images`` and the two question kinds about it as LLaVA
    rows in ``out/train.jsonl`` / ``out/test.jsonl`` (test rows carry ``digit`` and ``kind``)."""
    digits = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(digits.images):
        grey = np.round(pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(grey, mode="L").save(out / "images" / f"{i:04d}.png")
    paths = []
    for name, indices in zip(("train", "test"), split(seed)):
        rows = []
        for i in indices.tolist():
            digit = int(digits.target[i])
            for kind, question in QUESTIONS.items():
                rows.append({
                    "image": f"images/{i:04d}.png",
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                        {"from": "gpt", "value": reply(kind, digit)},
                    ],
                    "digit": digit,
                    "kind": kind,
                })  # fmt: skip
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def compose(out: Path, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct with a random vision encoder and projector, as a LLaVA folder."""
    return compose_llava(resolve_model_path(LANGUAGE_MODEL), VISION, out / "composed", seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="work_dirs/llava_digits", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    train, test = write_data(opts.out, opts.seed)
    model = compose(opts.out, opts.seed)
    print(f"wrote {train}, {test} and the composed model {model}")


if __name__ == "__main__":
    main()
