"""GRPO's pieces as plain tensor functions: group-relative advantages and the clipped token loss
with its three aggregations (GRPO per sequence, DAPO per token, Dr. GRPO a constant).

Completion tokens are held flat (every trained token of a micro-batch, in batch order) with
``owner`` naming each token's sequence: packed batches have no padded (sequence, token) grid.
The loss is returned as a *sum* with the count it is to be divided by over the global batch, so
the training step normalizes it once over every micro-batch and rank, like every objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose rewards barely differ is not blown up to ±1/eps


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's reward minus its group's mean, divided by the std (unbiased) of its
    group (``scale="group"``, GRPO), of the whole batch (``"batch"``), or not at all (``"none"``,
    Dr. GRPO). Returns the advantages and, per group, whether all its rewards are equal."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = rewards.float().reshape(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    group_std = grouped.std(dim=1) if group_size > 1 else torch.zeros(grouped.shape[0])
    equal = torch.isclose(group_std, torch.zeros_like(group_std))
    if scale == "group":
        return centred / (group_std.repeat_interleave(group_size) + STD_EPS), equal
    if scale == "batch":
        batch_std = rewards.float().std() if rewards.numel() > 1 else torch.tensor(0.0)
        return centred / (batch_std + STD_EPS), equal
    return centred, equal


def loss_units(aggregation: str, weights: torch.Tensor, owner: torch.Tensor) -> int:
    """What the summed loss is divided by, over the global batch: the counted sequences, or
    for ``dapo`` their completion tokens."""
    return int(weights[owner].sum() if aggregation == "dapo" else weights.sum())


@dataclass
class GRPOLoss:
    """``total`` / (global ``units``) is the step's loss; the rest is logged."""

    total: torch.Tensor
    units: int
    clipped_low: torch.Tensor  # per token: ratio below 1 - epsilon with a negative advantage
    clipped_high: torch.Tensor  # per token: ratio above 1 + epsilon_high with a positive one
    kl: torch.Tensor | None  # per token, k3 estimate of KL(policy || reference)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    owner: torch.Tensor,
    num_sequences: int,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: str = "grpo",
    max_completion_length: int = 256,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> GRPOLoss:
    """The clipped surrogate ``-min(r A, clip(r, 1-ε, 1+ε_high) A)`` (+ β·KL) per token.

    ``logps``/``old_logps``/``ref_logps``: (tokens,) log-probabilities of the completion tokens
    under the policy, the policy that sampled them and the reference; ``advantages``:
    (sequences,); ``owner``: (tokens,) each token's sequence in ``[0, num_sequences)``.
    Aggregation: ``grpo`` sums each sequence's token mean (units: sequences); ``dapo`` sums
    tokens (units: tokens); ``dr_grpo`` sums tokens / ``max_completion_length`` (units:
    sequences). ``weights`` (sequences,), 0 or 1: a 0 sequence adds nothing and is not
    counted (a skipped group kept only so that every rank runs the step)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype)[owner]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    kl = None
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if weights is None:
        weights = torch.ones(num_sequences, device=logps.device)
    per_token = per_token * weights.to(per_token.dtype)[owner]
    if aggregation == "grpo":
        tokens = torch.bincount(owner, minlength=num_sequences)
        sums = per_token.new_zeros(num_sequences).index_add(0, owner, per_token)
        total = (sums / tokens.clamp(min=1)).sum()
    elif aggregation == "dapo":
        total = per_token.sum()
    else:
        total = per_token.sum() / max_completion_length
    units = loss_units(aggregation, weights, owner)
    detached = ratio.detach()
    return GRPOLoss(
        total,
        units,
        clipped_low=((detached < 1 - epsilon) & (adv < 0)).float(),
        clipped_high=((detached > 1 + high) & (adv > 0)).float(),
        kl=None if kl is None else kl.detach(),
    )


__all__ = ["AGGREGATIONS", "SCALES", "GRPOLoss", "group_advantages", "grpo_loss", "loss_units"]
