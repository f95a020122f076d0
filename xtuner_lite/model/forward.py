"""One micro-batch forward: packed attention, chunked loss, loss summed over trained tokens."""

from __future__ import annotations

import torch

from xtuner_lite.model.attention import attention_kwargs
from xtuner_lite.model.loss import chunked_lm_loss


def base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq, dim) last hidden states of a packed batch, attention kept per sample."""
    decoder, _ = base_and_head(model)
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    out = decoder(input_ids=batch["input_ids"], use_cache=False, **attention_kwargs(batch, impl))
    return out.last_hidden_state


def loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of trained tokens) for one collated batch."""
    _, head = base_and_head(model)
    return chunked_lm_loss(decoder_hidden(model, batch), head, batch["labels"], chunk_size)


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens in a batch (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())
