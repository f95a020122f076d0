"""Per-sequence log-probabilities of the trained tokens of a packed batch (preference training).

Only trained positions are projected through the head, chunk by chunk, never more than one
chunk of full-vocabulary logits alive. Unlike the SFT loss (``model/loss.py``), the gradient of
each token's log-probability is weighted by the loss (a different weight per sequence), known
only in backward: see ``_LinearLogProbs`` for what forward prepares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xtuner_lite.data.labels import IGNORE_INDEX
from xtuner_lite.model.forward import (
    base_and_head,
    decoder_hidden,
    group_sum,
    hidden_at,
    positions,
)
from xtuner_lite.model.loss import shift_labels, softmax_


@dataclass
class SequenceLogps:
    """Summed log-probabilities of the trained tokens of each sequence, and their count."""

    total: torch.Tensor
    tokens: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)

    def select(self, index: torch.Tensor) -> SequenceLogps:
        return SequenceLogps(self.total[index], self.tokens[index])


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T + bias)[target_i] for every row i, in fp32.

    d logp_i / d hidden_i = weight[target_i] - softmax_i @ weight does not depend on the
    incoming gradient (a scalar per row): with a frozen head (LoRA, QLoRA) forward computes
    it while the chunk's logits are alive and backward only scales it, where a trained head
    needs the logits again in backward (recomputed per chunk, never all kept)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        head_frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        slope = torch.empty_like(hidden) if head_frozen and hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight, bias).float()
            t = targets[rows]
            picked = logits.gather(1, t[:, None]).squeeze(1)
            out[rows] = picked - softmax_(logits, normalize=slope is not None)
            if slope is not None:
                grad = _onehot_minus_(logits, t)
                slope[rows] = grad.to(hidden.dtype) @ weight.to(hidden.dtype)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, slope)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, targets, slope = ctx.saved_tensors
        need = ctx.needs_input_grad
        if slope is not None:
            return slope * grad_out[:, None].to(slope.dtype), None, None, None, None
        grad_hidden = torch.empty_like(hidden) if need[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size]
            t = targets[start : start + ctx.chunk_size]
            g = grad_out[start : start + ctx.chunk_size].float()
            # d logp_t / d logits = one_hot(t) - softmax, scaled by each row's incoming gradient
            logits = F.linear(h, weight, bias).float()
            softmax_(logits)
            grad_logits = _onehot_minus_(logits, t).mul_(g[:, None])
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk_size] = grad_logits.to(h.dtype) @ weight.to(
                    h.dtype
                )
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def _onehot_minus_(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d log softmax(logits)[target] / d logits = one_hot(target) - softmax, in place of the
    softmax ``probs``."""
    grad = probs.neg_()
    grad[torch.arange(targets.shape[0], device=targets.device), targets] += 1
    return grad


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> SequenceLogps:
    """Summed log-probability of each sequence's trained tokens and their count.

    ``batch["seq_index"]`` (batch, width) numbers the sequences of a packed batch (-1 on
    padding); the result has one entry per sequence, in that numbering.
    """
    _, head = base_and_head(model)
    hidden = decoder_hidden(model, batch)
    return logps_from_hidden(hidden, head, batch, chunk_size)


def logps_from_hidden(
    hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> SequenceLogps:
    """Per-sequence sums from ``hidden`` (under sequence parallelism: this rank's positions'
    parts, added up over the group)."""
    num_sequences = int(batch["num_sequences"])
    logps, owner = trained_token_logps(hidden, head, batch, chunk_size)
    totals = logps.new_zeros(num_sequences).index_add(0, owner, logps)
    tokens = torch.bincount(owner, minlength=num_sequences)
    return SequenceLogps(group_sum(totals), group_sum(tokens))


def token_owner(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sequence each trained token of a packed batch belongs to, in batch order."""
    targets = shift_labels(batch["labels"]).reshape(-1)
    return batch["seq_index"].reshape(-1)[targets != IGNORE_INDEX]


def trained_token_logps(
    hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of every trained token of ``hidden``'s positions, in batch order; the
    sequence it belongs to)."""
    targets = positions(shift_labels(batch["labels"])).reshape(-1)
    keep = targets != IGNORE_INDEX
    owner = positions(batch["seq_index"]).reshape(-1)[keep]
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    logps = _LinearLogProbs.apply(
        rows, head.weight, getattr(head, "bias", None), targets[keep], chunk_size
    )
    return logps, owner


def token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of a packed batch's trained tokens and their sequences."""
    _, head = base_and_head(model)
    return trained_token_logps(decoder_hidden(model, batch), head, batch, chunk_size)


def sequence_scores(
    model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One scalar per sequence from ``head`` on its last token's hidden state (reward models,
    as transformers' sequence classification scores the last token).
    ``batch["last_index"]`` holds each sequence's last position in the flattened batch."""
    last = batch["last_index"]
    hidden, mine = hidden_at(decoder_hidden(model, batch), last, batch["input_ids"].shape[1])
    scores = head(hidden).squeeze(-1).float()
    # under sequence parallelism each sequence's last token is on one rank: the others add 0
    return group_sum(scores.new_zeros(last.shape[0]).index_put((mine,), scores))


__all__ = [
    "SequenceLogps",
    "logps_from_hidden",
    "sequence_logps",
    "sequence_scores",
    "token_logps",
    "token_owner",
    "trained_token_logps",
]
