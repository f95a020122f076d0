"""The whole data chain on CPU: prepare → incremental pretraining on cleaned vs raw text →
held-out perplexity.

Raw training text: the planted file of ``dataprep_planted.py`` (real C4 and Wikipedia text with
exact and near duplicates, Chinese documents, PII, junk, block-listed words and pasted GSM8K
questions). Held-out text: the English C4 / Wikipedia documents the plant does not use. SmolLM2
is trained with LoRA (``map_fn="pretrain"``, every token trained) for the same number of steps
on the raw file and on the prepared shards, and each adapter's perplexity on the held-out text
is compared with the untrained model's (``xtuner eval``'s perplexity task).

    python benchmarks/dataprep_chain.py --max-iters 30
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def planted_module():
    spec = importlib.util.spec_from_file_location("dataprep_planted", HERE / "dataprep_planted.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heldout(planted, work: Path, seed: int) -> Path:
    """English documents of the sources that the plant does not contain."""
    english, _, _ = planted._sources(planted.SHARED)
    used = {json.loads(x)["text"] for x in (work / "planted.jsonl").open()}
    rest = [t for t in english if t not in used and len(t.split()) >= 50]
    rest = random.Random(seed).sample(rest, min(len(rest), 40))  # perplexity is the slow part
    path = work / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rest))
    return path


def pretrain(data: str, work: Path, opts) -> Path:
    from xtuner_lite import train

    options = {
        "train_dataset.data_files": data,
        "train.max_iters": opts.max_iters,
        "train.lr": opts.lr,
        "model.method": "lora",
        "train.save_steps": 10_000,
    }
    return train("smollm2_135m_pretrain_full", work_dir=work, cfg_options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iters", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    from xtuner_lite.dataprep import prepare
    from xtuner_lite.evaluation import run_eval

    planted = planted_module()
    work = Path(tempfile.mkdtemp(prefix="dataprep_chain_"))
    planted.plant(work, seed=opts.seed)
    report = prepare(planted.config(work, workers=2), quiet=True)
    held = heldout(planted, work, opts.seed)
    raw = pretrain(str(work / "planted.jsonl"), work / "raw", opts)
    clean = pretrain(str(work / "prepared" / "data" / "*.jsonl"), work / "clean", opts)
    task = {"name": "heldout_ppl", "kind": "perplexity", "data": str(held), "window": 512}
    results = run_eval(["smollm2-135m-instruct", str(raw), str(clean)], [task], show=False)
    n_held = sum(1 for _ in held.open())
    print(f"\nprepared: {report['documents_in']} documents in, {report['documents_out']} out; "
          f"held-out: {n_held} documents; {opts.max_iters} steps each")  # fmt: skip
    for label, ref in (("untrained", "smollm2-135m-instruct"), ("raw", str(raw)),
                       ("cleaned", str(clean))):  # fmt: skip
        metrics = results[ref]["heldout_ppl"].metrics
        print(f"{label:10s} perplexity {metrics['perplexity']:.3f}  "
              f"bits/byte {metrics.get('bits_per_byte', float('nan')):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
