"""Supervised fine-tuning and continued pretraining: next-token cross-entropy."""

from __future__ import annotations

import math

import torch

from xtuner_lite.data.dataset import SFTDataset
from xtuner_lite.data.image_text import ImageTextDataset, process_image_dataset
from xtuner_lite.data.pipeline import process_dataset
from xtuner_lite.model.forward import count_trained, loss_sum
from xtuner_lite.objectives.base import Objective


class SFTObjective(Objective):
    """Cross-entropy summed over the trained tokens (labels != -100), normalized by the trained
    tokens of the global batch."""

    name = "sft"
    unit = "trained tokens"
    reader = staticmethod(process_dataset)
    dataset_class = SFTDataset

    def loss_sum(self, llm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(llm, batch, self.chunk_size)[0]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained(batch)

    def degenerate_loss(self, llm: torch.nn.Module) -> float | None:
        """ln V: every token equally likely."""
        vocab_size = getattr(getattr(llm, "config", None), "vocab_size", None)
        return math.log(vocab_size) if vocab_size else None


class ImageSFTObjective(SFTObjective):
    """SFT of an image-text model on conversations with images (``data/image_text.py``): the
    same loss; each micro-batch brings its rows' pixel values."""

    name = "vlm_sft"
    data_kind = "images"
    reader = staticmethod(process_image_dataset)
    dataset_class = ImageTextDataset


__all__ = ["ImageSFTObjective", "SFTObjective"]
