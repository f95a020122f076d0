"""One micro-batch forward: packed attention, chunked loss, loss summed over trained tokens."""

from __future__ import annotations

import torch

from xtuner_lite.model.attention import attention_kwargs
from xtuner_lite.model.loss import chunked_lm_loss


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
             ) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of trained tokens) for one collated batch."""
    decoder, head = _base_and_head(model)
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    out = decoder(input_ids=batch["input_ids"], use_cache=False,
                  **attention_kwargs(batch, impl))
    return chunked_lm_loss(out.last_hidden_state, head, batch["labels"], chunk_size)


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens in a batch (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         chunk_size: int = 1024, scale_tokens: int | None = None) -> float:
    """Backward every micro-batch with the loss normalized by the global trained-token count.

    Dividing each micro-batch's loss *sum* by the total count over all micro-batches (and, under
    data parallelism, all ranks: pass ``scale_tokens``) gives the same gradient as one big batch,
    unlike averaging per-micro-batch means (transformers#34191). Returns the mean token loss.
    """
    total = scale_tokens if scale_tokens is not None else sum(map(count_trained, micro_batches))
    total = max(total, 1)
    value = 0.0
    for batch in micro_batches:
        loss, _ = loss_sum(model, batch, chunk_size)
        (loss / total).backward()
        value += float(loss.detach())
    return value / total
