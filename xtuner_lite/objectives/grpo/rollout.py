"""Rollouts: G completions per prompt from the current policy through the bundled engine, and
the packed training batches built from them.

The engine runs the very module being trained (no second model, no reload, no weight sync),
under ``no_grad`` with its own KV cache and continuous batching. Where it packs the weights
(CPU), a LoRA adapter is merged into the packed copy for the rollout's length. Each
completion is seeded from (run seed, step, the prompt's dataset index, sample): a resumed run
draws the same completions as the run it continues, and a prompt draws the same completions on
whichever rank of a data-parallel run it lands.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass

import torch

from xtuner_lite.data.dataset import collate_preference
from xtuner_lite.data.dataset import share_prompts as share_prompts_of
from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.inference.engine import InferenceEngine
from xtuner_lite.inference.sampling import MAX_SEED, SamplingParams
from xtuner_lite.objectives.grpo.prompts import Prompt


@dataclass
class Completion:
    prompt: Prompt
    group: int  # the prompt's position in the step (completions of one group share it)
    ids: list[int]  # the completion's tokens, its stop token included (it is trained)
    text: str
    truncated: bool  # ended by max_new_tokens, not by a stop token or word


@dataclass
class RolloutStats:
    seconds: float
    tokens: int  # generated tokens


def rollout_seed(seed: int, step: int, index: int, sample: int) -> int:
    key = f"{seed}:{step}:{index}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % MAX_SEED


def sample_completions(
    llm: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    indices: list[int],
    params: SamplingParams,
    num_generations: int,
    seed_and_step: tuple[int, int],
    max_batch_size: int = 64,
) -> tuple[list[Completion], RolloutStats]:
    """``num_generations`` completions of each prompt, grouped in prompt order; ``indices``:
    each prompt's index in the dataset (with the run seed and step, it seeds the sampling)."""
    was_training = llm.training
    start = time.perf_counter()
    try:
        # the adapter does not change during a rollout: decode with it merged into the packed
        # weights (the engine is built afresh for every rollout)
        engine = InferenceEngine(
            llm, tokenizer, max_batch_size=max_batch_size, merge_adapters=True, cache_outputs=False
        )
        requests = []
        for group, (prompt, index) in enumerate(zip(prompts, indices)):
            for sample in range(num_generations):
                seed = rollout_seed(*seed_and_step, index, sample)
                own = SamplingParams(**{**vars(params), "seed": seed})
                requests.append((group, prompt, engine.add_request(prompt.ids, own)))
        while engine.has_work:
            engine.step()
    finally:
        llm.train(was_training)
    completions = []
    for group, prompt, request in requests:
        if request.finish_reason == "error":
            raise RuntimeError(f"generation failed for prompt {prompt.where}: {request.error}")
        ids = list(request.output_ids)
        if request.stop_token is not None:
            ids.append(request.stop_token)
        truncated = request.finish_reason == "length"
        completions.append(Completion(prompt, group, ids, request.text, truncated))
    generated = sum(len(r.output_ids) for _, _, r in requests)
    return completions, RolloutStats(time.perf_counter() - start, generated)


def _rows(completions: list[Completion]) -> list[dict[str, list[int]]]:
    """A row per completion: its prompt + completion, the completion trained."""
    rows = []
    for c in completions:
        ids = c.prompt.ids + c.ids
        rows.append(
            {
                "input_ids": ids,
                "labels": [IGNORE_INDEX] * len(c.prompt.ids) + c.ids,
                "position_ids": list(range(len(ids))),
                "cu_seqlens": [0, len(ids)],
                "unit_flags": [],
            }
        )
    return rows


def completion_batch(
    completions: list[Completion],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    pad: int,
    pad_to_multiple_of: int = 32,
    share_prompts: bool = False,
) -> dict[str, torch.Tensor]:
    """One micro-batch: a row per completion (prompt + completion, the completion trained),
    each completion's advantage and weight (0: kept only so every rank runs a step). Widths
    are rounded up as the SFT loader's are: on CPU every new width makes oneDNN build and keep
    another set of kernels, and completion lengths change every step.
    ``share_prompts``: one row instead, each prompt run once (``data.dataset.share_prompts``):
    each completion's log-probs are those of its own row, while a group of G costs one prompt,
    not G."""
    rows = _rows(completions)
    if not share_prompts:
        batch = collate_preference(rows, pad, pad_to_multiple_of)
    else:
        columns = ("input_ids", "labels", "position_ids")
        row = {key: [x for r in rows for x in r[key]] for key in columns}
        row["cu_seqlens"] = [0, *itertools.accumulate(len(r["input_ids"]) for r in rows)]
        row["unit_flags"] = []
        batch = share_prompts_of(collate_preference([row], pad), pad, pad_to_multiple_of)
    batch["advantages"] = advantages.float()
    batch["weights"] = weights.float()
    return batch


__all__ = [
    "Completion",
    "RolloutStats",
    "completion_batch",
    "rollout_seed",
    "sample_completions",
]
