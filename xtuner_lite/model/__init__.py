"""Model building, packed attention and the chunked, globally normalized loss."""

from xtuner_lite.model.build import (
    LoraSettings,
    build_model,
    disable_cpu_4bit_repack,
    skip_adapter_input_casts,
)
from xtuner_lite.model.forward import count_trained, loss_sum
from xtuner_lite.model.loss import chunked_lm_loss

__all__ = [
    "LoraSettings",
    "build_model",
    "chunked_lm_loss",
    "count_trained",
    "disable_cpu_4bit_repack",
    "loss_sum",
    "skip_adapter_input_casts",
]
