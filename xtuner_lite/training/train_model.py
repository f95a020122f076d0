"""The mmengine model: a causal LM trained with an objective, one optimizer step per item."""

from __future__ import annotations

from collections import OrderedDict

import torch
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper

from xtuner_lite.objectives.base import Objective
from xtuner_lite.training.step import Accumulation, train_step


class TrainModel(BaseModel):
    """Wraps a causal LM. A data item is a list of micro-batches forming one optimizer step.

    Accumulating inside the step (not through mmengine's ``accumulative_counts``) lets the loss
    be normalized by the objective's units (trained tokens, pairs) of the whole global batch.
    """

    def __init__(self, llm: torch.nn.Module, objective: Objective):
        super().__init__()
        self.llm = llm
        self.objective = objective

    def _device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.llm.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss sum of one micro-batch. Going through ``forward`` (not calling
        the LLM directly) is what lets DDP, DeepSpeed and FSDP2 hook the step."""
        return self.objective.loss_sum(self.llm, self._device(batch))

    def train_step(
        self, data: list[dict[str, torch.Tensor]], optim_wrapper: OptimWrapper
    ) -> dict[str, torch.Tensor]:
        """One process: the step with nothing to synchronize."""
        return train_step(self, self.objective, data, optim_wrapper, Accumulation(self))

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


__all__ = ["TrainModel"]
