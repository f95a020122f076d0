"""Generation throughput: the bundled engine vs transformers.generate, same model and prompts.

16 chat prompts × 128 new tokens, greedy, SmolLM2-135M-Instruct on CPU. HF runs once as one
left-padded batch and once prompt by prompt; ours admits all requests and retires each as soon
as it ends. Prints generated tokens/s and the ratios, and checks that the outputs agree. With
``--repeats N`` HF batched and ours run N times alternately (a shared machine's speed drifts
between runs) and the median of the per-pair ratios is printed too.
With ``--dtype bfloat16`` both sides run the model in bf16 (on a CPU with native bf16, AMX or
AVX512-bf16) and ours is also run in fp32 to count how many greedy tokens bf16 keeps. A probe of
the memory bandwidth prints the bound a decode step cannot beat (every weight read once per
step, all prompts in the batch) and ours as a share of it.
``--llama-cpp PYTHON`` adds llama.cpp as a side: our GGUF export of the same model (f32, or
bf16 with ``--dtype bfloat16``) decoded by llama-cpp-python in that Python's environment
(``llama_cpp_side.py``), prompt by prompt, in its own process after each HF/ours pair.
Run: python benchmarks/bench_infer.py [--prompts 16] [--new-tokens 128] [--repeats 1]
         [--dtype float32|bfloat16] [--llama-cpp /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

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


def bandwidth_gb_s() -> float:
    """Memory read bandwidth of this process's threads: the best of five sums of 1 GiB."""
    data = torch.ones(2**28)  # 1 GiB of fp32
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (a tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[int, int]:
    """(tokens equal at the same position, tokens in the reference)."""
    equal = sum(a == b for x, y in zip(ours, reference) for a, b in zip(x, y))
    return equal, sum(map(len, reference))


def export_gguf_for(model_name: str, dtype: str, folder: Path) -> Path:
    """Our GGUF export of the model in the benchmark's dtype."""
    from xtuner_lite.commands.export import export_gguf
    from xtuner_lite.hub import resolve_model_path

    out = folder / f"model-{dtype}.gguf"
    gguf_dtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    return export_gguf(str(resolve_model_path(model_name)), str(out), dtype=gguf_dtype)


def llama_cpp_run(python: str, gguf: Path, prompts, new_tokens: int) -> tuple[float, list]:
    """(seconds, outputs) of llama-cpp-python greedy-decoding ``prompts``."""
    job = {"gguf": str(gguf), "prompts": prompts, "new_tokens": new_tokens,
           "threads": torch.get_num_threads()}  # fmt: skip
    side = Path(__file__).with_name("llama_cpp_side.py")
    done = subprocess.run([python, str(side)], input=json.dumps(job), capture_output=True,
                          text=True)  # fmt: skip
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        raise SystemExit(f"llama.cpp side failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[0][7:])
    return result["seconds"], result["outputs"]


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
        help="decode from the plain weights (no packed copy)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--llama-cpp", metavar="PYTHON", help="a Python with llama-cpp-python")
    opts = parser.parse_args()
    tok = load_tokenizer(opts.model)
    model = load_model(opts.model, dtype=opts.dtype).eval()
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

    results, pairs, versus_llama = {}, [], []
    scratch = tempfile.TemporaryDirectory()
    gguf = export_gguf_for(opts.model, opts.dtype, Path(scratch.name)) if opts.llama_cpp else None
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
            if opts.llama_cpp:
                results["llama.cpp"] = llama_cpp_run(opts.llama_cpp, gguf, prompts,
                                                     opts.new_tokens)  # fmt: skip
                versus_llama.append(_rate(results["xtuner_lite"]) / _rate(results["llama.cpp"]))
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
            f"FastDecoder, {decoder.packed_bytes / 2**20:.0f} MiB of packed weights beside the "
            f"model's (products by kernel: {decoder.packed_by})"
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
    if versus_llama:
        print(f"ours vs llama.cpp ({gguf.name}, prompt by prompt) over {len(versus_llama)} runs: "
              f"{', '.join(f'{r:.2f}' for r in versus_llama)}; median "
              f"{statistics.median(versus_llama):.2f}x")  # fmt: skip
        equal, total = agreement(results["llama.cpp"][1], ours)
        print(f"llama.cpp greedy tokens equal to ours at the same position: {equal}/{total}")
    bound = len(prompts) * bandwidth_gb_s() * 1e9 / weight_bytes(model)
    print(
        f"bandwidth bound ({len(prompts)} rows a step, {weight_bytes(model) / 2**20:.0f} MiB "
        f"of weights): {bound:.0f} tokens/s; ours achieves {speed['xtuner_lite'] / bound:.0%}"
    )
    if opts.dtype != "float32":
        fp32 = load_model(opts.model, dtype="float32").eval()
        exact = [r.output_ids for r in InferenceEngine(fp32, tok).generate(prompts, params)]
        equal, total = agreement(ours, exact)
        rows = sum(a == b for a, b in zip(ours, exact))
        print(
            f"greedy agreement with fp32: {equal}/{total} tokens at the same position, "
            f"{rows}/{len(ours)} outputs identical"
        )


if __name__ == "__main__":
    main()
