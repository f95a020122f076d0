"""Mixed precision for any device: mmengine's AmpOptimWrapper is CUDA-only."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper


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
