"""GRPO as an objective: each step samples its own training data (rollouts from the policy),
scores it with the reward functions and trains on it ``num_iterations`` times.

The step (``engine/step.py``) is the same as for SFT and preferences: :meth:`prepare` turns the
loader's prompts into micro-batches, then each update normalizes the summed loss by the global
count of :meth:`units` (completions, or completion tokens for DAPO's aggregation).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from xtuner_lite.alignment.reference import Reference
from xtuner_lite.data.templates import stop_token_ids
from xtuner_lite.engine.objectives import Objective
from xtuner_lite.errors import XtunerError
from xtuner_lite.inference.sampling import SamplingParams
from xtuner_lite.model.attention import can_branch
from xtuner_lite.model.logprobs import token_logps, token_owner
from xtuner_lite.rl.losses import AGGREGATIONS, SCALES, group_advantages, grpo_loss, loss_units
from xtuner_lite.rl.rewards import Reward, build_rewards, score
from xtuner_lite.rl.rollout import (
    Completion,
    completion_batch,
    sample_completions,
)

EQUAL_GROUPS = ("keep", "skip")
SAMPLES_FILE = "samples.jsonl"


def _problems(
    num_generations: int,
    epsilon: float,
    epsilon_high: float | None,
    num_iterations: int,
    aggregation: str,
    scale_rewards: str,
    beta: float,
    equal_groups: str,
    temperature: float,
) -> list[str]:
    checks = [
        (num_generations >= 2, f"num_generations must be >= 2 (a group), got {num_generations}"),
        (0 < epsilon < 1, f"epsilon must be in (0, 1), got {epsilon}"),
        (epsilon_high is None or epsilon_high > 0, f"epsilon_high must be > 0: {epsilon_high}"),
        (num_iterations >= 1, f"num_iterations must be >= 1, got {num_iterations}"),
        (aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
        (scale_rewards in SCALES, f"scale_rewards must be one of {SCALES}"),
        (beta >= 0, f"beta must be >= 0, got {beta}"),
        (equal_groups in EQUAL_GROUPS, f"equal_groups must be one of {EQUAL_GROUPS}"),
        (temperature > 0, "temperature must be > 0 (a group of greedy copies learns nothing)"),
    ]
    return [f"objective.{message}" for ok, message in checks if not ok]


class GRPOObjective(Objective):
    """Group relative policy optimization, with DAPO's clip-higher and token aggregation and
    Dr. GRPO's constant normalizer as settings; ``beta`` > 0 adds the KL to the reference (the
    base under a disabled adapter for LoRA)."""

    name = "grpo"
    samples_own_data = True

    def __init__(
        self,
        rewards: list[Any] = (),
        num_generations: int = 4,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        aggregation: str = "grpo",
        scale_rewards: str = "group",
        beta: float = 0.0,
        equal_groups: str = "keep",
        max_batch_size: int = 64,
        micro_batch_size: int = 8,
        samples_per_step: int = 4,
        chunk_size: int = 1024,
        share_prompts: bool = True,
    ):
        problems = _problems(
            num_generations, epsilon, epsilon_high, num_iterations,
            aggregation, scale_rewards, beta, equal_groups, temperature,
        )  # fmt: skip
        if problems:
            raise XtunerError("; ".join(problems))
        self.rewards: list[Reward] = build_rewards(list(rewards))
        self.num_generations, self.updates = num_generations, num_iterations
        self.params = SamplingParams(max_new_tokens, temperature, top_p, top_k).validate()
        self.epsilon, self.epsilon_high = epsilon, epsilon_high
        self.aggregation, self.scale_rewards = aggregation, scale_rewards
        self.beta, self.equal_groups = beta, equal_groups
        self.max_batch_size, self.samples_per_step = max_batch_size, samples_per_step
        # completions per forward/backward: the loss is normalized over the global batch, so
        # splitting changes memory, not the result
        self.micro_batch_size = max(1, micro_batch_size)
        self.chunk_size = chunk_size
        # a group's prompt run once in the updates, its completions attending to it as
        # branches (same log-probs as a row per completion); off: a padded row each
        self.share_prompts = share_prompts
        self.unit = "completion tokens" if aggregation == "dapo" else "completions"
        self.reference = Reference(chunk_size=chunk_size)
        self.tokenizer = None
        self.seed, self.rank, self.pad = 0, 0, 0
        self.samples_path: Path | None = None
        self._metrics: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    # ------------------------------------------------------------------ set-up
    def bind(self, tokenizer, template, seed: int, rank: int, work_dir: Path | None) -> None:
        """What rollouts need from the run: the tokenizer and the template's stop tokens."""
        self.tokenizer, self.seed, self.rank = tokenizer, seed, rank
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id
        self.params.stop_token_ids = stop_token_ids(template, tokenizer)
        self.params.stop_words = template.stop_words(tokenizer)
        if work_dir is not None and rank == 0:
            self.samples_path = Path(work_dir) / SAMPLES_FILE

    # ------------------------------------------------------------------ rollouts
    def prepare(self, llm: torch.nn.Module, data: list[dict], step: int) -> list[dict]:
        """Sample, score and batch one step's completions (``micro_batch_size`` a batch)."""
        if self.tokenizer is None:
            raise RuntimeError("GRPOObjective.bind() was not called")
        prompts = [p for micro in data for p in micro["prompts"]]
        indices = [i for micro in data for i in micro["indices"]]
        completions, stats = sample_completions(
            llm, self.tokenizer, prompts, indices, self.params, self.num_generations,
            (self.seed, step), self.max_batch_size,
        )  # fmt: skip
        rewards = self._score(completions)
        advantages, equal = group_advantages(rewards, self.num_generations, self.scale_rewards)
        keep = torch.ones(len(completions))
        if self.equal_groups == "skip":
            keep = (~equal).float().repeat_interleave(self.num_generations)
        self._record_rollouts(completions, rewards, equal, stats)
        self._write_samples(completions, rewards, advantages, step)
        share = self.share_prompts and can_branch(llm)
        batches = []
        for start in range(0, len(completions), self.micro_batch_size):
            part = slice(start, start + self.micro_batch_size)
            batches.append(
                completion_batch(
                    completions[part], advantages[part], keep[part], self.pad, share_prompts=share
                )
            )
        if all(float(b["weights"].sum()) == 0 for b in batches):
            batches = batches[:1]  # all skipped: one batch weighted 0, so every rank steps
        self._old_and_reference(llm, batches)
        return batches

    def _score(self, completions: list[Completion]) -> torch.Tensor:
        values = [score(self.rewards, c.prompt.row, c.text, c.prompt.where) for c in completions]
        per_reward = torch.tensor(values, dtype=torch.float32).reshape(len(completions), -1)
        weights = torch.tensor([r.weight for r in self.rewards])
        for i, reward in enumerate(self.rewards):
            column = per_reward[:, i]
            self._add(f"reward/{reward.name}", column)
            self._add(f"reward/{reward.name}_std", column.std().reshape(1))
            if bool(((column == 0) | (column == 1)).all()):
                self._add(f"accuracy/{reward.name}", column)
        return per_reward @ weights

    @torch.no_grad()
    def _old_and_reference(self, llm: torch.nn.Module, batches: list[dict]) -> None:
        """The sampling policy's log-probs (needed when the batch is trained on more than once)
        and the reference's (when ``beta``), each a forward without gradient."""
        was_training = llm.training
        llm.eval()  # the log-probs of the policy that sampled: no dropout
        try:
            for batch in batches:
                if self.updates > 1:
                    batch["old_logps"] = token_logps(llm, batch, self.chunk_size)[0]
                if self.beta:
                    with self.reference.disabled(llm):
                        model = self.reference.model or llm
                        batch["ref_logps"] = token_logps(model, batch, self.chunk_size)[0]
        finally:
            llm.train(was_training)

    # ------------------------------------------------------------------ the loss
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_units(self.aggregation, batch["weights"], token_owner(batch))

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, owner = token_logps(llm, batch, self.chunk_size)
        old = batch.get("old_logps")
        result = grpo_loss(
            logps,
            logps.detach() if old is None else old,
            batch["advantages"],
            owner,
            int(batch["num_sequences"]),
            self.epsilon,
            self.epsilon_high,
            self.aggregation,
            self.params.max_new_tokens,
            self.beta,
            batch.get("ref_logps"),
            batch["weights"],
        )
        self._add("clip_ratio/low", result.clipped_low)
        self._add("clip_ratio/high", result.clipped_high)
        if result.kl is not None:
            self._add("kl", result.kl)
        return result.total

    # ------------------------------------------------------------------ logging
    def _add(self, name: str, values: torch.Tensor) -> None:
        self._metrics[name][0] += float(values.sum())
        self._metrics[name][1] += values.numel()

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        metrics = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics.clear()
        return metrics

    def _record_rollouts(self, completions, rewards, equal, stats) -> None:
        lengths = torch.tensor([float(len(c.ids)) for c in completions])
        self._add("reward", rewards)
        self._add("completion/length", lengths)
        self._add("completion/length_max", lengths.max().reshape(1))
        self._add("completion/clipped", torch.tensor([float(c.truncated) for c in completions]))
        self._add("groups/all_equal", equal.float())
        self._add("rollout/tokens_per_s", torch.tensor([stats.tokens / max(stats.seconds, 1e-9)]))

    def _write_samples(self, completions, rewards, advantages, step: int) -> None:
        """The first ``samples_per_step`` completions of the step, with their rewards."""
        if self.samples_path is None or not self.samples_per_step:
            return
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with self.samples_path.open("a", encoding="utf-8") as f:
            for c, r, a in list(zip(completions, rewards, advantages))[: self.samples_per_step]:
                f.write(json.dumps({"step": step, "prompt": c.prompt.where, "completion": c.text,
                                    "reward": round(float(r), 4), "advantage": round(float(a), 4),
                                    "truncated": c.truncated, "time": time.time()},
                                   ensure_ascii=False) + "\n")  # fmt: skip


__all__ = ["GRPOObjective"]
