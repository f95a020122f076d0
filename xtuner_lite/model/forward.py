"""One micro-batch forward: packed attention, chunked loss, loss summed over trained tokens.

Under sequence parallelism (``model/sequence_parallel.py``) the decoder runs on this rank's
shard of the positions: :func:`positions` gives the same shard of any per-position tensor, and
the loss sums are added up over the group.
"""

from __future__ import annotations

import torch

from xtuner_lite.data.images import IMAGE_INPUTS
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.attention import attention_kwargs
from xtuner_lite.model.loss import lm_loss_of_targets, shift_labels
from xtuner_lite.model.sequence_parallel import active_sequence_parallel
from xtuner_lite.model.vlm import grid_positions, model_image_inputs


def base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()


def positions(tensor: torch.Tensor) -> torch.Tensor:
    """The positions of a (batch, width, ...) tensor that this rank's hidden states hold."""
    sp = active_sequence_parallel()
    return tensor if sp is None else sp.shard(tensor)


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq, dim) last hidden states of a packed batch, attention kept per sample
    (under sequence parallelism: of this rank's positions). An image-text model's decoder
    takes the batch's image inputs and puts their features at its image tokens; Qwen2-VL's
    rotary positions follow each sample's image grids (``vlm.grid_positions``)."""
    decoder, _ = base_and_head(model)
    impl = getattr(model.config.get_text_config(), "_attn_implementation", "sdpa") or "sdpa"
    sp = active_sequence_parallel()
    kwargs = attention_kwargs(batch, impl, sp)
    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    kwargs.update(model_image_inputs(model.config, images))
    grid = grid_positions(model, batch)
    if grid is not None:
        if sp is not None:
            raise XtunerError(
                f"{model.config.model_type}: sequence parallelism does not split its "
                "multimodal rotary positions; train with sequence_parallel_size=1"
            )
        kwargs["position_ids"] = grid
    out = decoder(input_ids=positions(batch["input_ids"]), use_cache=False, **kwargs)
    return out.last_hidden_state


def group_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A sum over this rank's positions made the row's: added up over the sequence-parallel
    group (itself without one)."""
    sp = active_sequence_parallel()
    return tensor if sp is None else sp.reduce(tensor)


def hidden_at(
    hidden: torch.Tensor, flat: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states at positions ``flat`` of the (batch, width) batch that this rank holds
    (every one without sequence parallelism), and which of ``flat`` they are."""
    sp = active_sequence_parallel()
    rows = hidden.reshape(-1, hidden.shape[-1])
    if sp is None:
        return rows[flat], torch.ones_like(flat, dtype=torch.bool)
    mine, local = sp.owned(flat, width)
    return rows[local], mine


def loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of trained tokens) for one collated batch."""
    _, head = base_and_head(model)
    targets = positions(shift_labels(batch["labels"]))
    total, _ = lm_loss_of_targets(decoder_hidden(model, batch), head, targets, chunk_size)
    return group_sum(total), count_trained(batch)


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens in a batch (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())
