"""Preference objectives: DPO (XTuner's loss family), ORPO, SimPO, KTO and reward models.

Each is an :class:`~xtuner_lite.objectives.base.Objective`: one forward over a packed batch of
units gives every sequence's log-probability (or a reward model's score), the loss is summed per
unit and the step normalizes it by the units of the global batch, on every engine alike.
"""

from __future__ import annotations

from typing import Any

import torch

from xtuner_lite.data.dataset import PreferenceDataset, share_prompts
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.attention import can_branch, runs_segments
from xtuner_lite.model.logprobs import SequenceLogps, sequence_logps, sequence_scores
from xtuner_lite.objectives.base import Objective, RunContext, check_settings
from xtuner_lite.objectives.preference.losses import (
    DPO_LOSSES,
    PairLosses,
    dpo_losses,
    kto_losses,
    orpo_losses,
    reward_losses,
    simpo_losses,
)
from xtuner_lite.objectives.reference import (
    Reference,
    cache_path,
    cached_reference,
    check_reference,
    compute_reference,
    save_reference,
)

# KTO's KL estimate (and DPO kto_pair's) is a mean over the micro-batch, as the KTO paper, XTuner
# and TRL estimate it: accumulation steps see it per micro-batch
KL_PER_MICRO_BATCH = "the KL estimate, a mean over each micro-batch"
# rows rounded up as the loader rounds them: a few shapes, a few cached oneDNN kernels
PAD_MULTIPLE = 32


def _beta(beta: float) -> tuple[bool, str]:
    return beta > 0, f"beta must be > 0, got {beta}"


class PreferenceObjective(Objective):
    """Shared by every preference objective: units are pairs (or unpaired examples), and the
    logged metrics are the implicit rewards, their margin and the preference accuracy."""

    unit = "pairs"
    data_kind = "pairs"  # the data it trains on: pairs | unpaired
    needs_reference = False
    head = "lm"  # the model's output: lm (log-probabilities) | reward (a scalar score)
    reader = staticmethod(process_preference_dataset)
    dataset_class = PreferenceDataset

    def __init__(
        self, chunk_size: int = 1024, share_prompts: bool = True, precompute_reference: bool = False
    ):
        super().__init__(chunk_size)
        self.share_prompts = share_prompts
        self.precompute_reference = precompute_reference  # log-probs computed once, on disk
        self.reference = Reference(chunk_size=chunk_size)

    def data_settings(self, data_cfg: dict[str, Any]) -> dict[str, Any]:
        """The data kind follows the objective (pairs, or KTO's unpaired examples)."""
        kind = data_cfg.get("kind", self.data_kind)
        if kind != self.data_kind:
            raise XtunerError(
                f"train_dataset.kind={kind!r} but objective {self.name!r} trains on "
                f"{self.data_kind!r} data"
            )
        return super().data_settings({**data_cfg, "kind": kind})

    def model_settings(self) -> dict[str, Any]:
        return {} if self.head == "lm" else {"head": self.head}  # trained with the adapter

    def plan_settings(self, method: str, data_cfg: dict, train_cfg: dict) -> dict[str, Any]:
        if not self.needs_reference:
            reference = "none"
        elif self.precompute_reference:
            reference = "cached"
        else:
            reference = "copy" if method == "full" else "live"
        return {
            **super().plan_settings(method, data_cfg, train_cfg),
            "preference": True,
            "reference": reference,
            "reward_head": self.head == "reward",
        }

    def set_up(self, run: RunContext) -> None:
        """The reference: the adapter-disabled model (LoRA, QLoRA) or a frozen copy (full); with
        ``precompute_reference`` its log-probabilities computed once (or read from the cache)
        so that training runs no reference forward."""
        if not self.needs_reference:
            return
        self.reference = run.make_reference()
        if not self.precompute_reference:
            return
        dataset = run.dataset
        path = cache_path(dataset.data, *run.cache_key)
        with run.rank_zero_first():
            totals = cached_reference(path, len(dataset.data.sample_lengths))
            if totals is None:
                totals = self._compute_reference(run, path)
        dataset.reference = totals
        self.reference = Reference(chunk_size=self.chunk_size)  # no copy kept in memory

    def _compute_reference(self, run: RunContext, path) -> torch.Tensor:
        if run.rank == 0:
            print(f"computing reference log-probabilities once (cached in {path})", flush=True)
        llm = run.llm
        device = run.device if run.device != "cuda" else next(llm.parameters()).device
        totals = compute_reference(
            llm.to(device), self.reference, run.dataset, run.pad, run.batch_size, str(device),
            run.autocast, lambda batch: self.prepare(llm, [batch], 0)[0],
        )  # fmt: skip
        check_reference(totals, len(totals), "the reference model's log-probabilities")
        if run.rank == 0:
            save_reference(path, totals)
        return totals

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

    def record(self, result: PairLosses) -> None:
        self.metrics.add("rewards/chosen", result.chosen_rewards)
        self.metrics.add("rewards/rejected", result.rejected_rewards)
        if self.data_kind == "pairs":  # unpaired examples have no margin to compare
            margin = result.chosen_rewards - result.rejected_rewards
            self.metrics.add("rewards/margin", margin)
            self.metrics.add("rewards/accuracy", (margin > 0).float())

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
        precompute_reference: bool = False,
    ):
        check_settings([
            (loss_type in DPO_LOSSES, f"loss_type must be one of {', '.join(DPO_LOSSES)}"),
            _beta(beta),
            (0 <= label_smoothing < 0.5,
             f"label_smoothing must be in [0, 0.5), got {label_smoothing}"),
        ])  # fmt: skip
        super().__init__(chunk_size, share_prompts, precompute_reference)
        if loss_type == "kto_pair":
            self.batch_statistic = KL_PER_MICRO_BATCH
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
        check_settings([_beta(beta)])
        super().__init__(chunk_size, share_prompts)
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
        check_settings([_beta(beta)])
        super().__init__(chunk_size, share_prompts)
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
    data_kind = "unpaired"
    batch_statistic = KL_PER_MICRO_BATCH
    needs_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        chunk_size: int = 1024,
        share_prompts: bool = True,
        precompute_reference: bool = False,
    ):
        check_settings([_beta(beta)])
        super().__init__(chunk_size, share_prompts, precompute_reference)
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
        self.metrics.add("kl", kl_value.reshape(1))
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


__all__ = [
    "DPOObjective",
    "KTOObjective",
    "ORPOObjective",
    "PreferenceObjective",
    "RewardObjective",
    "SimPOObjective",
]
