# Schedule for 7–8B QLoRA on an 8 GB card: the GPU schedule, with the checkpointed layers'
# inputs in pinned host memory (copied on a side stream while compute goes on). A recipe also
# sets train.chunk_size to its model's loss_chunk_size (128 MiB of fp32 logits per chunk).
from mmengine.config import read_base

with read_base():
    from .gpu import *  # noqa: F403

train.update(offload_activations=True)  # noqa: F405
