"""The label convention shared by the data pipeline and the loss."""

IGNORE_INDEX = -100  # a label that trains nothing (torch's and transformers' convention)

__all__ = ["IGNORE_INDEX"]
