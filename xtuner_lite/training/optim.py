"""Mixed precision for any device: mmengine's AmpOptimWrapper is CUDA-only."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler


class AutocastOptimWrapper(OptimWrapper):
    """Runs forwards under ``torch.autocast`` (bf16 on CPU or GPU); weights stay fp32.

    bf16 needs no loss scaling, so this is all fp16-free mixed precision takes.
    """

    def __init__(self, *args, dtype: str | None = "bf16", device_type: str = "cpu", **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[dtype]
        self.device_type = device_type

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model):
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                    yield


class ScaledOptimWrapper(AutocastOptimWrapper):
    """fp16 autocast with dynamic loss scaling (``torch.amp.GradScaler``, on any device): the
    loss is scaled before backward, the gradients unscaled before clipping, and a step whose
    gradients hold inf or NaN is skipped while the scale halves — an fp16 overflow, not a
    diverged run. ``skipped_in_a_row`` counts the skipped steps since the last taken one.
    ``sharded``: FSDP's gradients, unscaled shard by shard."""

    def __init__(self, *args, device_type: str = "cuda", sharded: bool = False, **kwargs):
        super().__init__(*args, dtype="fp16", device_type=device_type, **kwargs)
        self.loss_scaler = ShardedGradScaler() if sharded else torch.amp.GradScaler(device_type)
        self.skipped_in_a_row = 0

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        scale = self.loss_scaler.get_scale()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()
        skipped = self.loss_scaler.get_scale() < scale  # the scaler halves it on inf/NaN only
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "loss_scaler": self.loss_scaler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        if "loss_scaler" in state_dict:
            self.loss_scaler.load_state_dict(state_dict.pop("loss_scaler"))
        super().load_state_dict(state_dict)
