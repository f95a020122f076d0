"""GRPO as an objective: each step samples its own training data (rollouts from the policy),
scores it with the reward functions and trains on it ``num_iterations`` times.

The step (``engine/step.py``) is the same as for SFT and preferences: :meth:`prepare` turns the
loader's prompts into micro-batches, then each update normalizes the summed loss by the global
count of :meth:`units` (completions, or completion tokens for DAPO's aggregation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from xtuner_lite.data.templates import stop_token_ids
from xtuner_lite.inference.sampling import SamplingParams
from xtuner_lite.model.attention import can_branch
from xtuner_lite.model.logprobs import token_logps, token_owner
from xtuner_lite.objectives.base import Objective, RunContext, check_settings
from xtuner_lite.objectives.grpo.losses import (
    AGGREGATIONS,
    SCALES,
    group_advantages,
    grpo_loss,
    loss_units,
)
from xtuner_lite.objectives.grpo.prompts import PromptDataset, process_prompt_dataset
from xtuner_lite.objectives.grpo.rewards import Reward, build_rewards, score
from xtuner_lite.objectives.grpo.rollout import (
    Completion,
    completion_batch,
    sample_completions,
)
from xtuner_lite.objectives.reference import Reference

EQUAL_GROUPS = ("keep", "skip")
SAMPLES_FILE = "samples.jsonl"


def _checks(
    num_generations: int,
    epsilon: float,
    epsilon_high: float | None,
    num_iterations: int,
    aggregation: str,
    scale_rewards: str,
    beta: float,
    equal_groups: str,
    temperature: float,
) -> list[tuple[bool, str]]:
    return [
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


class GRPOObjective(Objective):
    """Group relative policy optimization, with DAPO's clip-higher and token aggregation and
    Dr. GRPO's constant normalizer as settings; ``beta`` > 0 adds the KL to the reference (the
    base under a disabled adapter for LoRA)."""

    name = "grpo"
    samples_own_data = True
    data_kind = "prompts"
    reader = staticmethod(process_prompt_dataset)

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
        check_settings(_checks(
            num_generations, epsilon, epsilon_high, num_iterations,
            aggregation, scale_rewards, beta, equal_groups, temperature,
        ))  # fmt: skip
        super().__init__(chunk_size)
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
        # a group's prompt run once in the updates, its completions attending to it as
        # branches (same log-probs as a row per completion); off: a padded row each
        self.share_prompts = share_prompts
        self.unit = "completion tokens" if aggregation == "dapo" else "completions"
        self.reference = Reference(chunk_size=chunk_size)
        self.tokenizer = None
        self.seed, self.rank, self.pad = 0, 0, 0
        self.samples_path: Path | None = None

    # ------------------------------------------------------------------ before the run
    def engine_problem(
        self, deepspeed: Any, fsdp: bool, sequence_parallel_size: int = 1
    ) -> str | None:
        if sequence_parallel_size > 1:
            return (
                "objective grpo weights each completion token by its advantage on whole rows: "
                "train.sequence_parallel_size must be 1"
            )
        if not (deepspeed or fsdp):
            return None
        return (
            "objective grpo samples from the model it trains: it runs on one process or DDP, "
            "not on DeepSpeed or FSDP2 (whose sharded weights the sampler cannot read)"
        )

    def plan_settings(self, method: str, data_cfg: dict, train_cfg: dict) -> dict[str, Any]:
        """Rows of one completion each, G per prompt; every prompt of a step is sampled at once
        (rollouts), then trained on ``micro_batch_size`` completions at a time."""
        rows = int(train_cfg.get("batch_size", 1)) * int(train_cfg.get("accumulative_counts", 1))
        rows *= self.num_generations
        prompt_length = int(data_cfg.get("max_prompt_length", 512))
        return {
            "max_length": prompt_length + self.params.max_new_tokens,
            "batch_size": 1,
            "sequences_per_item": min(rows, self.micro_batch_size),
            "rollout_rows": min(rows, self.max_batch_size),
            "rollout_new_tokens": self.params.max_new_tokens,
            "nograd_passes": int(self.updates > 1) + int(self.beta > 0),
            "reference": "copy" if self.beta and method == "full" else "none",
        }

    # ------------------------------------------------------------------ set-up
    def load_dataset(self, data_cfg: dict[str, Any], tokenizer: Any, template: Any) -> Any:
        prompts, stats = self.reader(**{**data_cfg, "tokenizer": tokenizer, "template": template})
        return PromptDataset(prompts, stats)

    def report_data(self, dataset: PromptDataset, work_dir: Path) -> None:
        stats = dataset.stats
        skipped = ", ".join(f"{n} {why}" for why, n in stats.skipped.items())
        print(f"{stats.prompts} prompts of {stats.rows} rows" + (f"; skipped: {skipped}" if
              skipped else ""), flush=True)  # fmt: skip

    def set_up(self, run: RunContext) -> None:
        """What rollouts need of the run (the tokenizer, the template's stop tokens) and, with
        ``beta``, the reference."""
        self.bind(run.tokenizer, run.template, run.seed, run.rank, run.work_dir)
        if self.beta:
            self.reference = run.make_reference()

    def bind(self, tokenizer, template, seed: int, rank: int, work_dir: Path | None) -> None:
        """The tokenizer and the template's stop tokens, the seed, and where samples go."""
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
            self.metrics.add(f"reward/{reward.name}", column)
            self.metrics.add(f"reward/{reward.name}_std", column.std().reshape(1))
            if bool(((column == 0) | (column == 1)).all()):
                self.metrics.add(f"accuracy/{reward.name}", column)
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
        self.metrics.add("clip_ratio/low", result.clipped_low)
        self.metrics.add("clip_ratio/high", result.clipped_high)
        if result.kl is not None:
            self.metrics.add("kl", result.kl)
        return result.total

    # ------------------------------------------------------------------ logging
    def _record_rollouts(self, completions, rewards, equal, stats) -> None:
        lengths = torch.tensor([float(len(c.ids)) for c in completions])
        self.metrics.add("reward", rewards)
        self.metrics.add("completion/length", lengths)
        self.metrics.add("completion/length_max", lengths.max().reshape(1))
        clipped = torch.tensor([float(c.truncated) for c in completions])
        self.metrics.add("completion/clipped", clipped)
        self.metrics.add("groups/all_equal", equal.float())
        speed = torch.tensor([stats.tokens / max(stats.seconds, 1e-9)])
        self.metrics.add("rollout/tokens_per_s", speed)

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
