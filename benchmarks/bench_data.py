"""Tokenize + pack speed: xtuner_lite vs TRL's SFTTrainer dataset preparation, same file and model.

Both start from the raw Alpaca JSON file and end with packed rows of at most 2048 tokens with
assistant-only loss masks (TRL: prompt/completion conversational data, ``completion_only_loss``).
Run: python benchmarks/bench_data.py [--file F] [--max-length 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_FILE = SHARED / "sft" / "llamafactory_alpaca_en_demo.json"


def run_ours(path: Path, tokenizer, max_length: int) -> tuple[int, int]:
    from xtuner_lite import process_dataset

    out = process_dataset(
        path,
        tokenizer,
        map_fn="alpaca",
        template="smollm2",
        max_length=max_length,
        pack=True,
        use_cache=False,
        num_proc=1,
    )
    return len(out.data), out.stats.tokens


def run_trl(path: Path, tokenizer, trainer, args) -> tuple[int, int]:
    import datasets

    raw = datasets.load_dataset("json", data_files=str(path), split="train")

    def to_prompt_completion(row):
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    ds = raw.map(to_prompt_completion, remove_columns=raw.column_names)
    packed = trainer._prepare_dataset(ds, tokenizer, args, True, None, "train")
    return len(packed), sum(len(x) for x in packed["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    import datasets
    from trl import SFTConfig, SFTTrainer

    from xtuner_lite.hub import load_model, load_tokenizer

    datasets.disable_caching()  # each TRL run does the work again, like ours with use_cache=False
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    args = SFTConfig(
        output_dir="/tmp/bench_data_trl",
        packing=True,
        max_length=opts.max_length,
        completion_only_loss=True,
        report_to=[],
        dataset_num_proc=None,
        use_cpu=True,
        bf16=False,
    )
    tiny = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "yo"}],
            }
        ]
    )
    trainer = SFTTrainer(
        model=load_model("smollm2-135m-instruct"),
        args=args,
        train_dataset=tiny,
        processing_class=tokenizer,
    )

    results = {}
    for name, fn in (
        ("xtuner_lite", lambda: run_ours(opts.file, tokenizer, opts.max_length)),
        ("trl", lambda: run_trl(opts.file, tokenizer, trainer, args)),
    ):
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            rows, tokens = fn()
            times.append(time.perf_counter() - start)
        results[name] = {"seconds": statistics.median(times), "rows": rows, "tokens": tokens}
    ours, theirs = results["xtuner_lite"], results["trl"]
    print(f"file: {opts.file}  max_length: {opts.max_length}  repeats: {opts.repeats} (median)")
    print(f"{'':12s} {'seconds':>8s} {'rows':>6s} {'tokens':>8s} {'efficiency':>10s}")
    for name, r in results.items():
        eff = r["tokens"] / (r["rows"] * opts.max_length)
        print(f"{name:12s} {r['seconds']:8.2f} {r['rows']:6d} {r['tokens']:8d} {eff:10.1%}")
    ratio = theirs["seconds"] / ours["seconds"]
    print(f"speed-up (trl seconds / xtuner_lite seconds): {ratio:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
