"""The floor of a decode step on this CPU: the time of its matrix products alone.

One decode step of a Llama-family model multiplies ``--rows`` rows by every weight once: per
layer q/k/v fused, o, gate/up fused and down (as ``FastDecoder`` runs them), then the LM head.
This times exactly those products over distinct random weights of the model's shapes (so each
is read from memory, as in a real step), packed for our kernel (``inference/skinny.py``, fp32,
where it runs), oneDNN-packed, and as plain ``F.linear``, in fp32 and bf16, and prints each
beside the read-bandwidth bound (weights' bytes / ``bench_infer``'s probe). A whole decode step
cannot take less than its products: ``bench_infer``'s step time minus this is everything else
(attention, norms, rotary, Python).

    python benchmarks/decode_products.py [--model smollm2-135m-instruct] [--rows 16]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from bench_infer import bandwidth_gb_s
from sides import cpu_name
from transformers import AutoConfig

from xtuner_lite.hub import resolve_model_path
from xtuner_lite.inference import skinny


def step_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every product of one decode step: per layer fused q/k/v, o, fused
    gate/up, down; then the head."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
    return layer * config.num_hidden_layers + [(config.vocab_size, h)]


def timed(products, repeats: int) -> float:
    """Median seconds of one pass over ``products`` (callables)."""
    times = []
    for _ in range(repeats + 2):  # two warm-up passes
        start = time.perf_counter()
        for product in products:
            product()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    config = AutoConfig.from_pretrained(resolve_model_path(opts.model))
    shapes = step_shapes(config)
    bandwidth = bandwidth_gb_s()
    print(f"{opts.model}: {len(shapes)} products a step, {opts.rows} rows, {cpu_name()}, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s")  # fmt: skip
    print(f"{'dtype':8s} {'kernel':8s} {'ms':>7s} {'GB/s':>6s} {'bound ms':>9s}")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        weights = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
        size = sum(w.numel() * w.element_size() for w in weights)
        inputs = {i: torch.randn(opts.rows, i, dtype=dtype) for _, i in shapes}
        kernels = {"ours": [], "oneDNN": [], "F.linear": []}
        for w in weights:
            x = inputs[w.shape[1]]
            if skinny.supports(w):
                product = skinny.product_for(w)
                kernels["ours"].append(functools.partial(product, x, skinny.pack(w), None))
            packed = torch.ops.mkldnn._reorder_linear_weight(w, opts.rows)
            kernels["oneDNN"].append(functools.partial(
                torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""))  # fmt: skip
            kernels["F.linear"].append(functools.partial(F.linear, x, w))
        for name, products in kernels.items():
            if len(products) < len(weights):
                continue  # ours: not for this dtype (or not on this machine)
            seconds = timed(products, opts.repeats)
            print(f"{str(dtype)[6:]:8s} {name:8s} {seconds * 1e3:7.1f} {size / seconds / 1e9:6.1f} "
                  f"{size / bandwidth / 1e6:9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
