"""Preference objectives: DPO (XTuner's loss family), ORPO, SimPO, KTO and reward models.

Each is an :class:`~xtuner_lite.engine.objectives.Objective`: one forward over a packed batch of
units gives every sequence's log-probability (or a reward model's score), the loss is summed per
unit and the step normalizes it by the units of the global batch, on every engine alike.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from xtuner_lite.alignment.losses import (
    PairLosses,
    check_dpo_settings,
    dpo_losses,
    kto_losses,
    orpo_losses,
    reward_losses,
    simpo_losses,
)
from xtuner_lite.alignment.reference import Reference
from xtuner_lite.data.dataset import share_prompts
from xtuner_lite.engine.objectives import Objective
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.attention import can_branch, runs_segments
from xtuner_lite.model.logprobs import SequenceLogps, sequence_logps, sequence_scores

# rows rounded up as the loader rounds them: a few shapes, a few cached oneDNN kernels
PAD_MULTIPLE = 32


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise XtunerError(f"objective.beta must be > 0, got {beta}")


class PreferenceObjective(Objective):
    """Shared by every preference objective: units are pairs (or unpaired examples), and the
    logged metrics are the implicit rewards, their margin and the preference accuracy."""

    unit = "pairs"
    kind = "pairs"  # the data it trains on: pairs | unpaired
    needs_reference = False
    head = "lm"  # the model's output: lm (log-probabilities) | reward (a scalar score)
    precompute_reference = False  # reference log-probs computed once, cached on disk

    def __init__(self, chunk_size: int = 1024, share_prompts: bool = True):
        self.chunk_size = chunk_size
        self.share_prompts = share_prompts
        self.reference = Reference(chunk_size=chunk_size)
        self._metrics: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_units"])

    def prepare(self, llm: torch.nn.Module, data: list[Any], step: int) -> list[Any]:
        """With ``share_prompts`` each pair's prompt runs once, its two responses branching
        from it (``data.dataset.share_prompts``): the same log-probs for fewer tokens, in one
        row where attention runs segment by segment (no padding)."""
        if not (self.share_prompts and can_branch(llm)):
            return data
        one_row = runs_segments(llm)
        return [share_prompts(b, pad_to_multiple_of=PAD_MULTIPLE, one_row=one_row) for b in data]

    def take_metrics(self) -> dict[str, tuple[float, float]]:
        metrics = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics.clear()
        return metrics

    def _add(self, name: str, values: torch.Tensor) -> None:
        self._metrics[name][0] += float(values.sum())
        self._metrics[name][1] += values.numel()

    def record(self, result: PairLosses) -> None:
        self._add("rewards/chosen", result.chosen_rewards)
        self._add("rewards/rejected", result.rejected_rewards)
        if self.kind == "pairs":  # unpaired examples have no margin to compare
            margin = result.chosen_rewards - result.rejected_rewards
            self._add("rewards/margin", margin)
            self._add("rewards/accuracy", (margin > 0).float())

    def pair_logps(
        self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[SequenceLogps, SequenceLogps]:
        logps = sequence_logps(llm, batch, self.chunk_size)
        return logps.select(slice(0, None, 2)), logps.select(slice(1, None, 2))


class DPOObjective(PreferenceObjective):
    """Direct preference optimization against a reference model (see ``losses.DPO_LOSSES``)."""

    name = "dpo"
    needs_reference = True

    def __init__(
        self,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        chunk_size: int = 1024,
        share_prompts: bool = True,
    ):
        super().__init__(chunk_size, share_prompts)
        problems = check_dpo_settings(loss_type, beta, label_smoothing)
        if problems:
            raise XtunerError("; ".join(problems))
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.pair_logps(llm, batch)
        ref = self.reference.logps(llm, batch)
        result = dpo_losses(
            self.loss_type,
            self.beta,
            self.label_smoothing,
            chosen,
            rejected,
            ref.select(slice(0, None, 2)),
            ref.select(slice(1, None, 2)),
        )
        self.record(result)
        return result.losses.sum()


class ORPOObjective(PreferenceObjective):
    """Odds-ratio preference optimization: SFT on the chosen response plus an odds-ratio
    penalty; no reference model."""

    name = "orpo"

    def __init__(self, beta: float = 0.1, chunk_size: int = 1024, share_prompts: bool = True):
        super().__init__(chunk_size, share_prompts)
        _check_beta(beta)
        self.beta = beta

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        result = orpo_losses(self.beta, *self.pair_logps(llm, batch))
        self.record(result)
        return result.losses.sum()


class SimPOObjective(PreferenceObjective):
    """Simple preference optimization: length-normalized, reference-free, with a margin."""

    name = "simpo"

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        chunk_size: int = 1024,
        share_prompts: bool = True,
    ):
        super().__init__(chunk_size, share_prompts)
        _check_beta(beta)
        self.beta, self.gamma = beta, gamma
        self.label_smoothing, self.sft_weight = label_smoothing, sft_weight

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.pair_logps(llm, batch)
        result = simpo_losses(
            self.beta, self.gamma, self.label_smoothing, self.sft_weight, chosen, rejected
        )
        self.record(result)
        return result.losses.sum()


class KTOObjective(PreferenceObjective):
    """Kahneman–Tversky optimization on unpaired examples labelled desirable or not."""

    name = "kto"
    unit = "examples"
    kind = "unpaired"
    needs_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        chunk_size: int = 1024,
        share_prompts: bool = True,
    ):
        super().__init__(chunk_size, share_prompts)
        _check_beta(beta)
        self.beta = beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy, kl = self.pair_logps(llm, batch)
        ref = self.reference.logps(llm, batch)
        result, kl_value = kto_losses(
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
            policy,
            ref.select(slice(0, None, 2)),
            kl,
            ref.select(slice(1, None, 2)),
            batch["unit_flags"],
        )
        self.record(result)
        self._add("kl", kl_value.reshape(1))
        return result.losses.sum()


class RewardObjective(PreferenceObjective):
    """A reward model: Bradley–Terry on a scalar head over each sequence's last token
    (``margin`` demanded between the scores; ``center_rewards_coefficient`` keeps them near 0)."""

    name = "reward"
    head = "reward"

    def __init__(
        self,
        margin: float = 0.0,
        center_rewards_coefficient: float = 0.0,
        share_prompts: bool = True,
    ):
        super().__init__(share_prompts=share_prompts)
        self.margin, self.center = margin, center_rewards_coefficient

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = sequence_scores(llm, score_head(llm), batch)
        result = reward_losses(scores[0::2], scores[1::2], self.margin, self.center)
        self.record(result)
        return result.losses.sum()


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a sequence-classification model (peft wraps it to train a copy)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.score


OBJECTIVES: dict[str, type[PreferenceObjective]] = {
    "dpo": DPOObjective,
    "orpo": ORPOObjective,
    "simpo": SimPOObjective,
    "kto": KTOObjective,
    "reward": RewardObjective,
}


__all__ = [
    "DPOObjective",
    "KTOObjective",
    "OBJECTIVES",
    "ORPOObjective",
    "PreferenceObjective",
    "RewardObjective",
    "SimPOObjective",
]
