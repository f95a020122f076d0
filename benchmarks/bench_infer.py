"""Generation throughput: the bundled engine vs transformers.generate, same model and prompts.

16 chat prompts × 128 new tokens, greedy, SmolLM2-135M-Instruct on CPU. HF runs once as one
left-padded batch and once prompt by prompt; ours admits all requests and retires each as soon
as it ends. Prints generated tokens/s and the ratios, and checks that the outputs agree. With
``--repeats N`` HF batched and ours run N times alternately (a shared machine's speed drifts
between runs) and the median of the per-pair ratios is printed too.
Run: python benchmarks/bench_infer.py [--prompts 16] [--new-tokens 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from xtuner_lite.data.templates import get_template, stop_token_ids
from xtuner_lite.hub import load_model, load_tokenizer
from xtuner_lite.inference import InferenceEngine, SamplingParams

TOPICS = [
    "the sea",
    "a robot",
    "autumn",
    "coffee",
    "mountains",
    "a lost key",
    "the moon",
    "friendship",
    "rain",
    "a library",
    "trains",
    "a garden",
    "winter",
    "music",
    "bees",
    "a city at night",
]


def hf_generate(model, prompts, stops, new_tokens):
    width = max(map(len, prompts))
    ids = torch.tensor([[stops[0]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=stops[0],
    )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def _rate(result: tuple[float, list[list[int]]]) -> float:
    """Generated tokens per second of a (seconds, outputs) result."""
    seconds, rows = result
    return sum(map(len, rows)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-one-by-one",
        action="store_true",
        help="skip HF prompt by prompt (the slow reference); compare to batched",
    )
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="decode from the plain weights (no oneDNN-packed copy)",
    )
    opts = parser.parse_args()
    tok, model = load_tokenizer(opts.model), load_model(opts.model).eval()
    template = get_template("smollm2" if "smollm2" in opts.model else "auto", tok)
    stops = stop_token_ids(template, tok)
    questions = [
        f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(opts.prompts)
    ]
    prompts = [
        tok(
            template.render_prompt([{"role": "user", "content": q}], tok), add_special_tokens=False
        )["input_ids"]
        for q in questions
    ]
    engine = InferenceEngine(model, tok, pack_weights=False if opts.no_pack else None)
    params = SamplingParams(max_new_tokens=opts.new_tokens, stop_token_ids=stops)

    def timed(run):
        start = time.perf_counter()
        rows = run()
        return time.perf_counter() - start, rows

    results, pairs = {}, []
    with torch.no_grad():
        if not opts.no_one_by_one:
            results["hf one-by-one"] = timed(
                lambda: [hf_generate(model, [p], stops, opts.new_tokens)[0] for p in prompts]
            )
        for _ in range(opts.repeats):
            results["hf batched"] = timed(
                lambda: hf_generate(model, prompts, stops, opts.new_tokens)
            )
            results["xtuner_lite"] = timed(
                lambda: [r.output_ids for r in engine.generate(prompts, params)]
            )
            pairs.append(_rate(results["xtuner_lite"]) / _rate(results["hf batched"]))
    ours = results["xtuner_lite"][1]
    single = results["hf one-by-one"][1] if "hf one-by-one" in results else None
    print(
        f"{opts.model}, {opts.prompts} prompts × ≤{opts.new_tokens} new tokens, greedy, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'':14s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    speed = {}
    for name, (seconds, rows) in results.items():
        speed[name] = _rate((seconds, rows))
        print(f"{name:14s} {sum(map(len, rows)):7d} {seconds:8.1f} {speed[name]:9.1f}")
    print(f"ours vs HF batched: {speed['xtuner_lite'] / speed['hf batched']:.2f}x (last run)")
    if single is not None:
        print(f"ours vs HF one-by-one: {speed['xtuner_lite'] / speed['hf one-by-one']:.2f}x")
    if len(pairs) > 1:
        print(
            f"ours vs HF batched over {len(pairs)} alternating runs: "
            f"{', '.join(f'{r:.2f}' for r in pairs)}; median {statistics.median(pairs):.2f}x"
        )
    decoder = engine.runner.decoder
    print(
        "ours decodes with "
        + (
            f"FastDecoder, {decoder.packed_bytes / 2**20:.0f} MiB of "
            "oneDNN-packed weights beside the model's"
            if decoder is not None
            else f"the model's forward ({engine.fallback_reason})"
        )
    )
    reference, name = (
        (single, "HF one-by-one")
        if single is not None
        else (results["hf batched"][1], "HF batched")
    )
    same = sum(a == b for a, b in zip(ours, reference))
    print(f"outputs identical to {name}: {same}/{len(ours)}")


if __name__ == "__main__":
    main()
