"""One long-row SFT step of SmolLM2-135M-Instruct (LoRA, gradient checkpointing, fp32) with
sequence parallelism 1 (one process) and 2 (two gloo processes sharing the row's tokens): peak
RSS per process, the part of it the step added over the loaded model, and the loss (equal).

    python benchmarks/bench_sequence_parallel.py [--tokens 16384] [--sample 2048]

The row is packed from wiki text in ../shared/data/raw, ``--sample`` tokens per document.
Each side runs in its own processes (``torch.distributed.run``), one after the other. Buffers
of 1 MiB and more are mmapped, so a freed tensor leaves the resident set at once and the peak
follows the live tensors (with glibc's default threshold, freed layer-sized buffers stay in its
arenas and the peak is the allocator's history as much as the step's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from xtuner_lite.data.dataset import collate_packed
from xtuner_lite.hub import load_tokenizer
from xtuner_lite.model import build_model
from xtuner_lite.model.forward import loss_sum
from xtuner_lite.model.sequence_parallel import new_sequence_parallel, set_sequence_parallel
from xtuner_lite.training.memory import cap_mmap_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides import cpu_name, peak_rss_mib, run_side  # noqa: E402

MODEL = "smollm2-135m-instruct"
WIKI = Path(__file__).resolve().parents[2] / "shared/data/raw/llamafactory_wiki_demo.txt"


def packed_row(tokens: int, sample: int) -> dict[str, torch.Tensor]:
    """One row of ``tokens`` wiki tokens, documents of ``sample`` tokens, every token trained."""
    ids = load_tokenizer(MODEL)(WIKI.read_text()[: tokens * 8])["input_ids"][:tokens]
    if len(ids) < tokens:
        sys.exit(f"{WIKI} holds fewer than {tokens} tokens")
    samples = [ids[i : i + sample] for i in range(0, tokens, sample)]
    ends = [0]
    for s in samples:
        ends.append(ends[-1] + len(s))
    row = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": [p for s in samples for p in range(len(s))],
        "cu_seqlens": ends,
    }
    return collate_packed([row], pad_token_id=0, pad_to_multiple_of=32)


def worker(tokens: int, sample: int) -> None:
    """One side under torch.distributed.run (or alone): load, step, report rank 0's line."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cap_mmap_threshold(1 << 20)  # freed buffers go back to the OS: RSS follows live tensors
    if size > 1:
        dist.init_process_group("gloo")
        set_sequence_parallel(new_sequence_parallel(size))
    batch = packed_row(tokens, sample)
    model = build_model(MODEL, method="lora", lora={"r": 16, "alpha": 32, "dropout": 0.0},
                        dtype="fp32", gradient_checkpointing=True)  # fmt: skip
    model.train()
    loaded = peak_rss_mib()
    start = time.perf_counter()
    loss, count = loss_sum(model, batch)
    forward = peak_rss_mib()
    (loss / count).backward()
    seconds = time.perf_counter() - start
    result = {"sp": size, "tokens": tokens, "loss": float(loss) / count,
              "seconds": seconds, "loaded_rss_mib": loaded, "forward_rss_mib": forward,
              "peak_rss_mib": peak_rss_mib()}  # fmt: skip
    results = [result]
    if size > 1:
        results = [None] * size
        dist.all_gather_object(results, result)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(results))


def side(sp: int, tokens: int, sample: int) -> list[dict]:
    script = [__file__, "--worker", "--tokens", str(tokens), "--sample", str(sample)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // sp)),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, *script]
    if sp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}",
               "--master_port=29533", *script]  # fmt: skip
    return run_side(cmd, f"sp={sp}", env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sample", type=int, default=2048)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.tokens, args.sample)
        return
    print(f"# {cpu_name()}; SmolLM2-135M LoRA r=16, fp32, gradient checkpointing; one row of "
          f"{args.tokens} tokens, documents of {args.sample}")  # fmt: skip
    rows = {sp: side(sp, args.tokens, args.sample) for sp in (1, 2)}
    for sp, ranks in rows.items():
        for rank, r in enumerate(ranks):
            added = r["peak_rss_mib"] - r["loaded_rss_mib"]
            print(f"sp={sp} rank {rank}: peak RSS {r['peak_rss_mib']:.0f} MiB (after forward "
                  f"{r['forward_rss_mib']:.0f}), step added {added:.0f} MiB over the loaded "
                  f"model, {r['seconds']:.1f} s, loss {r['loss']:.6f}")  # fmt: skip
    one, two = rows[1][0], rows[2]
    ratio = max(r["peak_rss_mib"] - r["loaded_rss_mib"] for r in two) / (
        one["peak_rss_mib"] - one["loaded_rss_mib"]
    )
    print(f"step memory per process, sp=2 / sp=1: {ratio:.2f}; "
          f"loss difference {abs(two[0]['loss'] - one['loss']):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
