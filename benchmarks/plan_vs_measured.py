"""The memory planner against what CPU can measure, on the real SmolLM2-135M-Instruct.

For LoRA / QLoRA (bf16 base) and full fine-tuning (fp32), with and without gradient
checkpointing, one 512-token packed row: planned vs measured (1) weight storage, (2) gradients
+ AdamW state after a step, (3) the activations autograd keeps for backward (saved-tensor hooks).
What CPU cannot show (the CUDA allocator, the recomputed layer's transient peak) needs a GPU:
compare against torch.cuda.max_memory_allocated there.
Run: python benchmarks/plan_vs_measured.py [--tokens 512]
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from xtuner_lite.commands.plan import MiB, PlanSettings, Shape, measure_saved_bytes, plan_memory
from xtuner_lite.model import build_model, skip_adapter_input_casts
from xtuner_lite.model.forward import loss_sum

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    n = args.tokens
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 49152, (1, n)),
        "labels": torch.randint(0, 49152, (1, n)),
        "position_ids": torch.arange(n)[None],
        "cu_seqlens": torch.tensor([0, n], dtype=torch.int32),
    }
    print(
        "| method | checkpointing | weights planned / measured | grads+AdamW planned / "
        "measured | activations planned / measured | error |"
    )
    print("|---|---|---|---|---|---|")
    for method, base in (("lora", "bf16"), ("qlora", "bf16"), ("full", "fp32")):
        for ckpt in (False, True):
            model = build_model(
                MODEL,
                method=method,
                dtype=base,
                gradient_checkpointing=ckpt,
                lora=dict(r=16, alpha=32, dropout=0.05),
            )
            model.train()
            skip_adapter_input_casts(model)
            shape = Shape.from_config(model.config)
            plan = plan_memory(
                shape,
                PlanSettings(
                    method=method,
                    base_dtype=base,
                    lora_r=16,
                    max_length=n,
                    gradient_checkpointing=ckpt,
                    cpu=True,
                    optimizer="adamw",
                ),
            )
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()
            }
            weights = sum(storages.values())
            saved = measure_saved_bytes(model, batch)
            trained = [p for p in model.parameters() if p.requires_grad]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = loss_sum(model, batch)
            loss.backward()
            optimizer = torch.optim.AdamW(trained)
            optimizer.step()
            state = sum(p.grad.numel() * p.grad.element_size() for p in trained) + sum(
                t.numel() * t.element_size()
                for s in optimizer.state.values()
                for t in s.values()
                if t.dim() > 0
            )
            planned_w = plan.get("weights") + plan.get("adapter")
            planned_s = plan.get("gradients") + plan.get("optimizer")
            planned_a = (
                plan.get("activations") + plan.get("final norm") + plan.get("head gradient")
            )  # (full: computed with the loss, kept)
            print(
                f"| {method} | {'on' if ckpt else 'off'} | {planned_w / MiB:.1f} / "
                f"{weights / MiB:.1f} MiB | {planned_s / MiB:.1f} / "
                f"{state / MiB:.1f} MiB | {planned_a / MiB:.1f} / "
                f"{saved / MiB:.1f} MiB | {planned_a / saved - 1:+.1%} |",
                flush=True,
            )
            del model, optimizer


if __name__ == "__main__":
    main()
