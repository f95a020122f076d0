"""Vision-language LoRA training throughput and peak memory: xtuner_lite vs TRL's SFTTrainer.

The same LLaVA-shaped model on both sides: SmolLM2-135M-Instruct, a SigLIP-B/16-shaped vision
tower at 224 pixels (12 layers, 768 wide: 196 image tokens per image, random weights: speed and
memory do not depend on them) and an MLP projector, composed once by
``xtuner_lite.model.vlm.compose_llava`` outside the timings; the frozen base in bf16, LoRA (r=16,
alpha=32, dropout 0.05) on the language model's linear layers with the projector trained in full
(fp32) and the tower frozen, bf16 autocast, gradient checkpointing (TRL's default), the same
``--steps`` × ``--rows`` "What digit is this?" conversations about scikit-learn's handwritten
digits (``xtuner_lite/examples/digits.py``), AdamW at the same learning rate, ``--steps``
optimizer steps. The composed folder is stored in bf16 (``--stored``), as hub image-text
checkpoints ship (SmolVLM-256M's among them): an fp32 file read as bf16 is mapped whole while
it converts, a load-time peak above either side's training peak. TRL cannot pack image data,
so it pads ``--rows`` conversations per step; ours packs them into rows of ``--max-length``
tokens (its images are decoded once into the dataset cache on disk: a first run pays that,
later ones read it). Each side runs in its own process
(peak RSS is its own), alternating; real (non-padding) tokens per second. Wall time includes
model loading and data preparation on both sides.

``--checkpoint-fraction F`` has ours recompute only that share of the decoder layers (as
bench_train's row does), spending the memory it leaves under TRL's on speed.

    python benchmarks/bench_vlm.py --steps 8 --repeats 3 [--stored float32]
        [--checkpoint-fraction 0.5]
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

from sides import cpu_name, report, run_side, train_ours

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LORA = dict(r=16, alpha=32, dropout=0.05)
TOWER = dict(
    model_type="siglip_vision_model",
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
)
# chatml that renders content parts, <image> where an image part is (TRL's collator renders
# messages through the processor's template)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare(work: Path, conversations: int, stored: str) -> tuple[Path, Path]:
    """The composed model (stored in ``stored``) and ``conversations`` digits
    conversations (one question kind), under ``work``: both sides train on the same ones."""
    from xtuner_lite.examples import digits
    from xtuner_lite.hub import resolve_model_path
    from xtuner_lite.model.vlm import compose_llava

    train, _ = digits.write_data(work)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    data = work / "digit_questions.jsonl"
    rows = [r for r in rows if r["kind"] == "digit"][:conversations]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = compose_llava(resolve_model_path("smollm2-135m-instruct"), TOWER, work / "model",
                          dtype=stored)  # fmt: skip
    return model, data


def run_ours(opts: argparse.Namespace) -> dict:
    model = str(opts.model)
    cfg = dict(
        model=dict(pretrained=model, method="lora", dtype="bf16",
                   lora=dict(**LORA, target_modules="all-linear"),
                   gradient_checkpointing=opts.checkpoint_fraction or True),
        objective=dict(type="vlm_sft"),
        train_dataset=dict(data_files=str(opts.data), tokenizer=model, processor=model,
                           template="smollm2", max_length=opts.max_length),
        train=dict(batch_size=1, accumulative_counts=1, max_iters=opts.steps, lr=2e-4,
                   warmup_ratio=0.0, dtype="bf16", save_steps=10**9, log_interval=10**6,
                   tensorboard=False),
    )  # fmt: skip
    return train_ours(cfg, "bench_vlm_ours_")


def run_trl(opts: argparse.Namespace) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from xtuner_lite.model.vlm import LANGUAGE_MODEL, PROJECTOR

    processor = AutoProcessor.from_pretrained(opts.model)
    processor.chat_template = CHAT_TEMPLATE
    rows = [json.loads(line) for line in opts.data.read_text().splitlines()]
    folder = opts.data.parent

    def example(row: dict) -> dict:
        question = row["conversations"][0]["value"].replace("<image>\n", "")
        answer = row["conversations"][1]["value"]
        user = [{"type": "image"}, {"type": "text", "text": question}]
        return {
            "images": [Image.open(folder / row["image"]).convert("RGB")],
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }

    ds = datasets.Dataset.from_list([example(r) for r in rows])
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_vlm_trl_"), use_cpu=True, bf16=True,
        packing=False, max_length=opts.max_length, per_device_train_batch_size=opts.rows,
        gradient_accumulation_steps=1, max_steps=opts.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0, logging_steps=10**6, save_strategy="no",
        report_to=[], include_num_input_tokens_seen="non_padding", gradient_checkpointing=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=rf".*\.{LANGUAGE_MODEL}\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=[PROJECTOR], task_type="CAUSAL_LM",
    )  # fmt: skip
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(opts.model, dtype=torch.bfloat16)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=peft_config)  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="TRL: conversations per step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--stored",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the composed folder's weights (both sides load them as bf16)",
    )
    parser.add_argument(
        "--checkpoint-fraction",
        type=float,
        default=None,
        help="ours: recompute this share of the decoder layers (default: all, as TRL does)",
    )
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        report((run_ours if opts.side == "ours" else run_trl)(opts))
        return
    work = Path(tempfile.mkdtemp(prefix="bench_vlm_"))
    model, data = prepare(work, opts.steps * opts.rows, opts.stored)  # outside the timings
    runs = []
    for _ in range(opts.repeats):
        results = {}
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--model", str(model),
                   "--data", str(data), "--steps", str(opts.steps), "--rows", str(opts.rows),
                   "--max-length", str(opts.max_length)]  # fmt: skip
            if side == "ours" and opts.checkpoint_fraction is not None:
                cmd += ["--checkpoint-fraction", str(opts.checkpoint_fraction)]
            results[side] = run_side(cmd, side)
        for r in results.values():
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
        runs.append(results)
        ours, trl = results["ours"], results["trl"]
        mine = f"ours {ours['tokens_per_s']:.1f} tok/s {ours['peak_rss_mib']:.0f} MiB"
        theirs = f"TRL {trl['tokens_per_s']:.1f} tok/s {trl['peak_rss_mib']:.0f} MiB"
        print(f"pair: {mine}, {theirs}", flush=True)
    speed = [r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"] for r in runs]
    memory = [r["ours"]["peak_rss_mib"] / r["trl"]["peak_rss_mib"] for r in runs]
    print(f"{opts.steps} steps on {cpu_name()}")
    pairs = [", ".join(f"{x:.2f}" for x in values) for values in (speed, memory)]
    print(f"ours / TRL speed {statistics.median(speed):.2f}x ({pairs[0]}); "
          f"memory {statistics.median(memory):.2f}x ({pairs[1]})")  # fmt: skip
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
