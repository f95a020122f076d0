"""The mmengine model: one optimizer step over a global batch of micro-batches."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper

from xtuner_lite.engine.distributed import global_sum, world
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.forward import count_trained, loss_sum


class TrainingStoppedError(XtunerError):
    """Training cannot go on from this step; the checkpoints from before it are kept."""


class NonFiniteLossError(TrainingStoppedError):
    """A step's loss is NaN or inf."""


class CollapsedRunError(TrainingStoppedError):
    """The model predicts the uniform distribution and gets no gradient: the weights were
    destroyed (typically by far too high a learning rate) without any NaN."""


def _collapsed(loss: float, vocab_size: int | None, params: list[torch.nn.Parameter]) -> bool:
    """Loss at ln V (every token equally likely) with an all-zero gradient."""
    if not vocab_size or abs(loss - math.log(vocab_size)) > 1e-3 * math.log(vocab_size):
        return False
    return all(p.grad is None or not bool(p.grad.abs().max() > 0) for p in params)


class SFTModel(BaseModel):
    """Wraps a causal LM. A data item is a list of micro-batches forming one optimizer step.

    Accumulating inside ``train_step`` (not through mmengine's ``accumulative_counts``) lets the
    loss be normalized by the trained tokens of the whole global batch.
    """

    def __init__(self, llm: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.llm = llm
        self.chunk_size = chunk_size
        self.vocab_size = getattr(getattr(llm, "config", None), "vocab_size", None)

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.llm.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token losses of one micro-batch. Going through ``forward`` (not calling the
        LLM directly) is what lets DDP, DeepSpeed and FSDP2 hook the step."""
        return loss_sum(self.llm, self._device(batch), self.chunk_size)[0]

    def train_step(self, data: list[dict[str, torch.Tensor]], optim_wrapper: OptimWrapper,
                   forward: Callable[[dict], torch.Tensor] | None = None,
                   no_sync: Callable[[], AbstractContextManager] | None = None
                   ) -> dict[str, torch.Tensor]:
        """One optimizer step over this process's micro-batches.

        Under data parallelism ``forward`` is the wrapped model (DDP, DeepSpeed engine, or this
        FSDP2-sharded module) and gradients are averaged over the world; scaling each loss sum
        by world / global trained tokens makes that average the global token mean.
        ``no_sync`` skips the gradient all-reduce of all but the last micro-batch (DDP).
        """
        forward = forward or self
        _, world_size = world()
        local = sum(count_trained(b) for b in data)
        total = max(global_sum(local)[0], 1)
        step_each = getattr(optim_wrapper, "step_every_micro_batch", False)
        loss_value = 0.0
        for i, batch in enumerate(data):
            sync = no_sync() if no_sync and i < len(data) - 1 else nullcontext()
            with sync:
                with optim_wrapper.optim_context(self):
                    loss = forward(batch)
                optim_wrapper.backward(loss * (world_size / total))
            loss_value += float(loss.detach())
            if step_each:  # DeepSpeed counts micro-batches and steps at the boundary itself
                optim_wrapper.step()
        tokens = sum(int(b["num_tokens"]) for b in data)  # real tokens, padding excluded
        loss_value, tokens = global_sum(loss_value, tokens)
        loss_value /= total
        if not math.isfinite(loss_value):
            if not step_each:
                optim_wrapper.zero_grad()
            raise NonFiniteLossError(f"loss is {loss_value}; training stopped (lower the "
                                     "learning rate, or check the data with "
                                     "`xtuner check-dataset`)")
        if not step_each and _collapsed(loss_value, self.vocab_size, self._trained()):
            optim_wrapper.zero_grad()
            raise CollapsedRunError(f"the model collapsed: loss {loss_value:.4f} = ln(vocabulary "
                                    "size) with a zero gradient, so the weights were destroyed "
                                    "(usually by too high a learning rate); training stopped")
        if not step_each:
            optim_wrapper.step()
            optim_wrapper.zero_grad()
        return {"loss": torch.tensor(loss_value), "tokens": torch.tensor(float(tokens))}

    def init_weights(self) -> None:
        """Pretrained weights are never re-initialized (mmengine's default also chokes on the
        uint8 storage of 4-bit weights while logging their statistics)."""

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only what training changes (LoRA weights; all weights in a full fine-tune), so a
        checkpoint of a LoRA run is megabytes, not the whole base model."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        full = super().state_dict(*args, **kwargs)
        kept = OrderedDict((k, v) for k, v in full.items() if k in names)
        kept._metadata = getattr(full, "_metadata", None)
        return kept
