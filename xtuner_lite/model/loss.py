"""Causal-LM loss computed in chunks, summed over trained tokens (normalized by the caller).

Full-vocabulary fp32 logits of a long row are the largest tensor of a QLoRA step (4096 tokens ×
128k vocabulary × 4 bytes = 2 GiB). Here each chunk's logits live only inside the forward: the
gradients with respect to the hidden states (and the head, if it trains) are computed there and
kept, so backward neither stores nor recomputes logits (one head matmul and one softmax fewer
than recomputing each chunk under activation checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xtuner_lite.data.labels import IGNORE_INDEX

# The trained positions are padded to a multiple of this many rows, so the head's matmuls come
# in a few shapes: oneDNN builds and keeps a kernel per shape, and the count varies every step.
LOSS_ROW_STEP = 32


def loss_chunk_tokens(vocab: int, logits_bytes: int) -> int:
    """Tokens per loss chunk whose fp32 logits take about ``logits_bytes`` (a multiple of
    ``LOSS_ROW_STEP``, at least one): the same memory for any vocabulary."""
    return max(LOSS_ROW_STEP, logits_bytes // (4 * vocab) // LOSS_ROW_STEP * LOSS_ROW_STEP)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Label of position t is the token at t+1; the last position predicts nothing."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def softmax_(logits: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Each row's log-sum-exp; ``logits`` (fp32) becomes its softmax in place (without
    ``normalize``: exp(logits - max), unnormalized). In place in the chunk's one fp32 buffer:
    logsumexp and softmax would each allocate another chunk-sized temporary, whose fresh pages
    cost as much as the arithmetic on CPU."""
    maxes = logits.amax(-1, keepdim=True)
    sums = logits.sub_(maxes).exp_().sum(-1, keepdim=True)
    if normalize:
        logits.div_(sums)
    return (maxes + sums.log()).squeeze(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), gradients computed chunk by chunk in
    forward. Runs under the caller's autocast, so the head matmuls use its compute dtype."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        valid: int,
    ) -> torch.Tensor:
        """Rows from ``valid`` on are padding: computed, but neither summed nor back-propagated."""
        need = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if need[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias).float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            log_normalizer = softmax_(logits, normalize=any(need[:3]))
            real = max(0, min(t.shape[0], valid - start))
            total += log_normalizer[:real].sum() - picked[:real].sum()
            if not any(need[:3]):
                continue
            # d(sum CE)/d logits = softmax - one_hot
            grad_logits = logits
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits[real:] = 0.0
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits.to(h.dtype) @ weight.to(
                    h.dtype
                )
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.float()
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.dtypes[0]),
            None if grad_bias is None else (grad_bias * scale).to(ctx.dtypes[1]),
            None,
            None,
            None,
        )


def chunked_lm_loss(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """Sum of token losses over trained positions and their count.

    ``hidden`` is (batch, seq, dim) before the head, ``labels`` unshifted (batch, seq).
    Only positions with a label are projected, so prompt tokens cost nothing here.
    """
    return lm_loss_of_targets(hidden, head, shift_labels(labels), chunk_size)


def lm_loss_of_targets(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """:func:`chunked_lm_loss` from the already shifted ``targets`` of ``hidden``'s positions
    (a sequence-parallel shard's: its last position's target is the next shard's first token)."""
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        # the head's weight is still read: under ZeRO-3 reading it gathers it, a collective
        # the other ranks (a sequence-parallel shard with trained tokens) are making
        return hidden.sum() * 0.0 + head.weight.sum() * 0.0, 0
    hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    pad = -count % LOSS_ROW_STEP
    if pad:
        hidden, targets = F.pad(hidden, (0, 0, 0, pad)), F.pad(targets, (0, pad))
    total = _LinearCrossEntropy.apply(
        hidden, head.weight, getattr(head, "bias", None), targets, chunk_size, count
    )
    return total, count
