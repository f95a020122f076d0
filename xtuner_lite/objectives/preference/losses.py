"""Preference losses on per-sequence log-probabilities, one value per pair (or unpaired example).

Each returns per-item losses (summed by the objective and normalized by the step over the global
batch) and the implicit rewards that are logged. The formulas follow the papers as TRL writes
them; ``tests/test_preference_losses.py`` checks each against TRL on the same log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xtuner_lite.model.logprobs import SequenceLogps

DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "kto_pair", "sppo_hard", "nca_pair")


@dataclass
class PairLosses:
    losses: torch.Tensor  # one per item
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached


def dpo_losses(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
    ref_chosen: SequenceLogps,
    ref_rejected: SequenceLogps,
) -> PairLosses:
    """XTuner 0.x's DPO family. ``sigmoid`` with ``label_smoothing`` is conservative DPO (cDPO);
    ``robust`` is rDPO; ``ipo`` uses per-token-average log-ratios (as TRL, after the authors)."""
    chosen_ratio = chosen.total - ref_chosen.total
    rejected_ratio = rejected.total - ref_rejected.total
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        average = chosen_ratio / chosen.tokens.clamp(
            min=1
        ) - rejected_ratio / rejected.tokens.clamp(min=1)
        losses = (average - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        # the KL term of each side is estimated from the other side's mean log-ratio over the
        # micro-batch (KTO report; XTuner 0.x and TRL before 0.9)
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        losses = (
            (1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)))
            + (1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)))
        ) / 2
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    else:  # nca_pair
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        losses = (
            -F.logsigmoid(chosen_reward)
            - 0.5 * F.logsigmoid(-chosen_reward)
            - 0.5 * F.logsigmoid(-rejected_reward)
        )
    return PairLosses(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(beta: float, chosen: SequenceLogps, rejected: SequenceLogps) -> PairLosses:
    """ORPO: the chosen response's mean token NLL minus beta × log σ(log odds ratio), on
    per-token-average log-probabilities; no reference model."""
    chosen_mean, rejected_mean = chosen.mean.float(), rejected.mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    return PairLosses(losses, (beta * chosen_mean).detach(), (beta * rejected_mean).detach())


def simpo_losses(
    beta: float,
    gamma: float,
    label_smoothing: float,
    sft_weight: float,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
) -> PairLosses:
    """SimPO: a sigmoid loss on the length-normalized log-probability margin minus ``gamma``;
    reference-free. ``sft_weight`` adds the chosen mean NLL (CPO's alpha; 0 in the paper)."""
    logits = chosen.mean - rejected.mean - gamma / beta
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
        -beta * logits
    )
    if sft_weight:
        losses = losses - sft_weight * chosen.mean
    return PairLosses(losses, (beta * chosen.mean).detach(), (beta * rejected.mean).detach())


def kto_losses(
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    policy: SequenceLogps,
    reference: SequenceLogps,
    kl_policy: SequenceLogps,
    kl_reference: SequenceLogps,
    desirable: torch.Tensor,
) -> tuple[PairLosses, torch.Tensor]:
    """KTO on unpaired examples: the KL term is the micro-batch's mean log-ratio on mismatched
    (prompt, other completion) sequences, clamped at 0 and not differentiated (as TRL).
    Returns the losses (rewards split by label) and the KL estimate."""
    kl = (kl_policy.total - kl_reference.total).mean().detach().clamp(min=0)
    ratio = policy.total - reference.total
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = (beta * ratio).detach()
    return PairLosses(losses, rewards[desirable], rewards[~desirable]), kl


def reward_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    center_coefficient: float = 0.0,
) -> PairLosses:
    """Bradley–Terry on scalar scores: -log σ(r_chosen - r_rejected - margin), optionally
    pulling scores towards 0 (``center_rewards_coefficient``)."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return PairLosses(losses, chosen.detach(), rejected.detach())


__all__ = [
    "DPO_LOSSES",
    "PairLosses",
    "SequenceLogps",
    "dpo_losses",
    "kto_losses",
    "orpo_losses",
    "reward_losses",
    "simpo_losses",
]
